"""A1111 prompt syntax: emphasis parsing (A1111's documented examples), 75-token chunks, the comma rule,
BREAK, "Original" emphasis, and each chunk's features against transformers' CLIPTextModel."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.clip import TextEncoder, Tokenizer
from latentdiff.config import TextEncoderConfig
from latentdiff.prompts import BREAK, chunk, count_chunks, emphasize, encode_prompts, parse

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4  # fp32 on CPU, same math in another order (SDPA vs eager softmax): rounding only, as test_clip


# -- parsing: the examples of A1111's documentation (its parser's docstring and the wiki's emphasis list) --

@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("((x))", [("x", 1.21)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.21)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x : 0.5 )", [("x ", 0.5)]),
    ("((x:1.5))", [("x", 1.65)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),          # nothing open: kept as text
    ("a :1.2) b", [("a :1.2) b", 1.0)]),
    ("\\(x\\) \\[y\\] a\\\\b", [("(x) [y] a\\b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_matches_a1111(prompt, expected):
    got = parse(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_break_is_a_marker_only_as_an_uppercase_word():
    assert parse("a cat BREAK (a dog)") == [("a cat", 1.0), BREAK, ("a dog", 1.1)]
    assert parse("BREAKFAST, break") == [("BREAKFAST, break", 1.0)]


def test_prompt_editing_alternation_and_are_still_text():
    """`parse` reads them as emphasis + text, never an error: prompt_schedule.py resolves them before it."""
    assert parse("[cat:dog:0.5]") == [("cat:dog:0.5", pytest.approx(1 / 1.1))]
    assert parse("[cat|dog]") == [("cat|dog", pytest.approx(1 / 1.1))]
    assert parse("a cat AND a dog") == [("a cat AND a dog", 1.0)]


# -- chunks: one fake id per word, so counts are exact --------------------------------------------------

COMMA = 9


def word_ids(texts):
    return [[COMMA if word == "," else 1 for word in text.replace(",", " , ").split()] for text in texts]


def lengths(chunks):
    return [len(ids) for ids, _ in chunks]


def test_a_full_chunk_moves_back_to_a_near_comma():
    near = chunk([("w " * 70 + ", " + "w " * 10, 1.0)], word_ids, COMMA)
    assert lengths(near) == [71, 10] and near[0][0][-1] == COMMA
    exactly_20 = chunk([("w " * 55 + ", " + "w " * 30, 1.0)], word_ids, COMMA)  # comma at 55: 75 - 55 = 20
    assert lengths(exactly_20) == [56, 30]
    far = chunk([("w " * 54 + ", " + "w " * 30, 1.0)], word_ids, COMMA)  # 21 back: the chunk is cut at 75
    assert lengths(far) == [75, 10]


def test_weights_follow_their_tokens_across_chunks():
    chunks = chunk([("w " * 74, 1.0), ("w w w", 1.5)], word_ids, COMMA)
    assert lengths(chunks) == [75, 2]
    assert chunks[0][1][-2:] == [1.0, 1.5] and chunks[1][1] == [1.5, 1.5]


def test_break_starts_a_new_chunk():
    assert lengths(chunk(parse("w w BREAK w"), word_ids, COMMA)) == [2, 1]
    assert lengths(chunk(parse("BREAK w"), word_ids, COMMA)) == [0, 1]  # A1111 keeps the empty chunk
    assert lengths(chunk([("w " * 75, 1.0)], word_ids, COMMA)) == [75]  # exactly full: no empty second chunk
    assert lengths(chunk(parse(""), word_ids, COMMA)) == [0]


# -- features: our encoder on the real CLIP vocabulary vs transformers, chunk by chunk ------------------

FAMILIES = {"sd1": dict(activation="quick_gelu", pad_id=49407), "sd2": dict(activation="gelu", pad_id=0)}


def encoders(family: str):
    """Ours and transformers' on the same random weights (a tiny tower, CLIP's full vocabulary)."""
    config = TextEncoderConfig(width=32, layers=2, heads=2, ff_width=64, **FAMILIES[family])
    theirs = CLIPTextModel(CLIPTextConfig(vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                          hidden_act=config.activation, bos_token_id=49406, eos_token_id=49407,
                                          attn_implementation="eager")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    ours = TextEncoder(config).eval()
    ours.load_state_dict({"transformer.text_model." + k.removeprefix("text_model."): v
                          for k, v in theirs.state_dict().items()}, strict=True)
    return ours, theirs, Tokenizer(pad_id=config.pad_id)


def row(ids, pad_id):
    """start + ids + end + padding: what every chunk must be encoded as (built here independently)."""
    return [49406, *ids, 49407] + [pad_id] * (75 - len(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_long_prompt_chunks_match_transformers(family):
    ours, theirs, tokenizer = encoders(family)
    pad_id = FAMILIES[family]["pad_id"]
    words = [f"word{i}" for i in range(60)]  # several BPE tokens each: well over two chunks
    prompt = " ".join(words)
    ids = tokenizer.bpe(prompt, add_special_tokens=False)["input_ids"]
    assert 150 < len(ids) <= 225
    with torch.no_grad():
        features = encode_prompts([prompt], tokenizer, ours)
        assert features.shape == (1, 3 * 77, 32)
        for k in range(3):
            expected = theirs(torch.tensor([row(ids[75 * k:75 * (k + 1)], pad_id)])).last_hidden_state
            assert (features[:, 77 * k:77 * (k + 1)] - expected).abs().max() <= ATOL, f"chunk {k}"


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_prompts_give_exactly_the_plain_tokenizers_features(family):
    ours, _, tokenizer = encoders(family)
    prompts = ["a photo of a cat", " ".join(["red"] * 75), ""]
    with torch.no_grad():
        assert torch.equal(encode_prompts(prompts, tokenizer, ours), ours(tokenizer(prompts)))


def test_original_emphasis_scales_tokens_and_restores_the_mean():
    ours, theirs, tokenizer = encoders("sd1")
    cat, dog = (tokenizer.token_ids([word])[0][0] for word in ("cat", "dog"))
    with torch.no_grad():
        got = encode_prompts(["a (cat:1.5) [dog]"], tokenizer, ours)
        a = tokenizer.token_ids(["a"])[0][0]
        z = theirs(torch.tensor([row([a, cat, dog], 49407)])).last_hidden_state
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1
    expected = z * weights[None, :, None]
    expected = expected * (z.mean() / expected.mean())
    assert (got - expected).abs().max() <= ATOL
    assert got.mean().item() == pytest.approx(z.mean().item(), abs=1e-6)


def test_emphasis_is_per_chunk_and_leaves_weight_one_alone():
    z = torch.randn(2, 77, 8)
    weights = torch.ones(2, 77)
    assert emphasize(z, weights) is z
    weights[1, 5] = 2.0
    out = emphasize(z, weights)
    assert torch.equal(out[0], z[0])  # a chunk of weight 1 is untouched by its neighbour's weights
    assert out[1].mean().item() == pytest.approx(z[1].mean().item(), abs=1e-6)


def test_prompts_of_a_batch_are_padded_with_empty_prompt_chunks():
    ours, _, tokenizer = encoders("sd2")
    long = " ".join(["red"] * 100)
    assert count_chunks(["a cat", long], tokenizer) == 2
    with torch.no_grad():
        batch = encode_prompts(["a cat", long], tokenizer, ours)
        wider = encode_prompts(["a cat"], tokenizer, ours, min_chunks=3)
        empty = ours(tokenizer([""]))
    assert batch.shape == (2, 154, 32) and wider.shape == (1, 231, 32)
    assert (batch[0, 77:] - empty[0]).abs().max() <= ATOL
    assert (wider[0, 154:] - empty[0]).abs().max() <= ATOL


def test_tokenizer_token_ids_have_no_special_tokens():
    tokenizer = Tokenizer()
    assert tokenizer.token_ids(["a cat", ""]) == [tokenizer(["a cat"])[0, 1:3].tolist(), []]
    assert (tokenizer.start_id, tokenizer.end_id) == (49406, 49407)


def test_readme_prompt_syntax_example_runs(tmp_path):
    """The README's example on the bundled demo model: two chunks, an image saved."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.search(r"## Prompt syntax\n.*?```python\n(.*?)```", readme, re.S).group(1)
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                        "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 154, 128])" in proc.stdout
    assert (tmp_path / "syntax.png").stat().st_size > 0
