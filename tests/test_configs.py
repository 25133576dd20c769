"""The repository's configs/ folder: the model presets are the ones latentdiff finds, and the example
prompts file runs through `latentdiff txt2img --prompts-file` with every field it sets taking effect."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from latentdiff.config import preset, preset_names

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error"}


def test_presets_are_the_files_in_configs_presets():
    names = sorted(p.stem for p in (CONFIGS / "presets").glob("*.json"))
    assert names == preset_names() and {"demo", "sd1", "sd2-base", "sd2-v"} <= set(names)
    assert [preset(n).name for n in names] == names


def test_example_prompts_file_runs_with_the_demo_model(tmp_path):
    example = CONFIGS / "demo-prompts.jsonl"
    run = subprocess.run([sys.executable, "-m", "latentdiff.cli", "txt2img", "--prompts-file", str(example),
                          "-o", str(tmp_path), "--seed", "5", "--quiet"],
                         env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {}  # file name -> the fields that image was asked for
    for number, line in enumerate(example.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        job = json.loads(line) if line.startswith("{") else {"prompt": line}
        for i in range(job.get("batch_size", 1)):
            expected[f"{number:05d}-{i:03d}.png"] = job | {"seed": job.get("seed", 5) + i}
    assert len(expected) >= 5 and sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for name, job in expected.items():
        with Image.open(tmp_path / name) as image:
            text, size = image.text["parameters"], image.size
        assert size == (job.get("width", 64), job.get("height", 64)), name
        # the sampler is not checked: its spelling in the parameters (one name or name + schedule) may change
        wanted = [job["prompt"] + "\n", f"Seed: {job['seed']},", f"Steps: {job.get('steps', 20)},",
                  f"CFG scale: {job.get('cfg_scale', 7):g},", f"Size: {size[0]}x{size[1]}"]
        if "negative_prompt" in job:
            wanted.append(f"\nNegative prompt: {job['negative_prompt']}\n")
        assert all(w in text for w in wanted), (name, [w for w in wanted if w not in text], text)
