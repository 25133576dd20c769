"""The caption probe: which captions it compares, and that it sees a word the encoder cannot tell apart."""

import torch

from latentdiff.clip import TextEncoder, Tokenizer
from latentdiff.config import TextEncoderConfig
from latentdiff.train.caption_probe import ATTRIBUTES, caption_sensitivity, variants
from latentdiff.train.shapes import COLORS, POSITIONS, SHAPES

LABEL = {"shape": "circle", "color": "red", "background": "white", "size": "big", "position": "center"}


def test_variants_change_one_attribute_to_every_other_value():
    assert [v["shape"] for v in variants(LABEL, "shape")] == [s for s in SHAPES if s != "circle"]
    assert [v["position"] for v in variants(LABEL, "position")] == [p for p in POSITIONS if p != "center"]
    # A colour never becomes the other colour of the picture: 9 colours, minus its own, minus the other one.
    assert len(variants(LABEL, "color")) == len(COLORS) - 2
    assert all(v["color"] != v["background"] for a in ("color", "background") for v in variants(LABEL, a))
    assert variants(LABEL, "swap") == [{**LABEL, "color": "white", "background": "red"}]


def test_words_with_one_embedding_do_not_move_the_features():
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=2, ff_width=64)).eval()
    tokenizer = Tokenizer()
    embedding = encoder.transformer.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        ids = [tokenizer([shape])[0, 1].item() for shape in SHAPES]  # each shape name is one BPE token
        embedding[ids] = embedding[ids[0]].clone()
    result = caption_sensitivity(encoder, tokenizer, count=3)
    # The shapes' captions now give the same features to the float; every other change moves this random
    # encoder's summary by 0.03-0.08 (of norm 5.7).
    assert result["shape"] < 1e-6
    assert min(result[a] for a in ATTRIBUTES if a != "shape") > 0.01, result
