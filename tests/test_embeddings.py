"""Textual-inversion embedding files: every format read into one record, bad files refused in one line,
and parity with diffusers' load_textual_inversion."""

import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.config import TextEncoderConfig
from latentdiff.errors import CheckpointError, InputError
from latentdiff.formats.embeddings import check_width, load_embeddings_dir, read_embedding, ti_hashes

SD1, SD2 = TextEncoderConfig(), TextEncoderConfig(width=1024)
PACKAGE_TOKENIZER = Path(__file__).resolve().parent.parent / "latentdiff" / "tokenizer"


def vectors(n: int, width: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_a1111(path: Path, vecs: torch.Tensor) -> Path:
    """What A1111's trainer saves: the vectors under string_to_param["*"], plus bookkeeping."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs.clone().requires_grad_()},
                "name": "stored-name", "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    return path


def one_line_error(path, *words, kind=CheckpointError) -> str:
    with pytest.raises(kind) as info:
        read_embedding(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("n", [1, 4])
def test_a1111_pt_reads_back_equal(tmp_path, n):
    want = vectors(n)
    e = read_embedding(write_a1111(tmp_path / "ink-style.pt", want))
    assert e.name == "ink-style"  # the file stem, not the name stored inside
    assert e.source_format == "a1111" and e.vectors.dtype == torch.float32 and not e.vectors.requires_grad
    assert torch.equal(e.vectors, want) and e.width == 768


def test_original_textual_inversion_parameterdict_reads_back_equal(tmp_path):
    """rinongal/textual_inversion saved its EmbeddingManager's ParameterDict; weights_only refuses that class
    unless allowed, and allowing it must not let a code-calling pickle through (see the refusal test)."""
    want = vectors(2, seed=4)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(want.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "old.pt")
    e = read_embedding(tmp_path / "old.pt")
    assert e.source_format == "a1111" and torch.equal(e.vectors, want)


def test_emb_params_safetensors_and_pt_read_back_equal(tmp_path):
    want = vectors(3, 1024, seed=1)
    save_file({"emb_params": want.half()}, tmp_path / "kohya.safetensors")
    torch.save({"emb_params": want}, tmp_path / "kohya2.pt")
    for file in ("kohya.safetensors", "kohya2.pt"):
        e = read_embedding(tmp_path / file)
        assert e.source_format == "single-tensor" and e.vectors.shape == (3, 1024) and e.vectors.dtype == torch.float32
    assert torch.equal(read_embedding(tmp_path / "kohya.safetensors").vectors, want.half().float())
    assert torch.equal(read_embedding(tmp_path / "kohya2.pt").vectors, want)


@pytest.mark.parametrize("shape", [(768,), (2, 768)])
def test_diffusers_token_dict_reads_back_equal(tmp_path, shape):
    want = torch.randn(shape)
    torch.save({"<cat-toy>": want}, tmp_path / "learned_embeds.bin")
    e = read_embedding(tmp_path / "learned_embeds.bin")
    assert e.name == "learned_embeds"
    assert torch.equal(e.vectors, want.reshape(-1, 768))


def test_hash_is_a1111_short_file_sha256(tmp_path):
    path = write_a1111(tmp_path / "x.pt", vectors(2))
    e = read_embedding(path)
    assert e.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    other = read_embedding(write_a1111(tmp_path / "y:z,w.pt", vectors(2, seed=5)))
    assert ti_hashes([e, other]) == f"x: {e.hash}, yzw: {other.hash}"


def test_wrong_width_is_refused_naming_file_and_model_width(tmp_path):
    e = read_embedding(write_a1111(tmp_path / "sd2-style.pt", vectors(2, 1024)))
    check_width(e, SD2)
    with pytest.raises(InputError) as info:
        check_width(e, SD1)
    message = str(info.value)
    assert str(e.path) in message and "width 1024 (made for SD 2.x)" in message and "width 768" in message
    assert "\n" not in message


def test_sdxl_embedding_is_refused(tmp_path):
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xl.safetensors")
    one_line_error(tmp_path / "xl.safetensors", "SDXL embedding", "768")
    torch.save({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xl.pt")
    one_line_error(tmp_path / "xl.pt", "SDXL embedding")


class Payload:
    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_calling_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 768))})  # the allowed class beside it
    evil = {"string_to_param": params, "x": Payload(os.system, (f"touch '{marker}'",))}
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    one_line_error(path, "refused", "system")
    assert not marker.exists()


def test_bad_files_are_named_in_one_line(tmp_path):
    good = write_a1111(tmp_path / "good.pt", vectors(2)).read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    one_line_error(tmp_path / "cut.pt", "damaged, truncated")
    save_file({"emb_params": vectors(2)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    one_line_error(tmp_path / "cut.safetensors", "truncated")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "lora.safetensors")
    one_line_error(tmp_path / "lora.safetensors", "2 tensors", "LoRA")
    torch.save({"string_to_param": {"*": vectors(1), "&": vectors(1)}}, tmp_path / "two.pt")
    one_line_error(tmp_path / "two.pt", "2 entries")
    torch.save({"emb_params": torch.zeros(2, 3, 768)}, tmp_path / "3d.pt")
    one_line_error(tmp_path / "3d.pt", "3-D")
    torch.save({"emb_params": torch.full((1, 768), float("nan"))}, tmp_path / "nan.pt")
    one_line_error(tmp_path / "nan.pt", "NaN")
    torch.save([vectors(1)], tmp_path / "list.pt")
    one_line_error(tmp_path / "list.pt", "list")
    (tmp_path / "text.bin").write_text("not an embedding at all")
    one_line_error(tmp_path / "text.bin", "not a checkpoint")


def test_folder_reads_embeddings_and_skips_the_rest_with_one_line_each(tmp_path, caplog):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write_a1111(folder / "style.pt", vectors(4))
    save_file({"emb_params": vectors(2, seed=2)}, folder / "sub" / "neg.safetensors")
    torch.save({"<tok>": vectors(1, seed=3)[0]}, folder / "tok.bin")
    write_a1111(folder / "wide.pt", vectors(1, 1024))  # SD 2.x: skipped for an SD 1.x model
    (folder / "sub" / "style.pt").write_bytes((folder / "style.pt").read_bytes())  # same stem, second
    (folder / "cut.pt").write_bytes((folder / "style.pt").read_bytes()[:300])
    save_file({f"model.diffusion_model.w{i}": torch.zeros(1) for i in range(200)}, folder / "model.safetensors")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, folder / "xl.safetensors")
    (folder / "style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "notes.txt").write_text("hi")

    with caplog.at_level(logging.INFO, logger="latentdiff"):
        found = load_embeddings_dir(folder, SD1)
    assert sorted(found) == ["neg", "style", "tok"]
    assert found["style"].path == folder / "style.pt" and found["style"].vectors.shape == (4, 768)
    assert torch.equal(found["neg"].vectors, vectors(2, seed=2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 5 and all("\n" not in w for w in warnings)
    for name, words in [("wide.pt", "width 1024"), ("cut.pt", "truncated"), ("model.safetensors", "checkpoint"),
                        ("xl.safetensors", "SDXL"), ("sub/style.pt", "already read")]:
        assert any(str(folder / name) in w and words in w for w in warnings), (name, warnings)
    assert any("style.preview.png" in i and "image" in i for i in infos)
    assert any("notes.txt" in i for i in infos)
    assert sorted(load_embeddings_dir(folder)) == ["neg", "style", "tok", "wide"]  # no model: any width


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="embeddings folder does not exist"):
        load_embeddings_dir(tmp_path / "nope")


def test_vectors_equal_the_rows_diffusers_load_textual_inversion_adds(tmp_path):
    """diffusers writes each vector of an embedding into a new token row (token, token_1, ...); those rows are
    exactly our vectors, for its two readable formats (A1111 and {token: tensor}). Exact: both copy floats."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    class Loader(TextualInversionLoaderMixin):  # the mixin needs only these two pipeline attributes
        hf_device_map, components = None, {}

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)
    files = [write_a1111(tmp_path / "a1111.pt", vectors(3, seed=7)), tmp_path / "diffusers.bin"]
    torch.save({"<diffusers>": vectors(2, seed=8)}, files[1])
    for path, token in zip(files, ["<a1111>", "<diffusers>"]):
        tokenizer = CLIPTokenizer.from_pretrained(PACKAGE_TOKENIZER)
        text_encoder = CLIPTextModel(config).eval()
        Loader().load_textual_inversion(str(path), token=token, tokenizer=tokenizer, text_encoder=text_encoder)
        ours = read_embedding(path).vectors
        names = [token] + [f"{token}_{i}" for i in range(1, len(ours))]
        rows = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)]
        assert torch.equal(rows.detach(), ours)
