"""InstructPix2Pix fine-tuning (Brooks et al. 2023) of a text-to-image model on procedural recolouring edits.

The model: the base U-Net with conv_in widened from 4 to 8 input channels, the new channels' weights zero
(so before training it predicts exactly what the base model does, whatever the image), everything else
copied. The data: edit triples from the shapes dataset (shapes.py): the input image, an instruction such as
"make the circle yellow" or "make it yellow", and the target, the input's colour twin (same shape, place,
size and background, another colour). The objective is the base model's (eps MSE on the target's scaled
latents, offset noise, min-SNR weighting: diffusion.py) with the input image's latents (the posterior mode,
unscaled, as latentdiff/instruct.py feeds them at generation) concatenated to the noisy latents.

Conditioning dropout as the paper's: 5 % of samples lose the instruction, 5 % the image (zeros), 5 % both,
so one network gives the three predictions of InstructPix2Pix guidance. Only the U-Net trains; the text
encoder and the autoencoder are the base model's, frozen.

The files of a run whose output is `OUT.safetensors` (as personal.py's): OUT.safetensors (fp16 single
file, 8-channel U-Net), OUT-training/training.json, OUT-training/logs/instruct.jsonl, and the resumable
OUT-training/checkpoints/instruct/.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState

from ..errors import InputError
from ..instruct import EXTRA_CHANNELS, image_latents
from ..loader import save_model
from ..model import StableDiffusion
from ..schedules import alphas_cumprod_for
from .diffusion import DiffusionLoss, epoch_order
from .ema import EMA
from .loop import Stage, StageRecipe, run_stage
from .personal import load_base, peak_memory_mb, work_folder
from .recipe import default_mixed_precision
from .shapes import SPLITS, image_to_tensor, make_sample

INSTRUCTIONS = ("make the {shape} {color}", "make it {color}", "turn the {shape} {color}", "turn it {color}",
                "color the {shape} {color}", "change the color of the {shape} to {color}")
CONV_IN = "input_blocks.0.0.weight"  # the U-Net's first convolution, the only weight that changes shape


def edit_triple(seed: int, index: int, image_size: int, split: str = "train"):
    """Edit `index` of the (seed, split) stream: (input image, instruction, target image, input label,
    target label). The target is the input's colour twin; the phrasing is drawn from its own stream."""
    before, _, label = make_sample(seed, index, image_size, split)
    after, _, target = make_sample(seed, index, image_size, split, twin="color")
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 2])
    instruction = str(rng.choice(INSTRUCTIONS)).format(shape=label["shape"], color=target["color"])
    return before, instruction, after, label, target


def widen(model: StableDiffusion) -> StableDiffusion:
    """`model` with an InstructPix2Pix U-Net: conv_in takes 4 more channels, their weights zero."""
    unet = model.config.unet
    if unet.in_channels != unet.out_channels:
        raise InputError(f"the base U-Net already takes {unet.in_channels} input channels; start from a "
                         "text-to-image model (4 channels)")
    config = dataclasses.replace(model.config, unet=dataclasses.replace(unet, in_channels=unet.in_channels + EXTRA_CHANNELS))
    wide = StableDiffusion(config, model.tokenizer)
    state = model.state_dict()
    key = "model.diffusion_model." + CONV_IN
    state[key] = torch.cat([state[key], torch.zeros_like(state[key])], dim=1)
    wide.load_state_dict(state)
    return wide.to(model.device)


class InstructLoss(DiffusionLoss):
    """The base model's objective with the input image's latents beside the noisy latents."""

    def unet_input(self, noisy: torch.Tensor, batch: dict) -> torch.Tensor:
        return torch.cat([noisy, batch["image"]], dim=1)


@torch.no_grad()
def encode_edits(model: StableDiffusion, *, seed: int, count: int, device, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Edits 0 .. count - 1 encoded once: the input's conditioning latents ("image"), the target's posterior
    mean and std, and the instruction's features (fp16)."""
    size = model.config.resolution
    parts: dict[str, list] = {"image": [], "mean": [], "std": [], "context": []}
    for start in range(0, count, chunk):
        triples = [edit_triple(seed, i, size) for i in range(start, min(count, start + chunk))]
        before = torch.stack([image_to_tensor(t[0]) for t in triples]).to(device)
        after = torch.stack([image_to_tensor(t[2]) for t in triples]).to(device)
        parts["image"].append(image_latents(model.vae.encode(before)))
        posterior = model.vae.encode(after)
        parts["mean"].append(posterior.mean.float())
        parts["std"].append(posterior.std.float())
        parts["context"].append(model.text_encoder(model.tokenizer([t[1] for t in triples]).to(device)).half())
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


@dataclass(frozen=True)
class InstructRecipe:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    edits: int = 4096  # edit triples encoded once and revisited every epoch
    seed: int = 0  # the shapes stream the edits come from (the demo model's training stream)
    dropout: float = 0.05  # each of: instruction only, image only, both (the paper's 5 % / 5 % / 5 %)
    offset_noise: float = 0.4  # the demo model's (diffusion.py)
    snr_gamma: float = 5.0
    ema_decay: float = 0.995  # the demo model's
    log_every: int = 25
    checkpoint_every: int = 250


def instruct_stage(model: StableDiffusion, recipe: InstructRecipe, device) -> Stage:
    """The training stage of the widened `model` (its U-Net trains; text encoder and autoencoder frozen)."""
    model.vae.eval().requires_grad_(False)
    model.text_encoder.eval().requires_grad_(False)
    pool = encode_edits(model, seed=recipe.seed, count=recipe.edits, device=device)
    with torch.no_grad():
        empty = model.text_encoder(model.tokenizer([""]).to(device)).half()
    config = model.config

    def make_batch(step: int, first: int, count: int, generator: torch.Generator) -> dict:
        index = torch.stack([epoch_order(recipe.seed, i // recipe.edits, recipe.edits)[i % recipe.edits]
                             for i in range(first, first + count)]).to(device)
        r = torch.rand(count, generator=generator).to(device)
        no_text = (r < recipe.dropout) | ((r >= 2 * recipe.dropout) & (r < 3 * recipe.dropout))
        no_image = (r >= recipe.dropout) & (r < 3 * recipe.dropout)
        posterior_noise = torch.randn(pool["mean"][index].shape, generator=generator).to(device)
        noise = torch.randn(posterior_noise.shape, generator=generator)
        noise += recipe.offset_noise * torch.randn(count, noise.shape[1], 1, 1, generator=generator)
        timesteps = torch.randint(0, config.num_train_timesteps, (count,), generator=generator)
        latents = (pool["mean"][index] + pool["std"][index] * posterior_noise) * config.latent_scale
        return {"latents": latents, "noise": noise, "timesteps": timesteps,
                "image": torch.where(no_image[:, None, None, None], 0.0, pool["image"][index]),
                "context": torch.where(no_text[:, None, None], empty, pool["context"][index]).float()}

    model.unet.train().requires_grad_(True)
    module = InstructLoss(model.unet, alphas_cumprod_for(config), recipe.snr_gamma)
    stage_recipe = StageRecipe(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup=recipe.warmup,
                               log_every=recipe.log_every, checkpoint_every=recipe.checkpoint_every)
    return Stage("instruct", module, make_batch, stage_recipe, ema=EMA(module, recipe.ema_decay))


def train_instruct(base: str | Path, output: str | Path, recipe: InstructRecipe = InstructRecipe(), *,
                   resume: bool = False, mixed_precision: str | None = None, cpu: bool = False,
                   progress: bool = True) -> Path:
    """Fine-tune `base` into an InstructPix2Pix model written to `output` (see the module docstring)."""
    began = time.perf_counter()
    output = Path(output).expanduser()
    work = work_folder(output)
    if output.suffix != ".safetensors":
        raise InputError(f"output {output}: name it NAME.safetensors")
    if output.exists():
        raise InputError(f"output {output} already exists; latentdiff never overwrites it: choose another path")
    if not resume and (work / "checkpoints").exists():
        raise InputError(f"{work} holds an unfinished run; pass resume=True (--resume) or delete the folder")
    if not output.parent.is_dir():
        raise InputError(f"output {output}: the folder {output.parent} does not exist; create it first")
    cpu = cpu or not torch.cuda.is_available()
    device = PartialState(cpu=cpu).device
    accelerator = Accelerator(mixed_precision=mixed_precision or default_mixed_precision(device), cpu=cpu)
    model = widen(load_base(Path(base).expanduser()).to(accelerator.device))
    stage = instruct_stage(model, recipe, accelerator.device)
    summary = run_stage(stage, accelerator, work, recipe.seed, progress)
    if accelerator.is_main_process:
        stage.ema.copy_to(stage.module)  # the averaged weights are the ones that ship
        save_model(model.cpu().requires_grad_(False).to(torch.float16), output)
        record = {"output": str(output), "base": str(base), "bytes": output.stat().st_size, **summary,
                  "wall_seconds_this_invocation": round(time.perf_counter() - began, 1),
                  "peak_memory_mb": peak_memory_mb(accelerator.device), "device": str(accelerator.device),
                  "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                  "torch_threads": torch.get_num_threads(), "recipe": dataclasses.asdict(recipe)}
        (work / "training.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    return output
