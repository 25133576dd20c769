"""What textual inversion, LoRA training and DreamBooth share: the base model, the instance images'
latents, the denoising loss, the training loop (loop.run_stage: resumable, accelerate, loss log), and the
run's files. A method (textual_inversion.py, lora.py, dreambooth.py) supplies the trained module and
writes its result.

The files of a run whose output is `OUT.safetensors`:

    OUT.safetensors                      the result: an embedding, a kohya LoRA, or a whole checkpoint
    OUT-samples.png                      the sample prompts drawn by the result as loaded back from OUT
    OUT-training/training.json           settings, steps, seconds, peak memory
    OUT-training/logs/<method>.jsonl     the loss log
    OUT-training/checkpoints/<method>/   resumable state: the trained tensors, the optimizer and the step
    OUT-training/class-images/           DreamBooth's prior-preservation images (made once, reused)

Every step's random draws come from (seed, method, step, process) (loop.step_generator), and which
instance images a step sees from the step number, so a resumed run makes the draws of an uninterrupted one.
"""

import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState

from ..errors import InputError, UnsupportedModelError
from ..images import save_png
from ..loader import load_model
from ..model import StableDiffusion
from ..pipeline import Pipeline
from ..prompts import encode_prompts
from ..resources import demo_model
from .diffusion import epoch_order
from .loop import Stage, StageRecipe, run_stage
from .personal_data import Example, common_word_warning, image_files, read_examples
from .recipe import Recipe, default_mixed_precision, sample_grid

log = logging.getLogger("latentdiff")


@dataclass(frozen=True)
class Settings:
    """What every method takes. `token`: the word the concept is bound to ([name] in captions)."""

    images: Path
    output: Path
    token: str
    steps: int
    lr: float
    batch_size: int = 1
    base: Path | None = None  # None: the bundled demo model (train_personal fills it in)
    template: str | None = None  # see personal_data.py
    seed: int = 0
    noise_offset: float = 0.0  # kohya's --noise_offset; the bundled model was trained with 0.4
    save_every: int = 100
    log_every: int = 10
    sample_prompts: tuple[str, ...] = ()  # default: the instance captions (at most 8)
    sample_steps: int = 20
    sample_cfg_scale: float = 7.0
    mixed_precision: str | None = None  # default: fp16 on CUDA, bf16 on CPUs
    cpu: bool = False
    progress: bool = True
    resume: bool = False


@dataclass
class Run:
    """One run's shared state, handed to the method."""

    settings: Settings
    model: StableDiffusion  # the base model, fp32, on the process's device, frozen
    accelerator: Accelerator
    examples: list[Example]
    latents: dict[str, torch.Tensor]  # the instance images' posterior "mean" and "std"
    work: Path

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.examples]

    def encode(self, prompts: list[str], embeddings=None, text_encoder=None) -> torch.Tensor:
        """Prompt features as generation makes them (prompts.encode_prompts: A1111 syntax, embeddings)."""
        text_encoder = text_encoder or self.model.text_encoder
        device = self.accelerator.device
        return encode_prompts(prompts, self.model.tokenizer, lambda tokens, **kw: text_encoder(tokens.to(device), **kw),
                              1, embeddings)

    def draw(self, step: int, first: int, count: int, generator: torch.Generator) -> dict:
        """Instance samples first .. first + count - 1 of the endless stream of epochs over the images:
        their indices, one posterior sample each (scaled), noise and timesteps."""
        size = len(self.examples)
        index = torch.stack([epoch_order(self.settings.seed, i // size, size)[i % size]
                             for i in range(first, first + count)])
        return {"index": index, **noisy_sample_parts(self.latents, index, self.model, self.settings.noise_offset,
                                                     generator)}


def noisy_sample_parts(latents: dict, index: torch.Tensor, model: StableDiffusion, noise_offset: float,
                       generator: torch.Generator) -> dict:
    """Scaled posterior samples of the images `index`, their noise (with offset noise) and timesteps,
    drawn on the CPU from `generator` (the same run on any device)."""
    mean, std = latents["mean"][index], latents["std"][index]
    sample = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
    noise = torch.randn(mean.shape, generator=generator)
    noise += noise_offset * torch.randn(len(index), mean.shape[1], 1, 1, generator=generator)
    timesteps = torch.randint(0, model.config.num_train_timesteps, (len(index),), generator=generator)
    return {"latents": sample * model.config.latent_scale, "noise": noise, "timesteps": timesteps}


def denoising_mse(unet, batch: dict, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction: str) -> torch.Tensor:
    """Per-sample MSE of the U-Net's prediction at x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps: of eps for
    eps models, of v = sqrt(abar) eps - sqrt(1 - abar) x_0 for v models (SD 2.x 768-v), as they were trained."""
    t, noise, latents = batch["timesteps"], batch["noise"], batch["latents"]
    abar = alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return F.mse_loss(unet(noisy, t, context).float(), target, reduction="none").mean((1, 2, 3))


class Method(Protocol):
    name: str  # a loop.STAGES name: "embedding", "lora", "dreambooth"
    require_token: bool  # every caption must name the token

    def caption_token(self, settings: Settings) -> str: ...  # what [name] becomes

    def stage(self, run: Run) -> Stage: ...

    def write(self, run: Run, stage: Stage) -> Path: ...

    def sample_pipeline(self, run: Run) -> Pipeline: ...  # the result as users will load it


def work_folder(output: Path) -> Path:
    return output.with_name(output.stem + "-training")


def load_base(source: Path) -> StableDiffusion:
    """The base model in float32 (training precision), refused if no method here can train it."""
    if not source.exists():
        raise InputError(f"base model {source} does not exist; pass a single-file checkpoint or a diffusers folder")
    model = load_model(source, dtype=torch.float32)
    unet = model.config.unet
    if unet.in_channels != unet.out_channels:
        raise UnsupportedModelError(f"{source}: its U-Net takes {unet.in_channels} input channels (an inpainting or "
                                    "instruct-pix2pix model); personalisation trains text-to-image models: use the "
                                    "base model it was made from")
    return model


@torch.no_grad()
def encode_images(model: StableDiffusion, images: torch.Tensor, device, chunk: int = 16) -> dict[str, torch.Tensor]:
    """Posterior mean and std of `images` ((N, 3, H, W) in [-1, 1]) under the frozen autoencoder, in fp32."""
    parts = {"mean": [], "std": []}
    for start in range(0, len(images), chunk):
        posterior = model.vae.encode(images[start:start + chunk].to(device))
        parts["mean"].append(posterior.mean.float())
        parts["std"].append(posterior.std.float())
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak resident memory (Linux reports KiB), or the CUDA allocator's peak on a GPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train_personal(method: Method, settings: Settings, details: dict) -> Path:
    """Run `method` (see the module docstring for the files); returns the output path. `details`: the
    method's own settings, recorded in training.json."""
    began = time.perf_counter()
    settings = dataclasses.replace(settings, base=Path(settings.base).expanduser() if settings.base else demo_model())
    output = Path(settings.output).expanduser()
    work = work_folder(output)
    if output.suffix != ".safetensors":
        raise InputError(f"output {output}: name it NAME.safetensors (the result is written as safetensors)")
    if output.exists():
        if settings.resume:
            print(f"{output} exists: this run is complete")
            return output
        raise InputError(f"output {output} already exists; latentdiff never overwrites it: choose another path")
    if not settings.resume and (work / "checkpoints").exists():
        raise InputError(f"{work} holds an unfinished run for {output.name}; pass --resume to continue it, or "
                         "delete the folder to start again")
    if not output.parent.is_dir():
        raise InputError(f"output {output}: the folder {output.parent} does not exist; create it first")
    for name, value in (("steps", settings.steps), ("batch_size", settings.batch_size),
                        ("save_every", settings.save_every), ("log_every", settings.log_every)):
        if value < 1:
            raise InputError(f"{name}={value}: must be at least 1")
    if not settings.lr > 0:
        raise InputError(f"lr={settings.lr}: the learning rate must be positive")
    image_files(Path(settings.images).expanduser())  # a wrong folder fails before the model loads

    cpu = settings.cpu or not torch.cuda.is_available()  # cpu=True sets up multi-process CPU runs (gloo)
    device = PartialState(cpu=cpu).device
    accelerator = Accelerator(mixed_precision=settings.mixed_precision or default_mixed_precision(device), cpu=cpu)
    model = load_base(settings.base).to(accelerator.device)
    token = method.caption_token(settings)
    warning = common_word_warning(model.tokenizer, settings.token)
    if warning and accelerator.is_main_process:
        log.warning("warning: %s", warning)
    examples = read_examples(settings.images, resolution=model.config.resolution, token=token,
                             template=settings.template, require_token=method.require_token)
    latents = encode_images(model, torch.stack([e.image for e in examples]), accelerator.device)
    run = Run(settings, model, accelerator, examples, latents, work)
    stage = method.stage(run)
    summary = run_stage(stage, accelerator, work, settings.seed, settings.progress)

    if accelerator.is_main_process:
        method.write(run, stage)
        prompts = (tuple(p.replace("[name]", token) for p in settings.sample_prompts)
                   or tuple(dict.fromkeys(run.captions))[:8])
        recipe = dataclasses.replace(Recipe(), sample_prompts=prompts, sample_steps=settings.sample_steps,
                                     sample_cfg_scale=settings.sample_cfg_scale)
        grid = save_png(sample_grid(method.sample_pipeline(run), recipe), output.parent, f"{output.stem}-samples")
        record = {"method": method.name, "output": str(output), "bytes": output.stat().st_size,
                  "samples": str(grid), "steps": summary["steps"], "train_seconds": summary["seconds"],
                  "wall_seconds_this_invocation": round(time.perf_counter() - began, 1),
                  "peak_memory_mb": peak_memory_mb(accelerator.device), "device": str(accelerator.device),
                  "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                  "torch_threads": torch.get_num_threads(), "images": [str(e.path) for e in examples],
                  "captions": run.captions,
                  "settings": {k: str(v) if isinstance(v, Path) else v
                               for k, v in dataclasses.asdict(settings).items()},
                  **details}
        (work / "training.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    return output


def stage_recipe(settings: Settings) -> StageRecipe:
    """A constant learning rate (no warm-up, no decay), as the common personalisation tools default to."""
    return StageRecipe(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, warmup=0,
                       min_lr_ratio=1.0, log_every=settings.log_every, checkpoint_every=settings.save_every)
