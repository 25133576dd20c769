"""How far a shapes model's text features move when a caption changes in one attribute.

The U-Net reads the caption through cross-attention over the text encoder's 77 token features. In the
demo models most cross-attention heads give half to nine tenths of their weight to the end token and the
padding after it, which in SD 1.x's layout are end tokens too: each has attended to the whole caption, so
they summarise it (the rest goes mostly to the start token and short words like "a"). If the summary
barely changes between "a red circle" and "a red square", the U-Net cannot draw the difference, however
long it trains. This probe measures exactly that:
for full captions of evaluation labels, the mean distance between the summary features of the caption and
of the caption with one attribute changed (every other value in turn), per attribute:

    python tools/caption_probe.py weights/demo/model.safetensors

"swap" exchanges the shape colour and the background ("a white circle on a red background" for "a red
circle on a white background"): the difference a model must see to bind each colour to its object.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..clip import TextEncoder, Tokenizer
from ..errors import LatentDiffError
from ..loader import load_model
from .evaluate import EVAL_SEED, full_caption
from .shapes import COLORS, POSITIONS, SHAPES, SIZES, make_sample

ATTRIBUTES = ("shape", "color", "background", "swap", "size", "position")


def variants(label: dict, attribute: str) -> list[dict]:
    """`label` with `attribute` changed to each other value it can take (colours stay distinct)."""
    if attribute == "swap":
        return [{**label, "color": label["background"], "background": label["color"]}]
    values = {"shape": SHAPES, "color": COLORS, "background": COLORS, "size": SIZES, "position": POSITIONS}[attribute]
    taken = {"color": label["background"], "background": label["color"]}.get(attribute)
    return [{**label, attribute: v} for v in values if v not in (label[attribute], taken)]


@torch.no_grad()
def summary_features(text_encoder: TextEncoder, tokenizer: Tokenizer, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's features from its end token on: (77 - caption tokens, width) per caption."""
    tokens = tokenizer(captions)
    features = text_encoder(tokens).float()
    ends = (tokens == text_encoder.cfg.vocab_size - 1).int().argmax(dim=1)
    return [f[end:] for f, end in zip(features, ends.tolist())]


def caption_sensitivity(text_encoder: TextEncoder, tokenizer: Tokenizer, count: int = 20) -> dict[str, float]:
    """{attribute: mean distance of the summary features} and "norm": their mean norm, over `count` labels."""
    distances = {a: [] for a in ATTRIBUTES}
    norms = []
    for i in range(count):
        label = make_sample(EVAL_SEED, i, 16, "train")[2]
        base = summary_features(text_encoder, tokenizer, [full_caption(label)])[0]
        norms.append(base.norm(dim=-1).mean().item())
        for attribute in ATTRIBUTES:
            others = summary_features(text_encoder, tokenizer, [full_caption(v) for v in variants(label, attribute)])
            # The end token moves with the caption's length (e.g. "top left" vs "top"): compare the last tokens.
            distances[attribute] += [(base[-len(o):] - o[-len(base):]).norm(dim=-1).mean().item() for o in others]
    return {"norm": float(np.mean(norms)), **{a: float(np.mean(d)) for a, d in distances.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/caption_probe.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a shapes model (.safetensors single file)")
    parser.add_argument("--count", type=int, default=20, help="evaluation labels to vary")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
    except LatentDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = model.config.text
    result = caption_sensitivity(model.text_encoder, Tokenizer(pad_id=config.pad_id, max_length=config.max_length),
                                 args.count)
    print(f"mean norm of the summary features: {result.pop('norm'):.2f}; their mean change when one attribute changes:")
    for attribute, distance in result.items():
        print(f"  {attribute:12}{distance:8.2f}")
    return 0
