"""Train the demo autoencoder in several variants and score their reconstructions with the shapes analyzer.

Each variant is the recipe's autoencoder stage with some recipe fields set (as `python -m latentdiff.train
--set` takes them), plus `levels=N` for the number of resolution levels (3: downsampling factor 4, the
demo's; 4: SD's factor 8). Variants train side by side, one single-threaded process each; then each
reconstructs the same unseen training-split images (posterior mean) and the analyzer reads them back:
plain L1, and how often the reconstruction still shows the right background colour, shape colour, shape
and position, with the shape also per size and per shape.

    python tools/compare_autoencoders.py --variant levels=3 --variant levels=4 --set vae.steps=300   # f=4 vs f=8
    python tools/compare_autoencoders.py --variant edge_weight=0 vae.lr=6e-4 --variant edge_weight=1
"""

import argparse
import dataclasses
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from latentdiff.config import preset
from latentdiff.images import tensor_to_pil
from latentdiff.train.analyze import analyze, score
from latentdiff.train.evaluate import ATTRIBUTES, shape_by
from latentdiff.train.loop import draw_images, run_stage
from latentdiff.train.recipe import Recipe, vae_stage, with_overrides
from latentdiff.vae import AutoencoderKL

EVAL_START = 5_000_000  # far past any index a run trains on


def measure(variant: list[str], shared: list[str], images: int) -> dict:
    torch.set_num_threads(1)
    assignments = shared + variant
    levels = [int(a.partition("=")[2]) for a in assignments if a.startswith("levels=")]
    recipe = with_overrides(Recipe(), [a for a in assignments if not a.startswith("levels=")])
    recipe = dataclasses.replace(recipe, vae=dataclasses.replace(recipe.vae, checkpoint_every=10**9))
    config = preset("demo")
    vae_config = config.vae
    if levels:
        vae_config = dataclasses.replace(vae_config, channel_mult=(vae_config.channel_mult[0],) * levels[-1])
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(vae_config)
    stage = vae_stage(vae, recipe, config.resolution)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_stage(stage, Accelerator(cpu=True, mixed_precision="bf16"), Path(out), recipe.seed, progress=False)
    seconds = time.perf_counter() - began
    originals, _, labels = draw_images(recipe.seed, EVAL_START, images, config.resolution)
    with torch.no_grad():
        recon = vae.eval().decode(vae.encode(originals).mean).float().clamp(-1, 1)
    correct = [score(label, analyze(image)) for label, image in zip(labels, tensor_to_pil(recon))]
    items = [{"label": label, "correct": c} for label, c in zip(labels, correct)]
    shape_kept = {value: round(right / total, 3) for key in ("size", "shape")
                  for value, (right, total) in shape_by(items, key).items()}
    return {"variant": " ".join(variant) or "(recipe)", "downsample_factor": vae_config.downsample_factor,
            "steps": recipe.vae.steps, "train_seconds": round(seconds, 1),
            "l1": round((recon - originals).abs().mean().item(), 4),
            **{a: float(np.mean([c[a] for c in correct])) for a in ATTRIBUTES},
            "shape_by": shape_kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="*", action="append", required=True, metavar="FIELD=VALUE",
                        help="one variant's recipe fields (and levels=N); repeat for each variant")
    parser.add_argument("--set", dest="shared", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="recipe fields set in every variant, e.g. vae.steps=300")
    parser.add_argument("--images", type=int, default=400, help="unseen images reconstructed per variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with multiprocessing.get_context("spawn").Pool(len(args.variant)) as pool:
        results = pool.starmap(measure, [(variant, args.shared, args.images) for variant in args.variant])
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
