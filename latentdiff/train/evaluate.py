"""Prompt adherence of a shapes model: generate from captions of known labels, read the images back with
analyze(), and count agreement per attribute, separately for label combinations the training split shows
("seen") and for the held-out (shape, colour) pairs it never shows ("heldout").

The same count over the autoencoder's reconstructions of the labels' renderings (`--autoencoder`) gives
the ceiling the autoencoder puts on any generation: a shape it cannot reconstruct, the U-Net cannot draw.

    python tools/evaluate.py weights/demo/model.safetensors --count 100 --json scores.json
    python tools/evaluate.py weights/demo/model.safetensors --count 400 --autoencoder
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import LatentDiffError
from ..pipeline import Pipeline
from .analyze import analyze, score
from .shapes import make_caption, make_sample

ATTRIBUTES = ("background", "color", "shape", "position")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_SEED = 1234  # labels are drawn from another stream than training's (seed 0)


class _EveryPart:
    """Stands in for make_caption's random generator: keeps every optional part (size, position,
    background) and takes the first phrasing, so a caption names all the attributes analyze() reads."""

    def random(self) -> float:
        return 0.0

    def choice(self, options):
        return options[0]


def full_caption(label: dict) -> str:
    """e.g. "a small red circle in the top left corner on a white background"."""
    return make_caption(label, _EveryPart())


def evaluate(pipeline: Pipeline, *, count: int, split: str, steps: int = 20, sampler: str = "Euler a",
             cfg_scale: float = 7.0, autoencoder: bool = False, first_seed: int = 0) -> dict:
    """{"n", <attribute>: fraction correct, "items": [{caption, label, seen, correct}]} over `count` labels,
    item i generated with seed first_seed + i (another first_seed: another sample of the same prompts).

    The images are generated from the captions, or with `autoencoder` the labels' renderings passed
    through the autoencoder (one posterior sample, seeded by the item's index, then decoded)."""
    items = []
    for i in range(count):
        rendering, _, label = make_sample(EVAL_SEED, i, pipeline.config.resolution, split)
        caption = full_caption(label)
        if autoencoder:
            image = pipeline.decode(pipeline.encode_image(rendering, [torch.Generator().manual_seed(i)]))[0][0]
        else:
            image = pipeline.txt2img(caption, seed=first_seed + i, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                     progress=False).images[0]
        seen = analyze(image)
        items.append({"caption": caption, "label": label, "seen": seen, "correct": score(label, seen)})
    accuracy = {a: float(np.mean([item["correct"][a] for item in items])) for a in ATTRIBUTES}
    return {"n": count, **accuracy, "items": items}


def shape_by(items: list[dict], key: str) -> dict[str, tuple[int, int]]:
    """{value of label[key]: (shapes read right, items)}, e.g. key="size" -> {"small": (15, 31), ...}."""
    right, total = Counter(), Counter()
    for item in items:
        total[item["label"][key]] += 1
        right[item["label"][key]] += item["correct"]["shape"]
    return {value: (right[value], total[value]) for value in sorted(total)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a shapes model (.safetensors single file)")
    parser.add_argument("--count", type=int, default=100, help="images per split (seen and held-out)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: the pipeline's, as the CLI uses")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--autoencoder", action="store_true",
                        help="score the autoencoder's reconstructions of the renderings instead of generations")
    parser.add_argument("--json", type=Path, help="write the scores and every item here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipeline = Pipeline.from_pretrained(args.model, device="cpu", dtype=DTYPES.get(args.dtype))
        settings = {"steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
                    "autoencoder": args.autoencoder}
        results = {split: evaluate(pipeline, count=args.count, split=split, **settings) for split in ("train", "heldout")}
    except LatentDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'':10}" + "".join(f"{a:>12}" for a in ATTRIBUTES))
    for split, name in (("train", "seen"), ("heldout", "held-out")):
        print(f"{name:10}" + "".join(f"{results[split][a]:>12.1%}" for a in ATTRIBUTES))
    for split, name in (("train", "seen"), ("heldout", "held-out")):
        for key in ("size", "shape"):
            parts = shape_by(results[split]["items"], key)
            print(f"{name} shape by {key}: " + ", ".join(f"{v} {r}/{n}" for v, (r, n) in parts.items()))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), **settings, "dtype": str(pipeline.dtype),
                                         "seen": results["train"],
                                         "heldout": results["heldout"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
