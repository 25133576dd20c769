"""The training loop every stage shares: data order, per-step randomness, optimizer, logging, checkpoints.

Everything random in a step is drawn from a generator seeded by (seed, stage, step, process), and the
images of a step are dataset indices computed from the step number, so a run resumed from a checkpoint
makes exactly the draws the uninterrupted run would have made: no RNG state needs saving.

Data parallelism is accelerate's: each process draws its own slice of the global batch, the prepared
(DDP) module averages the gradients, and only the main process writes files.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from .ema import EMA
from .shapes import image_to_tensor, make_sample
from .state import has_state, load_state, save_state

STAGES = ("vae", "text", "unet", "embedding", "lora", "dreambooth", "instruct")  # new ones appended: indices seed steps


@dataclass(frozen=True)
class StageRecipe:
    """Optimisation settings of one stage. `batch_size` is global: split evenly over processes."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr * min_lr_ratio at the last step
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 25
    checkpoint_every: int = 500

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one (stage, step, process): draws are made on the CPU and moved, so a seed
    gives the same training run on any device."""
    entropy = np.random.SeedSequence([seed, STAGES.index(stage), step, rank]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def draw_images(seed: int, start: int, count: int, image_size: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Samples start .. start + count - 1 of the procedural training stream: ((count, 3, S, S), captions, labels)."""
    samples = [make_sample(seed, start + i, image_size, "train") for i in range(count)]
    images = torch.stack([image_to_tensor(image) for image, _, _ in samples])
    return images, [caption for _, caption, _ in samples], [label for _, _, label in samples]


@dataclass
class Stage:
    """One stage of the recipe: a module whose forward(batch) returns (loss, {name: scalar}) and a
    function making this process's batch of a step from (step, first sample index, sample count, generator).
    `lr_scale` gives a parameter's learning rate, by its name in the module, as a multiple of the recipe's."""

    name: str
    module: nn.Module
    make_batch: Callable[[int, int, int, torch.Generator], dict]
    recipe: StageRecipe
    ema: EMA | None = None
    lr_scale: Callable[[str], float] | None = None


def local_batch_size(batch_size: int, accelerator: Accelerator) -> int:
    if batch_size % accelerator.num_processes:
        raise InputError(f"batch size {batch_size} does not split over {accelerator.num_processes} processes; "
                         f"use a multiple of {accelerator.num_processes}")
    return batch_size // accelerator.num_processes


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LossLog:
    """JSON lines `{"step", "lr", "loss", <parts>, "seconds"}` ("step" counts the updates done); on resume,
    lines past the checkpoint the run restarts from are dropped, so the log reads as one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_stage(stage: Stage, accelerator: Accelerator, out: Path, seed: int, progress: bool = True) -> dict:
    """Train `stage.module` in place (resuming from out/checkpoints/<stage> if there is a checkpoint);
    returns the stage's summary {"steps", "seconds"}. A finished stage only loads its weights."""
    recipe, name = stage.recipe, stage.name
    folder = out / "checkpoints" / name
    module = stage.module.to(accelerator.device)
    groups: dict[float, list[nn.Parameter]] = {}
    for parameter_name, p in module.named_parameters():
        if p.requires_grad:
            groups.setdefault(stage.lr_scale(parameter_name) if stage.lr_scale else 1.0, []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps} for ps in groups.values()], lr=recipe.lr, betas=(0.9, 0.999),
                                  weight_decay=0.0)
    step, seconds = 0, 0.0
    if has_state(folder):
        sidecar = load_state(folder, module=module, optimizer=optimizer, ema=stage.ema,
                             scaler=accelerator.scaler)
        step, seconds = sidecar["step"], sidecar["seconds"]
    if step >= recipe.steps:
        return {"steps": step, "seconds": seconds}

    model, optimizer = accelerator.prepare(module, optimizer)
    model.train()
    local = local_batch_size(recipe.batch_size, accelerator)
    log = LossLog(out / "logs" / f"{name}.jsonl", step) if accelerator.is_main_process else None
    bar = tqdm(total=recipe.steps, initial=step, desc=name, unit="step",
               disable=not (progress and accelerator.is_main_process) or None)

    def save(at_step: int) -> None:
        if accelerator.is_main_process:
            save_state(folder, step=at_step, module=accelerator.unwrap_model(model), optimizer=optimizer,
                       ema=stage.ema, scaler=accelerator.scaler, extra={"seconds": seconds})
        accelerator.wait_for_everyone()

    started = time.perf_counter()
    while step < recipe.steps:
        for group, scale in zip(optimizer.param_groups, groups):
            group["lr"] = recipe.lr_at(step) * scale
        generator = step_generator(seed, name, step, accelerator.process_index)
        first = (step * accelerator.num_processes + accelerator.process_index) * local
        batch = _to_device(stage.make_batch(step, first, local, generator), accelerator.device)
        loss, parts = model(batch)
        accelerator.backward(loss)
        if recipe.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stage.ema is not None:
            stage.ema.update(accelerator.unwrap_model(model), step)
        step += 1
        bar.update(1)
        seconds_now = seconds + time.perf_counter() - started
        if step % recipe.log_every == 0 or step == recipe.steps:
            values = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
            values = {k: accelerator.reduce(v.float(), "mean").item() for k, v in values.items()}
            if log is not None:
                log.write({"step": step, "lr": recipe.lr_at(step - 1), **values, "seconds": round(seconds_now, 1)})
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if bar.disable:  # no terminal (a log file): one line per log interval instead of a bar
                    print(f"{name} step {step}/{recipe.steps} loss {values['loss']:.4f} {seconds_now:.0f}s", flush=True)
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            seconds, started = seconds_now, time.perf_counter()
            save(step)
    bar.close()
    accelerator.free_memory()  # drops accelerate's references to the stage's model and optimizer
    return {"steps": step, "seconds": round(seconds, 1)}
