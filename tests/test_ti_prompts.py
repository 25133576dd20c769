"""Textual-inversion embeddings in prompts: trigger words become their vectors in the text encoder's input,
equal to diffusers' load_textual_inversion; emphasis, the 75-token chunk rule, the folder and the CLI."""

import logging
from pathlib import Path

import pytest
import torch
from test_prompts import ATOL, encoders, row

from latentdiff.formats.embeddings import read_embedding
from latentdiff.infotext import parse_parameters, read_png_parameters
from latentdiff.prompts import chunk, encode_prompts, find_triggers, parse

pytestmark = pytest.mark.usefixtures("single_thread")

PACKAGE_TOKENIZER = Path(__file__).resolve().parent.parent / "latentdiff" / "tokenizer"


def write_embedding(path: Path, n: int, width: int = 32, seed: int = 0) -> Path:
    """An A1111-format embedding file of n random vectors."""
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 1}, path)
    return path


@pytest.mark.parametrize("n", [1, 3])
def test_trigger_features_equal_diffusers_load_textual_inversion(tmp_path, n):
    """diffusers adds the embedding as new token rows of a CLIPTextModel and rewrites the prompt to name
    them (maybe_convert_prompt); we put the vectors in the token-embedding output instead. The features of
    "a photo of <toy>" agree within the suite's fp32 bound (ATOL: same math, another order)."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    class Loader(TextualInversionLoaderMixin):  # the mixin needs only these two pipeline attributes
        hf_device_map, components = None, {}

    ours, theirs, tokenizer = encoders("sd1")
    path = write_embedding(tmp_path / "<toy>.pt", n)
    clip_tokenizer = CLIPTokenizer.from_pretrained(PACKAGE_TOKENIZER)
    loader = Loader()
    loader.load_textual_inversion(str(path), token="<toy>", tokenizer=clip_tokenizer, text_encoder=theirs)
    prompt = "a photo of <toy>"
    converted = loader.maybe_convert_prompt(prompt, clip_tokenizer)
    ids = clip_tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids >= 49408).sum() == n  # diffusers' new tokens are in there, n of them
    with torch.no_grad():
        expected = theirs(ids).last_hidden_state
        got = encode_prompts([prompt], tokenizer, ours, embeddings={"<toy>": read_embedding(path)})
        plain = encode_prompts(["a photo of"], tokenizer, ours)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL
    assert (got - plain).abs().max() > 0.1  # the embedding changed the features (not dropped)


def test_emphasis_weighs_the_embeddings_tokens(tmp_path):
    """(<toy>:1.5) scales the embedding's feature rows like any token's, then restores the mean (A1111's
    Original emphasis): built here from the unweighted features."""
    ours, _, tokenizer = encoders("sd1")
    embeddings = {"toy": read_embedding(write_embedding(tmp_path / "toy.pt", 2))}
    with torch.no_grad():
        z = encode_prompts(["a toy cat"], tokenizer, ours, embeddings=embeddings)
        got = encode_prompts(["a (toy:1.5) cat"], tokenizer, ours, embeddings=embeddings)
    weights = torch.ones(77)
    weights[2:4] = 1.5  # start, "a", then the two vectors
    expected = z * weights[None, :, None]
    expected = expected * (z.mean() / expected.mean())
    assert (got - expected).abs().max() <= 1e-5  # the same features scaled two ways: float rounding only


def test_an_embedding_never_straddles_two_chunks(tmp_path):
    """73 words then a 3-vector embedding: 73 + 3 > 75, so the first chunk is closed at 73 and padded, the
    embedding opens the second (A1111's rule); with 72 words it fits exactly."""
    toy = read_embedding(write_embedding(tmp_path / "toy.pt", 3))

    def word_ids(texts):
        return [[1] * len(text.split()) for text in texts]

    for words, lengths in [(73, [73, 4]), (72, [75, 1])]:
        pieces = find_triggers(parse("w " * words + "toy w"), {"toy": toy})
        chunks = chunk(pieces, word_ids, comma_id=9)
        assert [len(ids) for ids, _ in chunks] == lengths
        slots = [token for ids, _ in chunks for token in ids if isinstance(token, tuple)]
        assert slots == [(toy, 0), (toy, 1), (toy, 2)]
    ours, theirs, tokenizer = encoders("sd1")
    prompt = "red " * 73 + "toy"
    with torch.no_grad():
        features = encode_prompts([prompt], tokenizer, ours, embeddings={"toy": toy})
        red = tokenizer.token_ids(["red"])[0][0]
        first = theirs(torch.tensor([row([red] * 73, 49407)])).last_hidden_state
    assert features.shape == (1, 2 * 77, 32)
    assert (features[:, :77] - first).abs().max() <= ATOL  # the first chunk: the 73 words and padding only


def test_triggers_are_whole_words_any_case_and_prompts_without_them_are_unchanged(tmp_path):
    ours, _, tokenizer = encoders("sd1")
    toy = read_embedding(write_embedding(tmp_path / "toy.pt", 1))
    embeddings = {"toy": toy}
    assert find_triggers(parse("a toyota, toys, TOY."), embeddings) == [("a toyota, toys, ", 1.0), (toy, 1.0),
                                                                         (".", 1.0)]
    prompts = ["a photo of a toyota", "(a cat:1.2) BREAK a dog", ""]
    with torch.no_grad():
        assert torch.equal(encode_prompts(prompts, tokenizer, ours, embeddings=embeddings),
                           encode_prompts(prompts, tokenizer, ours))


def test_folder_skips_a_wrong_width_file_with_one_warning_and_pipeline_writes_ti_hashes(tmp_path, caplog):
    from tiny import SD1, tiny_model

    from latentdiff.formats.embeddings import a1111_hash
    from latentdiff.pipeline import Pipeline

    folder = tmp_path / "embeddings"
    folder.mkdir()
    toy, unused = write_embedding(folder / "toy.pt", 2), write_embedding(folder / "unused.pt", 1)
    write_embedding(folder / "sd2thing.pt", 1, width=1024)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        pipe = Pipeline(tiny_model(SD1), device="cpu", dtype="fp32", embeddings_dir=folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sd2thing.pt" in warnings[0] and "width 1024" in warnings[0]
    assert sorted(pipe.embeddings) == ["toy", "unused"]
    result = pipe.txt2img("a toy", negative_prompt="blurry", width=64, height=64, steps=1, seed=1, progress=False)
    params = parse_parameters(pipe.infotext(result.request, 0)).params
    assert params["TI hashes"] == f"toy: {a1111_hash(toy)}"
    assert a1111_hash(unused) not in pipe.infotext(result.request, 0)
    plain = pipe.txt2img("a cat", width=64, height=64, steps=1, seed=1, progress=False)
    assert "TI hashes" not in parse_parameters(pipe.infotext(plain.request, 0)).params


def test_cli_embeddings_dir_writes_ti_hashes_and_replays_them(tmp_path, capsys):
    from tiny import SD1, tiny_model

    from latentdiff.cli import main
    from latentdiff.formats.embeddings import a1111_hash
    from latentdiff.loader import save_model

    model = save_model(tiny_model(SD1), tmp_path / "tiny.safetensors")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    toy = write_embedding(folder / "toy.pt", 3)
    out = tmp_path / "out"
    assert main(["txt2img", "a red toy", "-n", "toy", "-W", "64", "-H", "64", "--steps", "1", "--quiet",
                 "--dtype", "fp32", "--model", str(model), "--embeddings-dir", str(folder), "-o", str(out)]) == 0
    [image] = sorted(out.rglob("*.png"))
    params = parse_parameters(read_png_parameters(image)).params
    assert params["TI hashes"] == f"toy: {a1111_hash(toy)}"  # used twice (prompt and negative): named once
    assert main(["txt2img", "a red toy", "--model", str(model), "--embeddings-dir", str(tmp_path / "nope"),
                 "-o", str(out)]) != 0
    assert "embeddings folder not found" in capsys.readouterr().err

    def replay_notes(*flags):
        capsys.readouterr()
        assert main(["txt2img", "--from-png", str(image), "--steps", "1", "--quiet", "--model", str(model),
                     *flags, "-o", str(tmp_path / "replays")]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]

    assert not any("TI hashes" in note for note in replay_notes("--embeddings-dir", str(folder)))  # honoured
    assert any("not replayed" in note and "TI hashes" in note for note in replay_notes())  # no folder given
    write_embedding(toy, 3, seed=5)  # another version of the file under the same name
    assert any(f"{toy} has hash {a1111_hash(toy)}" in note and "another version" in note
               for note in replay_notes("--embeddings-dir", str(folder)))
    toy.unlink()
    assert any("no embedding 'toy'" in note for note in replay_notes("--embeddings-dir", str(folder)))
