"""DiffEdit on the bundled demo model: recolour the circle the model drew, keep the background.

For each seed the demo model draws SOURCE (txt2img at its defaults), DiffEdit turns it toward TARGET with
the same seed, and the procedural analyzer (latentdiff/train/analyze.py) reads both images:
- target colour: the edited image's shape colour is yellow;
- background unchanged: the edited image's background colour name equals the original's;
- outside the mask: the mean absolute pixel difference (0..255) where the mask is 0.
Prints one line per seed and a summary; `--grid PATH` also writes a before / mask / after grid of the first
four seeds (a PNG carrying the command in its parameters).

    python tools/diffedit_demo.py --seeds 50 --steps 20 > benchmarks/diffedit-demo.txt
"""

import argparse
import time

import numpy as np
import torch
from PIL import PngImagePlugin

from latentdiff.images import tile_grid
from latentdiff.pipeline import Pipeline
from latentdiff.train.analyze import analyze

SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


def measure(pipe: Pipeline, seeds, steps: int) -> tuple[list[dict], list[tuple]]:
    rows, images = [], []
    for seed in seeds:
        before = pipe.txt2img(SOURCE, seed=seed, progress=False).images[0]
        result = pipe.diffedit(before, SOURCE, TARGET, seed=seed, steps=steps)
        a, b = analyze(before), analyze(result.image)
        keep = np.asarray(result.mask) == 0
        diff = np.abs(np.asarray(before).astype(int) - np.asarray(result.image).astype(int))[keep]
        rows.append(dict(seed=seed, before=a["color"], after=b["color"], background=(a["background"], b["background"]),
                         mask=float((~keep).mean()), outside=float(diff.mean()) if diff.size else 0.0))
        images.append((before, result.mask.convert("RGB"), result.image))
        print(f"seed {seed}: {a['color']} -> {b['color']}, background {a['background']} -> {b['background']}, "
              f"mask {rows[-1]['mask']:.0%}, outside the mask {rows[-1]['outside']:.2f}/255", flush=True)
    return rows, images


def summary(rows: list[dict]) -> str:
    n = len(rows)
    target = sum(r["after"] == "yellow" for r in rows)
    kept = sum(r["background"][0] == r["background"][1] for r in rows)
    return (f"{n} seeds: target colour {target}/{n} ({target / n:.0%}), background unchanged {kept}/{n} "
            f"({kept / n:.0%}), mean mask {np.mean([r['mask'] for r in rows]):.0%}, mean difference outside the "
            f"mask {np.mean([r['outside'] for r in rows]):.2f}/255")


def write_grid(images, path: str, command: str) -> None:
    grid = tile_grid(images, (128, 128))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"columns: before (txt2img '{SOURCE}'), mask, after (DiffEdit -> '{TARGET}')\n"
                                f"{command}")
    grid.save(path, pnginfo=info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grid", help="write a before / mask / after grid of the first four seeds here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(device="cpu", dtype=torch.float32)
    start = time.time()
    rows, images = measure(pipe, range(args.seeds), args.steps)
    print(summary(rows))
    print(f"({time.time() - start:.0f} s on one thread, fp32)")
    if args.grid:
        write_grid(images[:4], args.grid, f"python tools/diffedit_demo.py --seeds {args.seeds} --steps {args.steps}; "
                                          f"each row: latentdiff diffedit BEFORE.png --source '{SOURCE}' --target "
                                          f"'{TARGET}' --steps {args.steps} --seed SEED --dtype fp32")


if __name__ == "__main__":
    main()
