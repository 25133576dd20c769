"""Measure the autoencoder's downsampling factor for the demo model: f=4 against SD's f=8.

Trains the demo autoencoder twice with the same stage-1 recipe, differing only in the number of
downsampling levels, then reconstructs held-out images and reads them back with the shapes analyzer:
plain L1, and how often the reconstruction still shows the right background colour, shape colour and shape.

    python tools/compare_vae_factor.py --steps 300 --json factor.json   # both factors, one process each
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
from latentdiff.train.autoencoder import autoencoder_stage, init_posterior_std
from latentdiff.train.loop import draw_images, run_stage
from latentdiff.train.recipe import Recipe
from latentdiff.vae import AutoencoderKL

EVAL_IMAGES = 128
EVAL_START = 5_000_000  # far past any index a short run trains on


def measure(levels: int, steps: int, low_res_steps: int) -> dict:
    torch.set_num_threads(1)
    config = preset("demo")
    vae_config = dataclasses.replace(config.vae, channel_mult=(config.vae.channel_mult[0],) * levels)
    recipe = Recipe()
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(vae_config)
    init_posterior_std(vae, recipe.initial_posterior_std)
    stage_recipe = dataclasses.replace(recipe.vae, steps=steps, checkpoint_every=10**9)
    stage = autoencoder_stage(vae, stage_recipe, seed=recipe.seed, image_size=config.resolution,
                              low_res=recipe.vae_low_res, low_res_steps=low_res_steps, kl_weight=recipe.kl_weight)
    began = time.perf_counter()
    run_stage(stage, Accelerator(cpu=True, mixed_precision="bf16"), Path(tempfile.mkdtemp()), recipe.seed,
              progress=False)
    seconds = time.perf_counter() - began
    images, _, labels = draw_images(recipe.seed, EVAL_START, EVAL_IMAGES, config.resolution)
    with torch.no_grad():
        recon = vae.eval().decode(vae.encode(images).mean).float().clamp(-1, 1)
    correct = [score(label, analyze(image)) for label, image in zip(labels, tensor_to_pil(recon))]
    return {"downsample_factor": vae_config.downsample_factor, "latent": [vae_config.latent_channels,
            config.resolution // vae_config.downsample_factor], "steps": steps, "train_seconds": round(seconds, 1),
            "l1": (recon - images).abs().mean().item(),
            **{a: float(np.mean([c[a] for c in correct])) for a in ("background", "color", "shape", "position")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--low-res-steps", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(measure, [(levels, args.steps, args.low_res_steps) for levels in (3, 4)])
    for r in results:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
