"""The repository's configs/ folder: the model presets are the ones latentdiff finds, and the example
prompts file runs through `latentdiff txt2img --prompts-file` with every field it sets taking effect."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.config import preset, preset_names
from latentdiff.errors import InputError
from latentdiff.infotext import parse_parameters, to_fields
from latentdiff.sampling import sampler_spec
from latentdiff.train.recipe import Recipe, overrides_from_file, with_overrides

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
    expected = {}  # (prompt, seed) -> the fields that image was asked for
    for line in example.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        job = json.loads(line) if line.startswith("{") else {"prompt": line}
        for i in range(job.get("batch_size", 1)):
            expected[job["prompt"], job.get("seed", 5) + i] = job
    made = {}
    for path in tmp_path.iterdir():  # named by content (see test_cli): matched to their lines by prompt and seed
        with Image.open(path) as image:
            fields, _ = to_fields(parse_parameters(image.text["parameters"]))
            made[fields["prompt"], fields["seed"]] = fields | {"size": image.size}
    assert len(expected) >= 5 and sorted(made) == sorted(expected)
    for key, job in expected.items():
        fields = made[key]
        assert fields["size"] == (job.get("width", 64), job.get("height", 64)), key
        assert fields["steps"] == job.get("steps", 20) and fields["cfg_scale"] == job.get("cfg_scale", 7), key
        assert fields["negative_prompt"] == job.get("negative_prompt", ""), key
        spec, schedule = sampler_spec(job.get("sampler", "Euler a"))
        assert (fields["sampler"], fields["schedule"]) == (spec.name, schedule), key


def test_example_training_recipe_sets_every_field_it_names(tmp_path):
    """configs/train-quick.json, as `python -m latentdiff.train --recipe` reads it: each value lands in its field."""
    example = CONFIGS / "train-quick.json"
    recipe = with_overrides(Recipe(), overrides_from_file(example))
    for key, value in json.loads(example.read_text()).items():
        owner, _, name = key.rpartition(".")
        got = getattr(getattr(recipe, owner) if owner else recipe, name)
        assert got == (tuple(value) if isinstance(value, list) else value), key
    assert recipe != Recipe()
    (tmp_path / "bad.json").write_text('["unet.steps", 3]')
    with pytest.raises(InputError, match="must be a JSON object"):
        overrides_from_file(tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text('{"unet.stepz": 3}')
    with pytest.raises(InputError, match="unknown field 'unet.stepz'"):
        with_overrides(Recipe(), overrides_from_file(tmp_path / "unknown.json"))
