"""DreamBooth (Ruiz et al. 2023): fine-tune the U-Net (and optionally the text encoder) on the instance
images captioned "a [identifier] [class]", with the class-specific prior-preservation loss.

Prior preservation: before training, the base model draws `class_images` pictures of the class prompt
("a [class]"), seeds 0, 1, ...; every step adds, for each instance sample, `prior_batch` class images'
mean denoising loss times `prior_weight`, so the model keeps drawing the class as it did while learning
that the identifier means the subject (more class images a step: a steadier pull, not a stronger one).
The class images are kept in the run's work folder and reused on resume. prior_weight = 0 turns it off
(plain fine-tuning, which drifts: benchmarks/personalisation.md).

`class_prompts` widens the prior beyond the one class, as kohya's several regularisation folders do: class
image i is drawn from class_prompts[i % len], and its prior loss is conditioned on that prompt. On the
bundled model a one-class prior keeps its class but lets the instance's colour leak into every other
shape; prompts naming the other shapes and colours hold them too (benchmarks/personalisation.md).

Two guards against drift that the base model's own training used (train/diffusion.py): `caption_dropout`
trains that share of samples on the empty prompt, which classifier-free guidance subtracts from every
prompt's prediction (left untrained, it drifts and guidance multiplies the drift); `ema_decay` writes the
moving average of the weights rather than the last step's, whose step-to-step noise shows as wrong shapes.
The average starts at the base model's weights with no warm-up, so decay d over T steps keeps d**T of them.

Two ways to let the fine-tune move the model less for the same concept: `conv_lr_scale` trains the U-Net's
convolutional parts (everything outside its transformer blocks) at that multiple of the learning rate, and
`train_identifier` also learns the identifier's token embedding at `identifier_lr` (pivotal tuning: textual
inversion and DreamBooth together), written into the checkpoint's token table, so the text side carries
part of the concept and prompts without the identifier read the same as before.

Written as a whole single-file checkpoint (loader.save_model, `save_dtype`), optionally also a diffusers
folder.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..images import load_image
from ..loader import load_model, save_model
from ..pipeline import Pipeline
from ..schedules import alphas_cumprod_for
from ..unet import SpatialTransformer
from .ema import EMA
from .loop import Stage
from .personal import Run, Settings, denoising_mse, encode_images, noisy_sample_parts, stage_recipe, train_personal
from .shapes import image_to_tensor
from .textual_inversion import initial_vectors, token_table, training_embedding

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def class_images(run: Run, prompts: tuple[str, ...], count: int, steps: int, cfg_scale: float) -> torch.Tensor:
    """(count, 3, S, S) pictures by the base model, picture i of prompts[i % len(prompts)], seed i:
    generated once into the work folder (main process), read back from there (all processes). Each
    picture's prompt is kept beside it (NNNN.txt), so a run with other prompts redraws what differs."""
    folder = run.work / "class-images"
    if run.accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)

        def drawn(i: int) -> bool:
            image, text = folder / f"{i:04d}.png", folder / f"{i:04d}.txt"
            return image.is_file() and text.is_file() and text.read_text() == prompts[i % len(prompts)]

        missing = [i for i in range(count) if not drawn(i)]
        if missing:
            pipeline = Pipeline(load_model(run.settings.base), device=run.accelerator.device, dtype=torch.float32)
            for i in missing:
                prompt = prompts[i % len(prompts)]
                image = pipeline.txt2img(prompt, seed=i, steps=steps, cfg_scale=cfg_scale, progress=False).images[0]
                tmp = folder / f".{i:04d}.png.tmp"
                image.save(tmp, format="PNG")
                tmp.replace(folder / f"{i:04d}.png")  # a complete file or none, should the run be killed
                (folder / f"{i:04d}.txt").write_text(prompt)  # written last: its presence means the image is done
            del pipeline
    run.accelerator.wait_for_everyone()
    return torch.stack([image_to_tensor(load_image(folder / f"{i:04d}.png")) for i in range(count)])


def read_class_prompts(path: Path) -> tuple[str, ...]:
    """The prompts of a --class-prompts file: one a line, blank lines skipped."""
    try:
        prompts = tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"class prompts file {path}: cannot read it ({e}); give a UTF-8 text file, one prompt a line")
    if not prompts:
        raise InputError(f"class prompts file {path} holds no prompt; write one prompt a line")
    return prompts


class DreamBoothLoss(nn.Module):
    """Instance loss + prior_weight * class loss, in one U-Net call. The U-Net (and with train_text_encoder
    the text encoder) are submodules, trained; the autoencoder is not."""

    def __init__(self, run: Run, class_prompts: tuple[str, ...], class_latents: dict | None, prior_weight: float,
                 train_text_encoder: bool, train_identifier: bool):
        super().__init__()
        self.unet = run.model.unet.requires_grad_(True)
        self.text_encoder = run.model.text_encoder.requires_grad_(True) if train_text_encoder else None
        if train_text_encoder:  # layers after the one the model reads get no gradient (SD 2.x's last)
            layers = run.model.text_encoder.transformer.text_model.encoder.layers
            layers[len(layers) + 1 + run.model.config.text.output_layer:].requires_grad_(False)
        self.run, self.class_latents = {"run": run}, class_latents
        self.class_prompts, self.prior_weight = class_prompts, prior_weight
        self.alphas_cumprod = alphas_cumprod_for(run.model.config).float()
        if not train_text_encoder:
            with torch.no_grad():
                self.context = run.encode(run.captions + list(class_prompts) + [""])  # the last: dropped captions
        self.identifier = None
        if train_identifier:
            self.identifier_ids = run.model.tokenizer.token_ids([run.settings.token])[0]
            self.identifier = nn.Parameter(initial_vectors(run, run.settings.token, len(self.identifier_ids)))

    def write_identifier(self) -> None:
        """Write the learned identifier vectors into the text encoder's token table."""
        table = token_table(self.run["run"])
        with torch.no_grad():
            table[self.identifier_ids] = self.identifier.detach().to(table)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        run = self.run["run"]
        index, n = batch["index"], len(batch["index"])
        # the prompt of each class image drawn: class image i is of class_prompts[i % len]
        prompt_index = (batch["class_index"] % len(self.class_prompts)).tolist() if self.class_latents else []
        dropped = batch["dropped"].tolist() if "dropped" in batch else [False] * len(batch["latents"])
        if self.text_encoder is None:
            rows = index.tolist() + [len(run.captions) + i for i in prompt_index]
            context = self.context[[-1 if d else r for r, d in zip(rows, dropped)]]
            if self.identifier is not None:  # every instance caption encoded, so the vectors always get a gradient
                learned = {run.settings.token: training_embedding(run, self.identifier)}
                fresh = run.encode([run.captions[i] for i in index.tolist()], learned)
                keep = torch.tensor([not d for d in dropped[:n]], device=context.device).view(-1, 1, 1)
                context = torch.cat([torch.where(keep, fresh, context[:n]), context[n:]])
        else:
            prompts = [run.captions[i] for i in index.tolist()] + [self.class_prompts[i] for i in prompt_index]
            context = run.encode(["" if d else p for p, d in zip(prompts, dropped)], text_encoder=self.text_encoder)
        mse = denoising_mse(self.unet, batch, context, self.alphas_cumprod, run.model.config.prediction)
        if not self.class_latents:
            return mse.mean(), {}
        instance, prior = mse[:n].mean(), mse[n:].mean()
        return instance + self.prior_weight * prior, {"instance": instance.detach(), "prior": prior.detach()}


@dataclass(frozen=True)
class DreamBooth:
    class_word: str
    class_prompt: str | None = None  # default "a [class]"
    class_prompts: tuple[str, ...] = ()  # several prompts instead of class_prompt, the class images shared out
    class_images: int = 100  # diffusers' train_dreambooth.py default (the paper: 200 per instance image)
    prior_weight: float = 1.0  # the paper's lambda and diffusers' default
    train_text_encoder: bool = False
    save_dtype: str = "fp16"
    diffusers_folder: Path | None = None
    caption_dropout: float = 0.0  # kohya's --caption_dropout_rate: this share of samples trains the empty prompt
    ema_decay: float = 0.0  # 0: write the last weights; else their moving average (train.ema.EMA)
    prior_batch: int = 1  # class images drawn per instance sample each step
    conv_lr_scale: float = 1.0  # learning rate of the U-Net outside its transformer blocks, times lr
    train_identifier: bool = False  # also learn the identifier's token embedding
    identifier_lr: float = 5e-3  # A1111's textual-inversion default
    name = "dreambooth"
    require_token = True

    def caption_token(self, settings: Settings) -> str:
        if not self.class_word.strip():
            raise InputError("class_word is empty: name the class the subject belongs to, e.g. 'dog' or 'star'")
        if self.save_dtype not in DTYPES:
            raise InputError(f"save_dtype={self.save_dtype!r}: use one of {', '.join(DTYPES)}")
        if self.prior_weight < 0 or (self.prior_weight > 0 and self.class_images < 1):
            raise InputError(f"prior_weight={self.prior_weight}, class_images={self.class_images}: the weight must "
                             "be >= 0, and prior preservation needs at least one class image (or prior_weight 0)")
        if self.class_prompts and (self.class_prompt is not None or not all(p.strip() for p in self.class_prompts)):
            raise InputError("class_prompts: give either one class_prompt or several class_prompts, none of them "
                             "empty")
        if self.prior_batch < 1:
            raise InputError(f"prior_batch={self.prior_batch}: give at least 1 class image per instance image")
        if not 0 <= self.caption_dropout < 1:
            raise InputError(f"caption_dropout={self.caption_dropout}: give a share in [0, 1), e.g. 0.1")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema_decay={self.ema_decay}: give 0 (off) or a decay below 1, e.g. 0.99")
        if self.conv_lr_scale < 0 or self.identifier_lr <= 0:
            raise InputError(f"conv_lr_scale={self.conv_lr_scale}, identifier_lr={self.identifier_lr}: the scale must "
                             "be >= 0 (1: the whole U-Net at lr) and the identifier's learning rate > 0")
        if self.train_identifier and self.train_text_encoder:
            raise InputError("train_identifier and train_text_encoder: choose one; a trained text encoder learns "
                             "the identifier's embedding with the rest of it")
        if self.diffusers_folder is not None and Path(self.diffusers_folder).exists():
            raise InputError(f"diffusers folder {self.diffusers_folder} already exists; choose a new path")
        return f"{settings.token} {self.class_word}"  # "a [identifier] [class]"

    def prompts(self) -> tuple[str, ...]:
        return self.class_prompts or (self.class_prompt or f"a {self.class_word}",)

    def stage(self, run: Run) -> Stage:
        s = run.settings
        class_latents = None
        if self.prior_weight > 0:
            images = class_images(run, self.prompts(), self.class_images, s.sample_steps, s.sample_cfg_scale)
            class_latents = encode_images(run.model, images, run.accelerator.device)
        module = DreamBoothLoss(run, self.prompts(), class_latents, self.prior_weight, self.train_text_encoder,
                                self.train_identifier)

        def make_batch(step: int, first: int, count: int, generator: torch.Generator) -> dict:
            batch = run.draw(step, first, count, generator)
            if class_latents is not None:
                drawn = torch.randint(0, self.class_images, (count * self.prior_batch,), generator=generator)
                prior = noisy_sample_parts(class_latents, drawn, run.model, s.noise_offset, generator)
                joined = {k: torch.cat([batch[k], prior[k].to(batch[k].device)])
                          for k in ("latents", "noise", "timesteps")}
                batch = {"index": batch["index"], "class_index": drawn, **joined}
            if self.caption_dropout:
                batch["dropped"] = torch.rand(len(batch["latents"]), generator=generator) < self.caption_dropout
            return batch

        ema = EMA(module, self.ema_decay, warmup=False) if self.ema_decay else None
        attention = {f"unet.{name}.{p}" for name, m in run.model.unet.named_modules()
                     if isinstance(m, SpatialTransformer) for p, _ in m.named_parameters()}

        def lr_scale(name: str) -> float:
            if name == "identifier":
                return self.identifier_lr / s.lr
            return self.conv_lr_scale if name.startswith("unet.") and name not in attention else 1.0

        return Stage(self.name, module, make_batch, stage_recipe(s), ema=ema, lr_scale=lr_scale)

    def write(self, run: Run, stage: Stage) -> Path:
        if stage.ema is not None:
            stage.ema.copy_to(stage.module)
        if stage.module.identifier is not None:
            stage.module.write_identifier()
        model = run.model.cpu().requires_grad_(False)
        if self.diffusers_folder is not None:
            save_model(model, self.diffusers_folder)
        return save_model(model.to(DTYPES[self.save_dtype]), run.settings.output)

    def sample_pipeline(self, run: Run) -> Pipeline:
        return Pipeline(load_model(run.settings.output), device=run.accelerator.device, dtype=torch.float32)


def train_dreambooth(settings: Settings, *, class_word: str, class_prompt: str | None = None,
                     class_prompts: tuple[str, ...] = (), class_images: int = 100, prior_weight: float = 1.0,
                     train_text_encoder: bool = False, save_dtype: str = "fp16",
                     diffusers_folder: Path | None = None, caption_dropout: float = 0.0,
                     ema_decay: float = 0.0, prior_batch: int = 1, conv_lr_scale: float = 1.0,
                     train_identifier: bool = False, identifier_lr: float = 5e-3) -> Path:
    method = DreamBooth(class_word, class_prompt, tuple(class_prompts), class_images, prior_weight, train_text_encoder,
                        save_dtype, diffusers_folder, caption_dropout, ema_decay, prior_batch, conv_lr_scale,
                        train_identifier, identifier_lr)
    details = {"class_word": class_word, "class_prompts": list(method.prompts()), "class_images": class_images,
               "prior_weight": prior_weight, "train_text_encoder": train_text_encoder, "save_dtype": save_dtype,
               "diffusers_folder": str(diffusers_folder) if diffusers_folder else None,
               "caption_dropout": caption_dropout, "ema_decay": ema_decay, "prior_batch": prior_batch,
               "conv_lr_scale": conv_lr_scale, "train_identifier": train_identifier, "identifier_lr": identifier_lr}
    return train_personal(method, settings, details)
