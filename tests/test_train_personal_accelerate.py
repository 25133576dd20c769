"""Each `latentdiff train` method as a 2-process CPU run under `accelerate launch`: the processes split the
batch, only the main one makes DreamBooth's class images and writes files, and the result loads."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train_personal import setup  # noqa: F401  (the tiny base model and its instance images)

from latentdiff.formats.embeddings import read_embedding
from latentdiff.formats.lora import lora_deltas
from latentdiff.loader import load_model

METHOD_ARGS = {"embedding": ["--init-word", "star"], "lora": ["--token", "sks"],
               "dreambooth": ["--token", "sks", "--class-word", "star", "--class-images", "2"]}


@pytest.mark.parametrize("method", METHOD_ARGS)
def test_two_process_run_writes_a_result_that_loads(setup, method):  # noqa: F811
    root, base, images = setup
    out = root / f"two-process-{method}.safetensors"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "latentdiff.train", method, str(images), "-o", str(out), "--model", str(base), "--steps", "2",
               "--batch-size", "2", "--lr", "1e-2", "--log-every", "1", "--sample-steps", "1", "--no-progress",
               *METHOD_ARGS[method]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"wrote {out}") == 1  # the main process reports, once

    work = root / f"two-process-{method}-training"
    summary = json.loads((work / "training.json").read_text())
    assert (summary["processes"], summary["steps"]) == (2, 2)
    assert len((work / "logs" / f"{method}.jsonl").read_text().splitlines()) == 2
    assert (root / f"two-process-{method}-samples.png").is_file()
    base_model = load_model(base)
    if method == "embedding":
        embedding = read_embedding(out)
        assert embedding.vectors.shape == (1, base_model.config.text.width) and embedding.vectors.isfinite().all()
    elif method == "lora":
        deltas = lora_deltas(out, base_model)  # the up matrices start at zero: trained ones are not
        assert deltas and all(delta.abs().max() > 0 for delta in deltas.values())
    else:
        assert sorted(p.name for p in (work / "class-images").iterdir()) == [
            "0000.png", "0000.txt", "0001.png", "0001.txt"]
        trained, before = load_model(out), base_model.unet.state_dict()
        changed = [name for name, p in trained.unet.state_dict().items()
                   if not torch.equal(p.float(), before[name].half().float())]
        assert changed  # the U-Net was trained
