"""Inpainting and outpainting measured on a shapes model (the bundled demo), by the procedural analyzer.

Case i draws a label from the evaluation stream (evaluate.EVAL_SEED) and generates its full caption at seed i.
- Inpainting: the mask is the drawn shape's bounding box (pixels far from the background colour, the
  analyzer's rule) grown by MASK_MARGIN px; the prompt asks for another shape in another colour on the same
  background. Scored: the analyzer reads the new colour; and the mean absolute change of the pixels beyond
  the blur band (farther from the mask than the blur window's half width) in 1/255, after the paste-back,
  before it (the latent blend alone), and for the autoencoder's round trip of the original (its floor).
- Outpainting: the image is extended by OUTPAINT_MARGINS with its own caption. Scored: the median colour of
  the new area (beyond the blur band) is the original image's background colour, as the analyzer reads it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LatentDiffError
from ..inpaint import OUTPAINT_SIDES
from ..pipeline import Pipeline
from .analyze import _MIN_CONTRAST, _mean3x3, analyze, nearest_color
from .evaluate import EVAL_SEED, full_caption
from .shapes import COLORS, SHAPES, make_sample

MASK_MARGIN = 4
OUTPAINT_MARGINS = (32, 32, 0, 0)  # left, right, top, bottom: a 128x64 canvas from a 64x64 image
SETTINGS = dict(steps=20, sampler="Euler a", cfg_scale=7.0, strength=1.0, mask_blur=2, inpainting_fill="fill")


def shape_mask(image: Image.Image, background: str, margin: int = MASK_MARGIN) -> Image.Image | None:
    """The box around the pixels far from the background colour, grown by `margin` (None: no shape)."""
    rgb = np.asarray(image, dtype=np.float32)
    far = np.linalg.norm(_mean3x3(rgb) - np.array(COLORS[background], dtype=np.float32), axis=2) > _MIN_CONTRAST
    if not far.any():
        return None
    ys, xs = np.nonzero(far)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (max(xs.min() - margin, 0), max(ys.min() - margin, 0),
                     min(xs.max() + 1 + margin, image.width), min(ys.max() + 1 + margin, image.height)))
    return mask


def beyond_band(mask: Image.Image, blur: int) -> np.ndarray:
    """Pixels farther from the mask than the blur window's half width: where nothing may change."""
    reach = int(2.5 * blur + 0.5) + 1
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) > 0).float()[None, None]
    return (F.max_pool2d(m, 2 * reach + 1, stride=1, padding=reach)[0, 0] == 0).numpy()


def round_trip(pipe: Pipeline, image: Image.Image, seed: int) -> Image.Image:
    """The image through the autoencoder (one seeded posterior sample): the floor of any latent-space edit."""
    return pipe.decode(pipe.encode_image(image, [torch.Generator().manual_seed(seed)]))[0][0]


def other(rng: np.random.Generator, choices, *avoid):
    return str(rng.choice([c for c in choices if c not in avoid]))


def original_case(pipe: Pipeline, i: int, settings: dict) -> tuple[dict, str, Image.Image]:
    """Case i's label, its full caption and the image the model draws for it at seed i."""
    _, _, label = make_sample(EVAL_SEED, i, pipe.config.resolution, "train")
    caption = full_caption(label)
    return label, caption, pipe.txt2img(caption, seed=i, steps=settings["steps"], sampler=settings["sampler"],
                                        cfg_scale=settings["cfg_scale"], progress=False).images[0]


def inpaint_case(pipe: Pipeline, i: int, settings: dict, original_case) -> dict:
    label, caption, original = original_case
    seen = analyze(original)["background"]
    mask = shape_mask(original, seen)
    rng = np.random.default_rng(i)
    target = dict(label, shape=other(rng, SHAPES, label["shape"]),
                  color=other(rng, COLORS, label["color"], label["background"], seen))
    if mask is None:
        return {"caption": caption, "target": full_caption(target), "no_shape": True, "color_right": False}
    result = pipe.img2img(original, full_caption(target), mask=mask, seed=1000 + i, progress=False,
                          return_latents=True, **settings)
    edited = result.images[0]
    keep = beyond_band(mask, settings["mask_blur"])

    def change(image):
        diff = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(original, dtype=np.float32))[keep]
        return float(diff.mean()) if diff.size else 0.0

    read = analyze(edited)["color"]
    return {"caption": caption, "target": full_caption(target), "read": read, "color_right": read == target["color"],
            "kept_change": change(edited), "kept_change_before_paste": change(pipe.decode(result.latents)[0][0]),
            # the autoencoder's own round trip of the original: the floor of any latent-space method
            "kept_change_autoencoder": change(round_trip(pipe, original, i))}


def outpaint_case(pipe: Pipeline, i: int, settings: dict, original_case) -> dict:
    _, caption, original = original_case
    background = analyze(original)["background"]
    margins = dict(zip(OUTPAINT_SIDES, OUTPAINT_MARGINS))
    result = pipe.img2img(original, caption, outpaint=margins, seed=1000 + i, progress=False, **settings)
    new = np.ones((result.images[0].height, result.images[0].width), dtype=bool)
    left, right, top, bottom = OUTPAINT_MARGINS
    new[top:new.shape[0] - bottom, left:new.shape[1] - right] = False
    old = Image.fromarray((~new * 255).astype(np.uint8))
    area = new & beyond_band(old, settings["mask_blur"])
    median = np.median(np.asarray(result.images[0])[area].reshape(-1, 3), axis=0)
    read = nearest_color(median)
    return {"caption": caption, "background": background, "read": read, "continues": read == background}


def measure(pipe: Pipeline, count: int, settings: dict = SETTINGS) -> dict:
    originals = [original_case(pipe, i, settings) for i in range(count)]
    inpainted = [inpaint_case(pipe, i, settings, originals[i]) for i in range(count)]
    outpainted = [outpaint_case(pipe, i, settings, originals[i]) for i in range(count)]
    kept = [c["kept_change"] for c in inpainted if "kept_change" in c]
    return {"count": count, "settings": settings,
            "inpaint_color_right": float(np.mean([c["color_right"] for c in inpainted])),
            "inpaint_kept_change_mean": float(np.mean(kept)) if kept else None,
            "inpaint_kept_change_max": float(np.max(kept)) if kept else None,
            # the latent blend alone (the decode before the kept pixels are pasted back)
            "inpaint_kept_change_before_paste_mean": float(np.mean([c["kept_change_before_paste"] for c in inpainted
                                                                    if "kept_change" in c])) if kept else None,
            "inpaint_kept_change_autoencoder_mean": float(np.mean([c["kept_change_autoencoder"] for c in inpainted
                                                                   if "kept_change" in c])) if kept else None,
            "outpaint_background_continues": float(np.mean([c["continues"] for c in outpainted])),
            "inpaint_cases": inpainted, "outpaint_cases": outpainted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/inpaint_demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a shapes model (default: the bundled demo)")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the figures and every case here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe = Pipeline.from_pretrained(args.model, device="cpu")
        figures = measure(pipe, args.count)
    except LatentDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.count} cases, {pipe.dtype}, {SETTINGS}")
    print(f"inpaint: new colour read in {figures['inpaint_color_right']:.0%}; pixels beyond the blur band changed by "
          f"{figures['inpaint_kept_change_mean']:.3f}/255 on average "
          f"(max case {figures['inpaint_kept_change_max']:.3f}; "
          f"before the paste-back {figures['inpaint_kept_change_before_paste_mean']:.3f}/255; the autoencoder's round "
          f"trip of the original alone {figures['inpaint_kept_change_autoencoder_mean']:.3f}/255)")
    print(f"outpaint: background continues in {figures['outpaint_background_continues']:.0%}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model or "demo"), "dtype": str(pipe.dtype), **figures},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
