"""InstructPix2Pix on the demo model: the fine-tuned model's edits against the base model's img2img.

For each of --count held-out edits (latentdiff/train/instruct.py's edit triples drawn from the evaluation
stream, EVAL_SEED, not the training stream): the input is the procedural image, the instruction e.g.
"make the circle yellow". The InstructPix2Pix model edits it (img2img at strength 1, three-way guidance);
the baseline is the base demo model's plain img2img with the instruction as the prompt. The procedural
analyzer (latentdiff/train/analyze.py) reads every result:
- follows: the shape's colour is the instruction's;
- kept: shape, background colour and grid cell are the input's (each also counted alone).
Prints one line per edit and a summary; `--grid PATH` writes input / target / edit / baseline rows of the
first four edits (a PNG carrying the command in its parameters).

    python tools/instruct_demo.py --model weights/demo/instruct.safetensors --count 50
"""

import argparse
import time

import torch
from PIL import PngImagePlugin

from latentdiff.images import tile_grid
from latentdiff.loader import load_model
from latentdiff.pipeline import Pipeline
from latentdiff.train.analyze import analyze
from latentdiff.train.evaluate import EVAL_SEED
from latentdiff.train.instruct import edit_triple

KEPT = ("shape", "background", "position")


def judge(analysis: dict, label: dict, target: dict) -> dict:
    kept = {key: analysis[key] == label[key] for key in KEPT}
    return {"color": analysis["color"], "follows": analysis["color"] == target["color"], **kept,
            "kept": all(kept.values())}


def measure(edit_pipe: Pipeline, base_pipe: Pipeline, count: int, args) -> tuple[list[dict], list[tuple]]:
    rows, images = [], []
    for i in range(count):
        before, instruction, after, label, target = edit_triple(EVAL_SEED, i, edit_pipe.config.resolution)
        common = dict(steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale, seed=i, progress=False)
        edit = edit_pipe.img2img(before, instruction, strength=1.0, image_cfg_scale=args.image_cfg_scale,
                                 **common).images[0]
        baseline = base_pipe.img2img(before, instruction, strength=args.baseline_strength, **common).images[0]
        row = {"index": i, "instruction": instruction, "input": label["color"],
               "edit": judge(analyze(edit), label, target), "baseline": judge(analyze(baseline), label, target)}
        rows.append(row)
        images.append((before, after, edit, baseline))
        print(f"{i}: {label['color']} {label['shape']} on {label['background']}, '{instruction}': "
              f"edit {row['edit']['color']} (kept {row['edit']['kept']}), "
              f"baseline {row['baseline']['color']} (kept {row['baseline']['kept']})", flush=True)
    return rows, images


def summary(rows: list[dict]) -> str:
    n, lines = len(rows), []
    for side in ("edit", "baseline"):
        counts = {key: sum(r[side][key] for r in rows) for key in ("follows", "kept", *KEPT)}
        lines.append(f"{side:9} follows {counts['follows']}/{n} ({counts['follows'] / n:.0%}), kept {counts['kept']}/{n} "
                     f"({counts['kept'] / n:.0%}; " + ", ".join(f"{k} {counts[k]}/{n}" for k in KEPT) + ")")
    return "\n".join(lines)


def write_grid(images, path: str, parameters: str) -> None:
    grid = tile_grid(images, (128, 128))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    grid.save(path, pnginfo=info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the InstructPix2Pix model (tools/train_instruct_demo.py)")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--image-cfg-scale", type=float, default=1.5)
    parser.add_argument("--baseline-strength", type=float, default=0.75, help="the base model's img2img strength")
    parser.add_argument("--grid", help="write input / target / edit / baseline rows of the first four edits here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    edit_pipe = Pipeline(load_model(args.model), device="cpu", dtype=torch.float32)
    base_pipe = Pipeline.from_pretrained(device="cpu", dtype=torch.float32)
    start = time.time()
    rows, images = measure(edit_pipe, base_pipe, args.count, args)
    print(summary(rows))
    print(f"({time.time() - start:.0f} s on one thread, fp32)")
    if args.grid:
        command = (f"python tools/instruct_demo.py --model {args.model} --count {args.count} --steps {args.steps} "
                   f"--sampler '{args.sampler}' --cfg-scale {args.cfg_scale} --image-cfg-scale {args.image_cfg_scale} "
                   f"--baseline-strength {args.baseline_strength} --grid {args.grid}")
        each = (f"each row: latentdiff img2img INSTRUCTION --init-image INPUT.png --model {args.model} --strength 1 "
                f"--steps {args.steps} --sampler '{args.sampler}' --cfg-scale {args.cfg_scale} --image-cfg-scale "
                f"{args.image_cfg_scale} --seed ROW --dtype fp32")
        write_grid(images[:4], args.grid, "columns: input (procedural), target (the dataset's edit), InstructPix2Pix "
                                          f"edit, baseline (base model img2img at strength {args.baseline_strength}, "
                                          f"the instruction as prompt)\n{command}\n{each}")


if __name__ == "__main__":
    main()
