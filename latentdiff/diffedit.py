"""DiffEdit (Couairon et al. 2023): edit what a target prompt changes in an image, keep the rest.

1. Mask: the image's latents are noised `num_maps_per_mask` times to the level `mask_encode_strength` of
   the way into the schedule; the difference of the (guided) noise predictions under the target and the
   source prompt, averaged over the maps and the channels, is clamped at `mask_thresholding_ratio` times
   its mean, scaled to [0, 1] and binarised at 0.5 (latent resolution; 1 = edit).
2. Inversion: DDIM run backwards from the clean latents, under the source prompt, up to the level
   `inpaint_strength` of the way in, keeping the latents of every level passed.
3. Edit: DDIM from the top inverted latents under the target prompt; after each step the unmasked region
   is replaced by the inverted latents of the level the step reached, so it returns to the input.

Names, defaults and randomness follow diffusers' StableDiffusionDiffEditPipeline (generate_mask, invert,
__call__): one generator, seeded once, draws the mask's posterior samples and noise, then the inversion's
posterior sample. Two differences, both measured in tests/test_diffedit.py:
- the blend: diffusers replaces the unmasked region after each step by the inverted latents of the level
  the step started from (one level noisier: its last blend puts back the level-1 latents, not the image's),
  where the paper (eq. 4 of its algorithm) and we use the level the step reached;
- v-prediction models: an inversion step evaluates the network at the next level's timestep on the current
  latents; we read eps from its output at that timestep, diffusers with the current level's alpha.
"""

import secrets
from dataclasses import dataclass, field, fields, replace

import torch
from PIL import Image

from .conditioning import Cond, concat_family
from .errors import FieldError, UnsupportedModelError
from .images import as_rgb_image, fit_to_multiple
from .prompts import count_chunks
from .request import MAX_SEED, RANDOM_SEED
from .schedules import make_sigmas, spacing_options
from .threads import generation_threads


@dataclass(frozen=True)
class DiffEditRequest:
    image: Image.Image | str | None = None
    source_prompt: str = ""  # what the image shows
    target_prompt: str = ""  # what it should show
    negative_prompt: str = ""
    steps: int = 50  # DDIM steps of the whole schedule (inversion and edit run the part inpaint_strength says)
    cfg_scale: float = 7.5  # the mask's and the edit's guidance
    inverse_cfg_scale: float = 7.5  # the inversion's guidance (diffusers' invert guidance_scale)
    seed: int = RANDOM_SEED
    mask_encode_strength: float = 0.5
    num_maps_per_mask: int = 10
    mask_thresholding_ratio: float = 3.0
    inpaint_strength: float = 0.8

    def validate(self) -> "DiffEditRequest":
        if self.image is None:
            raise FieldError("image", "is required: the picture to edit")
        for name in ("source_prompt", "target_prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise FieldError(name, f"must be a string, not {getattr(self, name)!r}")
        for name in ("source_prompt", "target_prompt"):
            if not getattr(self, name).strip():
                raise FieldError(name, "is empty: DiffEdit finds the region to edit from the difference between "
                                       "the source prompt (what the image shows) and the target prompt")
        _integer("steps", self.steps, 1, 1000)
        _integer("num_maps_per_mask", self.num_maps_per_mask, 1, 64)
        _integer("seed", self.seed, RANDOM_SEED, MAX_SEED)
        for name in ("cfg_scale", "inverse_cfg_scale", "mask_thresholding_ratio"):
            _number(name, getattr(self, name))
        if not self.mask_thresholding_ratio > 0:
            raise FieldError("mask_thresholding_ratio", f"must be > 0, not {self.mask_thresholding_ratio}")
        for name in ("mask_encode_strength", "inpaint_strength"):
            value = _number(name, getattr(self, name))
            if not 0.0 < value <= 1.0 or int(self.steps * value) < 1:
                raise FieldError(name, f"{value} must be in (0, 1] and leave at least one of the {self.steps} "
                                       f"steps (int(steps * {name}) >= 1)")
        return self


@dataclass
class DiffEditResult:
    image: Image.Image
    mask: Image.Image  # white = edited, at the image's size (nearest-neighbour from the latent mask)
    seed: int
    request: DiffEditRequest  # what ran (seed and image filled in)
    latents: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def diffedit(pipe, request: DiffEditRequest) -> DiffEditResult:
    """Run a DiffEdit request on a Pipeline (see the module docstring)."""
    request.validate()
    unet = pipe.config.unet
    if unet.in_channels != unet.out_channels:
        raise UnsupportedModelError(f"DiffEdit runs on text-to-image checkpoints; this one is "
                                    f"{concat_family(unet.in_channels, unet.out_channels)}: use an ordinary model")
    notes = []
    image = as_rgb_image(request.image)
    if min(image.size) < pipe.size_multiple():
        raise FieldError("image", f"is {image.width}x{image.height}: each side must be at least "
                                  f"{pipe.size_multiple()} px")
    fitted = fit_to_multiple(image, pipe.size_multiple())
    if fitted.size != image.size:
        notes.append(f"image cropped from {image.width}x{image.height} to {fitted.width}x{fitted.height}")
    seed = secrets.randbelow(2**32) if request.seed == RANDOM_SEED else request.seed
    request = replace(request, image=fitted, seed=seed)
    with generation_threads(pipe.threads), torch.no_grad():
        steps = DiffEditSteps(pipe, request)
        mask = steps.mask()
        inverted = steps.invert()
        latents = steps.edit(mask, inverted)
        images, decode_notes = pipe.decode(latents)
    if mask.max() == 0:
        notes.append("the mask found is empty (the source and target prompts change nothing the model sees): the "
                     "image comes back as it was, through the VAE; try prompts that differ more, or a lower "
                     "mask_thresholding_ratio (--mask-thresholding-ratio)")
    elif mask.min() == 1:
        notes.append("the mask found covers the whole image: all of it was repainted toward the target prompt")
    f = pipe.config.vae.downsample_factor
    mask_image = Image.fromarray((mask[0, 0].cpu().numpy() * 255).astype("uint8"), "L")
    mask_image = mask_image.resize((mask_image.width * f, mask_image.height * f), Image.NEAREST)
    return DiffEditResult(images[0], mask_image, seed, request, latents, notes + decode_notes)


class DiffEditSteps:
    """The three parts of a prepared request, each comparable with diffusers' method of the same name."""

    def __init__(self, pipe, request: DiffEditRequest):
        self.pipe, self.request = pipe, request
        r = request
        prompts = [r.source_prompt, r.target_prompt, r.negative_prompt]
        chunks = count_chunks(prompts, pipe.model.tokenizer, pipe.embeddings)
        self.source, self.target, self.negative = (Cond(context=pipe.encode_prompt([p], 1, chunks)) for p in prompts)
        self.generator = torch.Generator("cpu").manual_seed(r.seed)
        config = pipe.config
        # diffusers' DDIMScheduler and DDIMInverseScheduler on the model's folder config: leading timesteps
        # with its steps_offset, ending at sigma 0 or (set_alpha_to_one false) the smallest training sigma
        self.denoiser, _, acp = pipe._denoiser(self.target, self.negative, r.cfg_scale)
        self.sigmas = make_sigmas("leading", r.steps, acp, **spacing_options("leading", "ddim", config))
        self.posterior = pipe.posterior(r.image)

    def _latents(self, count: int) -> torch.Tensor:
        """`count` scaled posterior samples in one draw (diffusers encodes the image repeated `count` times)."""
        mean, std = self.posterior.mean.float(), self.posterior.std.float()
        noise = torch.randn((count, *mean.shape[1:]), generator=self.generator).to(mean.device)
        return (mean + std * noise) * self.pipe.config.latent_scale

    def _eps(self, x: torch.Tensor, sigma: float, cond: Cond, cfg_scale: float) -> torch.Tensor:
        n = x.shape[0]
        expand = lambda c: Cond(context=c.context.expand(n, -1, -1))  # noqa: E731
        denoised = self.denoiser(x, sigma, cond=expand(cond), uncond=expand(self.negative), cfg_scale=cfg_scale)
        return (x - denoised) / sigma

    def mask(self) -> torch.Tensor:
        """(1, 1, h, w) of 0 / 1 at latent resolution: generate_mask."""
        r = self.request
        start = r.steps - int(r.steps * r.mask_encode_strength)
        sigma = float(self.sigmas[start])
        latents = self._latents(r.num_maps_per_mask)
        noise = torch.randn(latents.shape, generator=self.generator).to(latents.device)
        x = latents + sigma * noise
        difference = (self._eps(x, sigma, self.target, r.cfg_scale) - self._eps(x, sigma, self.source, r.cfg_scale))
        guidance_map = difference.abs().mean(dim=(0, 1))
        clamp = guidance_map.mean() * r.mask_thresholding_ratio
        if clamp == 0:  # the prompts' predictions are equal everywhere: nothing to edit
            return torch.zeros_like(guidance_map)[None, None]
        return (guidance_map.clamp(0, clamp) / clamp > 0.5).float()[None, None]

    def first_step(self) -> int:
        r = self.request
        return r.steps - int(r.steps * r.inpaint_strength)

    def invert(self) -> dict[int, torch.Tensor]:
        """{k: variance-preserving latents at sigmas[k]} for k from the last (the clean latents) up to
        first_step(): invert. Each step reads eps from the network at the level it goes to, fed the current
        latents (the DDIM inversion of diffusers and of null-text inversion)."""
        r = self.request
        sigmas = [float(s) for s in self.sigmas]
        last = len(sigmas) - 1
        vp = self._latents(1)  # the clean latents, taken as the VP sample of the last level (as diffusers does)
        inverted = {last: vp}
        for k in range(last - 1, self.first_step() - 1, -1):
            here, there = sigmas[k + 1], sigmas[k]
            # in sigma space x = vp * sqrt(here^2 + 1); the network at `there` sees c_in(there) * x_in = vp
            eps = self._eps(vp * (there**2 + 1) ** 0.5, there, self.source, r.inverse_cfg_scale)
            vp = (vp * (here**2 + 1) ** 0.5 + (there - here) * eps) / (there**2 + 1) ** 0.5
            inverted[k] = vp
        return inverted

    def edit(self, mask: torch.Tensor, inverted: dict[int, torch.Tensor], *, blend_offset: int = 1) -> torch.Tensor:
        """Variance-preserving latents (as the pipeline decodes them) of the masked DDIM edit: __call__.
        After each step the unmasked region takes the inverted latents of the level the step reached
        (`blend_offset` 1: the paper's) or of the level it left (0: diffusers')."""
        r = self.request
        sigmas = [float(s) for s in self.sigmas]
        scale = [(s**2 + 1) ** 0.5 for s in sigmas]  # sigma-space x = vp * scale
        x = inverted[self.first_step()] * scale[self.first_step()]
        for i in range(self.first_step(), len(sigmas) - 1):
            eps = self._eps(x, sigmas[i], self.target, r.cfg_scale)
            vp = (x + (sigmas[i + 1] - sigmas[i]) * eps) / scale[i + 1]  # DDIM with eta 0
            x = (mask * vp + (1 - mask) * inverted[i + blend_offset]) * scale[i + 1]
        return x / scale[-1]


def infotext_params(request: DiffEditRequest) -> dict:
    """The DiffEdit options as infotext keys (A1111 has none of its own for DiffEdit)."""
    return {key: getattr(request, name) for key, name in INFOTEXT_KEYS.items()}


# infotext key -> request field (the prompt line is the target, Negative prompt the negative prompt)
INFOTEXT_KEYS = {"Steps": "steps", "CFG scale": "cfg_scale", "Seed": "seed", "DiffEdit source": "source_prompt",
                 "Inverse CFG scale": "inverse_cfg_scale", "Mask encode strength": "mask_encode_strength",
                 "Maps per mask": "num_maps_per_mask", "Mask thresholding ratio": "mask_thresholding_ratio",
                 "Inpaint strength": "inpaint_strength"}
FIELD_NAMES = tuple(f.name for f in fields(DiffEditRequest))


def _integer(name, value, minimum, maximum):
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise FieldError(name, f"must be an integer from {minimum} to {maximum}, not {value!r}")


def _number(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == float("inf"):
        raise FieldError(name, f"must be a finite number, not {value!r}")
    return value
