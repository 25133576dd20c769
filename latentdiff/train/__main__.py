"""`python -m latentdiff.train --out DIR [--resume] [--preset demo] [--set unet.steps=3000 ...]`

(`python -m latentdiff.train embedding|lora|dreambooth ...` personalises a model instead: personal_cli.py.)

Runs on one CPU or GPU as is, and data-parallel under
`accelerate launch --multi_gpu --num_processes N -m latentdiff.train ...` (on a machine without GPUs this
starts N CPU processes: accelerate's plain `--cpu` launcher starts only one without MPI).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config import config_from_dict, preset
from ..errors import InputError
from .personal_cli import METHODS
from .personal_cli import main as personal_main, run_command
from .recipe import Recipe, overrides_from_file, train, with_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m latentdiff.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (model, samples, logs, checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished stages")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", default="demo", help="model architecture preset (configs/presets/NAME.json)")
    model.add_argument("--config", type=Path, help="model architecture as a JSON file with ModelConfig keys")
    parser.add_argument("--recipe", type=Path, help="recipe overrides as a JSON file of FIELD: value, e.g. "
                                                    "configs/train-quick.json (--set applies after it)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="recipe overrides, e.g. unet.steps=3000 vae.batch_size=16 seed=1 (see recipe.Recipe)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="autocast dtype (default: fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in METHODS:  # `python -m latentdiff.train embedding|lora|dreambooth ...`: personal_cli.py
        return personal_main(argv, prog="python -m latentdiff.train")
    args = parse_args(argv)
    return run_command(lambda: _train(args))


def _train(args: argparse.Namespace) -> Path:
    if args.config is not None:
        if not args.config.is_file():
            raise InputError(f"--config {args.config}: no such file; pass a JSON file of ModelConfig keys or "
                             f"use --preset")
        config = config_from_dict(json.loads(args.config.read_text()), where=str(args.config))
    else:
        config = preset(args.preset)
    from_file = overrides_from_file(args.recipe) if args.recipe else []
    recipe = with_overrides(Recipe(), from_file + args.overrides)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return train(args.out, config, recipe, resume=args.resume, mixed_precision=args.mixed_precision,
                 cpu=args.cpu, progress=not args.no_progress)

if __name__ == "__main__":
    sys.exit(main())
