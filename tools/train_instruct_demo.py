"""Fine-tune the bundled demo model into a tiny InstructPix2Pix model (latentdiff/train/instruct.py).

    python tools/train_instruct_demo.py --out weights/demo/instruct.safetensors [--set steps=1000 lr=2e-4]

Writes OUT.safetensors and OUT-training/ (training.json, the loss log, resumable checkpoints: --resume).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from latentdiff.errors import LatentDiffError
from latentdiff.resources import demo_model
from latentdiff.train.instruct import InstructRecipe, train_instruct


def recipe_with(assignments: list[str]) -> InstructRecipe:
    recipe = InstructRecipe()
    types = {f.name: type(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"error: --set {assignment!r}: write FIELD=VALUE with FIELD one of {', '.join(types)}")
        recipe = dataclasses.replace(recipe, **{name: types[name](value)})
    return recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the model to write, NAME.safetensors")
    parser.add_argument("--base", type=Path, default=None, help="the text-to-image model (default: the demo model)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="InstructRecipe fields, e.g. steps=1000 batch_size=16 lr=2e-4")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = train_instruct(args.base or demo_model(), args.out, recipe_with(args.overrides), resume=args.resume,
                              progress=not args.no_progress)
    except LatentDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
