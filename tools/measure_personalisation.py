"""Teach the bundled demo model a concept it never saw, by each method, and score the results.

    python tools/measure_personalisation.py --out runs/personal            # everything
    python tools/measure_personalisation.py --out runs/personal --only embedding baseline

The concept is a green star, a held-out (shape, colour) pair of the procedural dataset: the demo model's
training never drew one. Five instance images come from the dataset's held-out split, captioned
"a [name] on a BG background". Each method runs as its command (`python -m latentdiff.train METHOD`) under
GNU time (wall clock from the command to the written file, peak RSS). Then 8 background colours x 10 seeds
of "a [name] on a BG background" are generated with the result and read back by the procedural analyzer:
the concept is right when the shape is a star and its colour green; the background when it is BG. The
baseline is the base model prompted in plain words ("a green star on a BG background"). DreamBooth runs with
and without the prior-preservation loss, its prior on "a star" or on the base model's own training
captions (OUT/class-prompts*.txt, --class-prompts), and with the guards against drift (caption dropout,
EMA, several class images a step, frozen convolutions, a learned identifier). Every DreamBooth model in OUT
is scored on the evaluation's 100 seen prompts against the base model (train.evaluate), with three sets of
seeds (PRIOR_FIRST_SEEDS).
Results go to OUT/results.json; the table is printed. Re-running skips the runs and scores already in OUT.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from latentdiff.formats.embeddings import read_embedding
from latentdiff.loader import load_model
from latentdiff.pipeline import Pipeline
from latentdiff.resources import demo_model
from latentdiff.train.analyze import analyze
from latentdiff.train.evaluate import evaluate
from latentdiff.train.shapes import COLORS, make_sample

SHAPE, COLOR = "star", "green"
BACKGROUNDS = [c for c in COLORS if c != COLOR]  # 8
SEEDS = range(10)
# in RUNS' arguments: files of the base model's first N training captions, written by class_prompts_file
CLASS_PROMPTS = {"OUT/class-prompts.txt": 100, "OUT/class-prompts-500.txt": 500, "OUT/class-prompts-1000.txt": 1000}
COMMON = ["--noise-offset", "0.4", "--batch-size", "5", "--log-every", "25", "--save-every", "100",
          "--no-progress", "--sample-prompt", "a [name] on a red background"]


def guarded(key: str, steps: int, seeds: range, *extra: str) -> dict:
    """RUNS entries dreambooth-KEY (training seed 0) and dreambooth-KEY-seedN: DreamBooth with the guards
    against drift, a prior over 500 training captions at half weight, `extra` arguments last."""
    runs = {}
    for seed in seeds:
        name = f"{key}-seed{seed}" if seed else key
        runs[f"dreambooth-{name}"] = ("dreambooth", f"gstar-db-{name}", "sks star", [
            "--token", "sks", "--class-word", "star", "--class-prompts", "OUT/class-prompts-500.txt",
            "--class-images", "500", "--prior-weight", "0.5", "--caption-dropout", "0.1", "--steps", str(steps),
            "--lr", "2e-4", "--seed", str(seed), *extra])
    return runs


# (name, method, output stem, what [name] is in prompts, arguments). Learning rates and steps for this
# 14 M-parameter 64 px model, not SD 1.5's defaults (personal_cli.DEFAULTS): see benchmarks/personalisation.md.
RUNS = {
    "embedding": ("embedding", "gstar", "gstar", ["--init-word", "star", "--vectors", "2", "--steps", "400",
                                                  "--lr", "5e-3"]),
    "lora": ("lora", "gstar-lora", "sks star", ["--token", "sks star", "--rank", "8", "--targets", "attention,ff",
                                                "--steps", "400", "--lr", "2e-3"]),
    "dreambooth": ("dreambooth", "gstar-db", "sks star", ["--token", "sks", "--class-word", "star", "--class-images",
                                                          "50", "--steps", "300", "--lr", "2e-4"]),
    "dreambooth-no-prior": ("dreambooth", "gstar-db-noprior", "sks star",
                            ["--token", "sks", "--class-word", "star", "--prior-weight", "0", "--steps", "300",
                             "--lr", "2e-4"]),
    # twice the steps: the 300-step run drew some stars in the class images' colours (orange, white)
    "dreambooth-600": ("dreambooth", "gstar-db-600", "sks star", ["--token", "sks", "--class-word", "star",
                                                                  "--class-images", "50", "--steps", "600",
                                                                  "--lr", "2e-4"]),
    # half the learning rate over the 600 steps: does the prior drift less?
    "dreambooth-600-lr1e-4": ("dreambooth", "gstar-db-600-lr1e-4", "sks star",
                              ["--token", "sks", "--class-word", "star", "--class-images", "50", "--steps", "600",
                               "--lr", "1e-4"]),
    # the prior over the base model's own training captions (every shape and colour), not one class
    "dreambooth-seen": ("dreambooth", "gstar-db-seen", "sks star",
                        ["--token", "sks", "--class-word", "star", "--class-prompts", "OUT/class-prompts.txt",
                         "--class-images", "100", "--steps", "300", "--lr", "2e-4"]),
    "dreambooth-seen-600": ("dreambooth", "gstar-db-seen-600", "sks star",
                            ["--token", "sks", "--class-word", "star", "--class-prompts", "OUT/class-prompts.txt",
                             "--class-images", "100", "--steps", "600", "--lr", "2e-4"]),
    "dreambooth-seen-600-w2": ("dreambooth", "gstar-db-seen-600-w2", "sks star",
                               ["--token", "sks", "--class-word", "star", "--class-prompts", "OUT/class-prompts.txt",
                                "--class-images", "100", "--prior-weight", "2", "--steps", "600", "--lr", "2e-4"]),
    # the identifier's meaning carried by the text encoder too, so the U-Net need move less
    "dreambooth-seen-600-text": ("dreambooth", "gstar-db-seen-600-text", "sks star",
                                 ["--token", "sks", "--class-word", "star", "--class-prompts", "OUT/class-prompts.txt",
                                  "--class-images", "100", "--train-text-encoder", "--steps", "600", "--lr", "2e-4"]),
    # the guards against drift (caption dropout, the weights' moving average from the base weights, three
    # class images a step), the U-Net's convolutions frozen and the identifier's embedding learned with its
    # transformer blocks (pivotal tuning): four training seeds. The earlier guarded runs of
    # benchmarks/personalisation.md were measured at commit e9913cd, whose EMA warmed up from 0.1.
    **guarded("pivotal", 400, range(4), "--prior-batch", "3", "--ema-decay", "0.995", "--conv-lr-scale", "0",
              "--train-identifier"),
    # the same without the prior-preservation loss: what it buys
    "dreambooth-pivotal-no-prior": ("dreambooth", "gstar-db-pivotal-noprior", "sks star",
                                    ["--token", "sks", "--class-word", "star", "--prior-weight", "0",
                                     "--caption-dropout", "0.1", "--steps", "400", "--lr", "2e-4", "--ema-decay",
                                     "0.995", "--conv-lr-scale", "0", "--train-identifier"]),
}
# the seen prompts are scored with seeds 0-99 and, where the model is at hand, two more samples of them
PRIOR_FIRST_SEEDS = (0, 1000, 2000)


def prior_key(name: str, first_seed: int) -> str:
    """The results' key of a model's seen-prompt scores: the plain name for seeds 0-99, as earlier versions
    of this script wrote them, name@FIRST for the other seed sets."""
    return name if first_seed == 0 else f"{name}@{first_seed}"


def instance_folder(folder: Path, count: int = 5) -> Path:
    """The first `count` green stars of the held-out split (seed 0), with .txt captions naming [name]."""
    folder.mkdir(parents=True, exist_ok=True)
    found, index = 0, 0
    while found < count:
        image, _, label = make_sample(0, index, 64, "heldout")
        index += 1
        if (label["shape"], label["color"]) != (SHAPE, COLOR):
            continue
        image.save(folder / f"{found}.png")
        (folder / f"{found}.txt").write_text(f"a [name] on {'an' if label['background'][0] in 'aeiou' else 'a'} "
                                             f"{label['background']} background\n")
        found += 1
    return folder


def class_prompts_file(path: Path, count: int = 100) -> Path:
    """The first `count` captions of the base model's training stream (seed 0, "train" split, as the
    training drew them), one a line: a prior over every seen shape and colour, not only stars. The
    evaluation's prompts are other labels (train.evaluate.EVAL_SEED)."""
    path.write_text("".join(make_sample(0, i, 64, "train")[1] + "\n" for i in range(count)))
    return path


def prompt(concept: str, background: str) -> str:
    return f"a {concept} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"


def concept_scores(pipeline: Pipeline, concept: str) -> dict:
    items = []
    for background in BACKGROUNDS:
        for seed in SEEDS:
            image = pipeline.txt2img(prompt(concept, background), seed=seed, steps=20, sampler="Euler a",
                                     cfg_scale=7.0, progress=False).images[0]
            seen = analyze(image)
            items.append({"background": background, "seed": seed, "seen": seen,
                          "concept": seen["shape"] == SHAPE and seen["color"] == COLOR,
                          "background_right": seen["background"] == background})
    n = len(items)
    return {"n": n, "concept": sum(i["concept"] for i in items) / n,
            "shape": sum(i["seen"]["shape"] == SHAPE for i in items) / n,
            "color": sum(i["seen"]["color"] == COLOR for i in items) / n,
            "background": sum(i["background_right"] for i in items) / n, "items": items}


def timed(command: list[str], log: Path) -> dict:
    """Run `command` under GNU time -v, its output into `log`; its figures (time_figures)."""
    with log.open("w") as f:
        subprocess.run(["/usr/bin/time", "-v", *command], stdout=f, stderr=subprocess.STDOUT, check=True)
    return time_figures(log)


def time_figures(log: Path) -> dict:
    """Wall clock, CPU seconds (user + system), the share of a core it got, and peak RSS from GNU time's
    report. On a shared machine the CPU seconds say what the run costs; wall time depends on the load."""
    text = log.read_text()

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (\S+)", text).group(1)

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"wall_seconds": round(seconds, 1),
            "cpu_seconds": round(float(field("User time (seconds)")) + float(field("System time (seconds)")), 1),
            "cpu_share": field("Percent of CPU this job got"),
            "peak_rss_mb": round(int(field("Maximum resident set size (kbytes)")) / 1024, 1)}


def pipeline_for(name: str, out: Path) -> Pipeline:
    if name == "baseline":
        return Pipeline(load_model(demo_model()), device="cpu", dtype=torch.float32)
    method, stem = RUNS[name][:2]
    path = out / f"{stem}.safetensors"
    if method == "dreambooth":
        return Pipeline(load_model(path), device="cpu", dtype=torch.float32)
    pipeline = Pipeline(load_model(demo_model()), device="cpu", dtype=torch.float32)
    if method == "embedding":
        embedding = read_embedding(path)
        pipeline.embeddings = {embedding.name: embedding}
    else:
        pipeline.set_loras([(path, 1.0)])
    return pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=[*RUNS, "baseline", "prior"], help="default: all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    images = instance_folder(out / "instances")
    class_prompts = {placeholder: str(class_prompts_file(out / Path(placeholder).name, count))
                     for placeholder, count in CLASS_PROMPTS.items()}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save():
        results_file.write_text(json.dumps(results, indent=1))

    wanted = args.only or [*RUNS, "baseline", "prior"]
    for name in [n for n in RUNS if n in wanted]:
        method, stem, concept, extra = RUNS[name]
        output = out / f"{stem}.safetensors"
        entry = results.setdefault(name, {})
        if not output.exists():
            command = [sys.executable, "-m", "latentdiff.train", method, str(images), "-o", str(output),
                       "--threads", str(args.threads), *COMMON,
                       *(class_prompts.get(a, a) for a in extra)]
            entry["command"] = " ".join(command[1:])
            entry |= timed(command, out / f"{stem}.log")
            entry["bytes"] = output.stat().st_size
            save()
        if "cpu_seconds" not in entry:  # results of an earlier version of this script
            entry |= time_figures(out / f"{stem}.log")
            save()
        if "concept" not in entry:
            entry["concept"] = concept_scores(pipeline_for(name, out), concept)
            save()
        print(f"{name}: concept {entry['concept']['concept']:.0%} background {entry['concept']['background']:.0%} "
              f"wall {entry['wall_seconds']} s (CPU {entry['cpu_seconds']} s, {entry['cpu_share']} of a core) "
              f"peak {entry['peak_rss_mb']} MB, {entry['bytes']} bytes")
    if "baseline" in wanted:
        entry = results.setdefault("baseline", {})
        if "concept" not in entry:
            entry["concept"] = concept_scores(pipeline_for("baseline", out), f"{COLOR} {SHAPE}")
            save()
        print(f"baseline: concept {entry['concept']['concept']:.0%} background {entry['concept']['background']:.0%}")
    if "prior" in wanted:
        prior = results.setdefault("prior", {})
        for name in ("baseline", *(n for n in RUNS if RUNS[n][0] == "dreambooth")):
            missing = [f for f in PRIOR_FIRST_SEEDS if prior_key(name, f) not in prior]
            if missing and (name == "baseline" or (out / f"{RUNS[name][1]}.safetensors").exists()):
                pipeline = pipeline_for(name, out)
                for first_seed in missing:
                    scores = evaluate(pipeline, count=100, split="train", first_seed=first_seed)
                    prior[prior_key(name, first_seed)] = {k: scores[k] for k in
                                                          ("n", "background", "color", "shape", "position")}
                    save()
            samples = [prior[prior_key(name, f)] for f in PRIOR_FIRST_SEEDS if prior_key(name, f) in prior]
            if samples:
                mean = {a: sum(p[a] for p in samples) / len(samples) for a in ("background", "color", "shape")}
                print(f"seen prompts, {name} ({100 * len(samples)} images): background {mean['background']:.1%} "
                      f"colour {mean['color']:.1%} shape {mean['shape']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
