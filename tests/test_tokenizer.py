"""CLIP tokenizer: the bundled vocabulary, parity with transformers' CLIPTokenizer, truncation reporting."""

import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from latentdiff.clip import PACKAGE_TOKENIZER, Tokenizer
from latentdiff.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parent.parent
START, END = 49406, 49407

PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo Of A CAT!!!",
    "Hello, world... (masterpiece:1.2), [best quality]; {foo|bar} - ok?",
    "café crème brûlée, naïve façade, Ångström, Straße",
    "東京の夜景、ネオン、雨",  # CJK
    "24 frames, 1080p, f/1.8, 3.14159, 2024-01-31",
    "a 🐱 and a 🐶 in a 🚀 ❤️",
    "  lots\tof\n\n whitespace    runs  ",
    "don't can't we're I've you'll she'd it's",
    "a photo of a cat " * 30,  # 150 tokens: over-long
    "ultra detailed " * 60,
]


@pytest.fixture(scope="module")
def reference():
    """transformers' CLIPTokenizer over our vocab/merges, one per pad convention (token 0 is '!')."""
    return {END: CLIPTokenizer.from_pretrained(PACKAGE_TOKENIZER, pad_token="<|endoftext|>"),
            0: CLIPTokenizer.from_pretrained(PACKAGE_TOKENIZER, pad_token="!")}


def reference_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


def test_vocabulary_files():
    vocab = json.loads((PACKAGE_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    merges = (PACKAGE_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == START and vocab["<|endoftext|>"] == END
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894


def test_published_clip_ids():
    # The ids OpenAI CLIP and every SD 1.x / 2.x tokenizer give this prompt.
    tokens = Tokenizer(pad_id=END)(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, :7].tolist() == [START, 320, 1125, 539, 320, 2368, END]
    assert tokens[0, 7:].tolist() == [END] * 70
    assert Tokenizer(pad_id=0)(["a photo of a cat"])[0, 7:].tolist() == [0] * 70


def test_matches_transformers_end_padding(reference):
    assert reference[END].pad_token_id == END
    assert torch.equal(Tokenizer(pad_id=END)(PROMPTS), reference_ids(reference[END], PROMPTS))


def test_matches_transformers_zero_padding(reference):
    # OpenCLIP convention: the same ids, padded with 0 instead of the end token.
    unpadded = reference[END](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    expected = unpadded["input_ids"].masked_fill(unpadded["attention_mask"] == 0, 0)
    assert torch.equal(Tokenizer(pad_id=0)(PROMPTS), expected)
    # transformers with the pad token diffusers' SD 2.x folders declare agrees wherever a prompt has no "!" ...
    plain = [p for p in PROMPTS if "!" not in p]
    assert reference[0].pad_token_id == 0
    assert torch.equal(Tokenizer(pad_id=0)(plain), reference_ids(reference[0], plain))


def test_exclamation_marks_stay_text_as_in_openclip(reference):
    # ... but turns every "!" into the pad token (diffusers issue #4153). OpenCLIP, which SD 2.x was
    # trained with, gives "! !! !!!" -> 256, 748, 995 (its published output in that issue); so do we.
    expected = [START, 256, 748, 995, END] + [0] * 72
    assert Tokenizer(pad_id=0)(["! !! !!!"])[0].tolist() == expected
    assert reference_ids(reference[0], ["! !! !!!"])[0, 1].item() == 0  # the transformers behaviour we avoid


def test_truncation_keeps_the_end_token():
    tokens = Tokenizer()(["a photo of a cat " * 30])
    assert tokens[0, 0] == START and tokens[0, -1] == END and (tokens[0, 1:-1] != END).all()


def test_dropped_words():
    tokenizer = Tokenizer()
    fits = "a photo of a cat " * 15  # exactly 75 tokens between start and end
    assert tokenizer.dropped_words(fits) == ""
    assert tokenizer.dropped_words("a photo of a cat") == ""
    assert tokenizer.dropped_words(fits + "riding a purple elephant") == "riding a purple elephant"


def diffusers_tokenizer_folder(path: Path, pad_token: str) -> Path:
    """A tokenizer/ folder as diffusers writes it (SD 2.x declares "!" as pad in special_tokens_map)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(PACKAGE_TOKENIZER / name, path / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True,
                                                            "tokenizer_class": "CLIPTokenizer"}))
    return path


def test_from_folder_uses_the_folders_pad_token(tmp_path):
    sd2 = Tokenizer.from_folder(diffusers_tokenizer_folder(tmp_path, "!"))
    assert sd2.pad_id == 0
    assert sd2(["a cat!"])[0, :6].tolist() == [START, 320, 2368, 256, END, 0]  # "!" is text, 0 is padding
    assert Tokenizer.from_folder(tmp_path, pad_id=END)(["a cat"])[0, 4] == END  # an explicit pad id wins
    (tmp_path / "sd1").mkdir()
    assert Tokenizer.from_folder(diffusers_tokenizer_folder(tmp_path / "sd1", "<|endoftext|>")).pad_id == END


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="lacks vocab.json, merges.txt"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(InputError, match="list of prompt strings, got str"):
        Tokenizer()("a cat")
    with pytest.raises(InputError, match="non-string"):
        Tokenizer()(["a cat", None])


def test_make_clip_vocab_reproduces_the_bundled_files(tmp_path):
    """The tool, fed open_clip's merge file (rebuilt here inside a wheel), writes the committed files."""
    merges = (PACKAGE_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    # open_clip's file: a header line, the ranked merges, then merges beyond CLIP's vocabulary.
    original = "\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merges, "z z", "zz z"])
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("open_clip/bpe_simple_vocab_16e6.txt.gz", gzip.compress(original.encode("utf-8")))
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_clip_vocab.py"), str(wheel), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (PACKAGE_TOKENIZER / name).read_bytes(), name
