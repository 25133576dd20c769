"""The pipeline object: prompt -> text features -> sampled latents -> decoded images (txt2img, img2img)."""

import inspect
import logging
import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import speedups
from .denoisers import CFGDenoiser, DiscreteDenoiser
from .devices import default_dtype, to_device
from .errors import GenerationError, InputError
from .images import pil_to_tensor, tensor_to_pil
from .loader import load_model
from .memory import keep_freed_memory
from .model import StableDiffusion
from .sampling import resolve_sampler
from .sampling_stochastic import brownian_noise_sampler, sample_dpmpp_sde
from .schedules import alphas_cumprod_for, img2img_sigmas, make_sigmas
from .threads import check_threads, generation_threads
from .tiling import check_tiling_mode, tiled_decode, tiled_encode, wants_tiling

log = logging.getLogger("latentdiff")
MIN_SIDE, MAX_SIDE = 64, 4096


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks taken, e.g. the fp32 VAE retry


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA if there is one, else the CPU) and the fast dtype for it that keeps image quality:
    fp16 on CUDA, bf16 on CPUs with native bf16 matmuls, fp32 elsewhere (devices.default_dtype)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or default_dtype(device)


class Pipeline:
    """Speed and memory options (off by default except the dtype / memory layout choice and the last):
    `vae_tiling` "auto" | "on" | "off": decode and encode in overlapping tiles ("auto": above 1024x1024 px);
    `attention_slice`: sliced attention with query blocks of that many tokens (None: off);
    `compile`: torch.compile the U-Net, falling back to eager if compiling fails;
    `offload` (CUDA only): text encoder and VAE wait on the CPU and visit the GPU only while they run;
    `keep_freed_memory` (CPU; on by default): sampling reuses freed memory instead of fresh pages from the
    kernel (memory.keep_freed_memory);
    `threads`: intra-op CPU threads while generating; None: as many as there are idle cores, at most the
    process's setting, which is restored after each generation (threads.generation_threads)."""

    def __init__(self, model: StableDiffusion, *, device=None, dtype=None, source: str | Path | None = None,
                 vae_tiling: str = "auto", attention_slice: int | None = None, compile: bool = False,
                 offload: bool = False, keep_freed_memory: bool = True, threads: int | None = None):
        self.model = model
        self.threads = threads if threads is None else check_threads(threads)
        self.keep_freed_memory = keep_freed_memory
        self.source = Path(source) if source else None
        self.vae_tiling = check_tiling_mode(vae_tiling)
        speedups.set_attention_slicing(model, attention_slice)
        self.offload, self.compile = offload, compile
        self.to(*default_device_dtype(device, dtype))
        self._unet = speedups.compile_unet(model.unet, self.device) if compile else model.unet

    @classmethod
    def from_pretrained(cls, source: str | Path, *, config=None, prediction: str | None = None,
                        device=None, dtype=None, **options) -> "Pipeline":
        """A single-file checkpoint or a diffusers folder; `config` is a preset name (e.g. "sd2-v") or a
        ModelConfig for single files whose architecture should not be detected. `options`: see the class."""
        device, dtype = default_device_dtype(device, dtype)
        model = load_model(source, config=config, prediction=prediction, dtype=dtype)
        return cls(model, device=device, dtype=dtype, source=source, **options)

    def to(self, device=None, dtype=None) -> "Pipeline":
        device = torch.device(device) if device else self.model.device
        if self.offload and device.type != "cuda":
            raise InputError(f"--offload keeps the text encoder and VAE in CPU memory between their runs on a "
                             f"CUDA GPU; this pipeline runs on {device}, where it would save nothing: leave "
                             f"--offload out (or use --device cuda)")
        self.device, self.dtype = device, dtype or self.model.dtype
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        cpu_bf16_layout = speedups.prefers_channels_last(self.device, self.dtype)
        speedups.set_memory_format(self.model, cpu_bf16_layout)
        # inductor packs weights its own way and cannot trace the packed ops' closures: not with compile
        speedups.prepack_convolutions(self.model, cpu_bf16_layout and not self.compile)
        speedups.fuse_projections(self.model, self.device.type == "cuda" and not self.compile)
        if self.offload:
            for part in (self.model.text_encoder, self.model.vae):
                part.to("cpu")
        return self

    @contextmanager
    def _on_device(self, part: torch.nn.Module):
        """`part` on the pipeline's device while the block runs; with offload it goes back to the CPU after."""
        if not self.offload:
            yield part
            return
        part.to(self.device)
        try:
            yield part
        finally:
            part.to("cpu")

    @property
    def config(self):
        return self.model.config

    # -- text ---------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Token features for each prompt. `clip_skip` counts as A1111 does: 1 = the model's own layer,
        2 = one layer earlier, ..."""
        if clip_skip < 1 or clip_skip > self.config.text.layers:
            raise InputError(f"--clip-skip must be between 1 and {self.config.text.layers}, not {clip_skip}")
        for prompt in set(prompts):
            dropped = self.model.tokenizer.dropped_words(prompt)
            if dropped:
                log.warning("prompt is longer than %d tokens; dropped: %r", self.config.text.max_length, dropped)
        tokens = self.model.tokenizer(prompts).to(self.device)
        with self._on_device(self.model.text_encoder) as text_encoder:
            return text_encoder(tokens, layer=self.config.text.output_layer - (clip_skip - 1))

    # -- sampling -----------------------------------------------------------------------------------

    def size_multiple(self) -> int:
        """Image sides must divide down through the VAE and every U-Net level: 64 for SD, whose
        8x VAE feeds a U-Net that halves the latent three times."""
        return self.config.vae.downsample_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    def check_size(self, width: int, height: int, names: tuple[str, str] = ("--width", "--height")) -> None:
        m = self.size_multiple()
        for flag, side in zip(names, (width, height)):
            if side % m or not MIN_SIDE <= side <= MAX_SIDE:
                raise InputError(f"{flag} {side}: must be a multiple of {m} between {MIN_SIDE} and {MAX_SIDE}")

    def _generators(self, seeds: list[int], noise_device: str) -> list[torch.Generator]:
        """One generator per image seeded with its own seed (A1111: image i gets seed + i), so a batch
        gives the images of separate runs. Noise is drawn on `noise_device` (CPU by default: the same seed
        gives the same image on any device) and moved."""
        return [torch.Generator(noise_device).manual_seed(s) for s in seeds]

    def _randn(self, gens: list[torch.Generator], shape: tuple) -> torch.Tensor:
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in gens])
        return to_device(noise, self.device)

    def _denoiser(self, cond, uncond, cfg_scale):
        dtype = self.dtype
        unet = self._unet

        def network(x, t, context):  # latents stay fp32 between steps; the network runs in the model dtype
            return unet(x.to(dtype), t, context.to(dtype)).float()

        acp = alphas_cumprod_for(self.config)  # on the host, as the sigmas
        base = DiscreteDenoiser(network, acp, prediction=self.config.prediction)
        return CFGDenoiser(base), dict(cond=cond, uncond=uncond, cfg_scale=cfg_scale), acp

    @torch.no_grad()
    def txt2img(self, prompt: str, negative_prompt: str = "", *, width: int | None = None,
                height: int | None = None, steps: int = 20, sampler: str = "euler a", schedule: str | None = None,
                cfg_scale: float = 7.0, seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                eta: float | None = None, callback=None, progress: bool = True, return_latents: bool = False,
                noise_device: str = "cpu") -> Result:
        width, height = width or self.config.resolution, height or self.config.resolution
        self.check_size(width, height)
        with generation_threads(self.threads):
            return self._generate(prompt, negative_prompt, None, 1.0, width, height, steps, sampler, schedule,
                                  cfg_scale, seed, batch_size, clip_skip, eta, callback, progress, return_latents,
                                  noise_device)

    @torch.no_grad()
    def img2img(self, image: Image.Image, prompt: str, negative_prompt: str = "", *, strength: float = 0.75,
                steps: int = 20, sampler: str = "euler a", schedule: str | None = None, cfg_scale: float = 7.0,
                seed: int | None = None, batch_size: int = 1, clip_skip: int = 1, eta: float | None = None,
                callback=None, progress: bool = True, return_latents: bool = False,
                noise_device: str = "cpu") -> Result:
        """SDEdit: encode the image, noise it to the strength's level, denoise the rest of the schedule."""
        if not 0.0 < strength <= 1.0:
            raise InputError(f"--strength must be in (0, 1], not {strength}")
        self.check_size(image.width, image.height, ("--init-image width", "--init-image height"))
        with generation_threads(self.threads):
            return self._generate(prompt, negative_prompt, image, strength, image.width, image.height, steps,
                                  sampler, schedule, cfg_scale, seed, batch_size, clip_skip, eta, callback,
                                  progress, return_latents, noise_device)

    def _generate(self, prompt, negative_prompt, image, strength, width, height, steps, sampler, schedule,
                  cfg_scale, seed, batch_size, clip_skip, eta, callback, progress, return_latents, noise_device):
        if steps < 1:
            raise InputError(f"--steps must be at least 1, not {steps}")
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {batch_size}")
        sample_fn, default_schedule = resolve_sampler(sampler)
        if eta is not None and "eta" not in inspect.signature(sample_fn).parameters:
            raise InputError(f"--eta: sampler {sampler!r} takes no eta; leave --eta out, or pick a "
                             f"sampler with a noise amount (DDIM, the ancestral and the SDE samplers)")
        seed = secrets.randbelow(2**32) if seed is None else seed
        seeds = [seed + i for i in range(batch_size)]
        cond = self.encode_prompt([prompt] * batch_size, clip_skip)
        uncond = self.encode_prompt([negative_prompt] * batch_size, clip_skip) if cfg_scale != 1.0 else None
        denoiser, extra_args, acp = self._denoiser(cond, uncond, cfg_scale)
        # sigmas stay on the host: samplers branch on them every step, which must not sync with a GPU
        sigmas = make_sigmas(schedule or default_schedule, steps, acp)

        f = self.config.vae.downsample_factor
        shape = (self.config.unet.in_channels, height // f, width // f)
        gens = self._generators(seeds, noise_device)
        if image is None:
            x = self._randn(gens, shape) * sigmas[0]
        else:  # draw order as diffusers' img2img: posterior sample, then the added noise
            sigmas = img2img_sigmas(sigmas, strength)
            latents = self.encode_image(image, gens)
            x = latents + self._randn(gens, shape) * sigmas[0]

        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", unit="step")

        def on_step(info):
            bar.update(1)
            if callback is not None:
                callback(info)

        options = {} if eta is None else {"eta": eta}
        noise = lambda sigma, sigma_next: self._randn(gens, shape)  # noqa: E731
        if sample_fn is sample_dpmpp_sde:  # its two draws per step must correlate like a Brownian path
            noise = brownian_noise_sampler(x, draw=noise)
        keep = self.keep_freed_memory and self.device.type == "cpu"
        with keep_freed_memory() if keep else nullcontext():
            x = sample_fn(denoiser, x, sigmas, extra_args=extra_args, callback=on_step, noise_sampler=noise,
                          **options)
        bar.close()
        images, notes = self.decode(x)
        return Result(images=images, seeds=seeds, latents=x if return_latents else None, notes=notes)

    # -- autoencoder --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Image.Image, gens: list[torch.Generator]) -> torch.Tensor:
        """Scaled latents: one posterior sample per generator (as diffusers' img2img draws them)."""
        x = pil_to_tensor(image).to(self.device, self.dtype)
        with self._on_device(self.model.vae) as vae:
            posterior = tiled_encode(vae, x) if wants_tiling(self.vae_tiling, *x.shape[2:]) else vae.encode(x)
        return torch.cat([posterior.sample(generator=g).float() for g in gens]) * self.config.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> tuple[list[Image.Image], list[str]]:
        """Latents -> images. A non-finite decode (fp16 overflow) is retried in fp32; still non-finite is
        an error, never a silent black image."""
        z = latents / self.config.latent_scale
        f = self.config.vae.downsample_factor
        tiled = wants_tiling(self.vae_tiling, z.shape[2] * f, z.shape[3] * f)

        def run(vae, z):
            return (tiled_decode(vae, z) if tiled else vae.decode(z)).float()

        notes = []
        with self._on_device(self.model.vae) as vae:
            out = run(vae, z.to(self.dtype))
            if not torch.isfinite(out).all() and self.dtype != torch.float32:
                notes.append(f"VAE decode in {self.dtype} gave NaN/Inf; retried in float32")
                log.warning(notes[-1])
                out = run(vae.float(), z.float())
                vae.to(self.dtype)
        if not torch.isfinite(out).all():
            raise GenerationError("the decoded image contains NaN/Inf even in float32: the latents are not "
                                  "finite (try another sampler, fewer steps or a lower --cfg-scale)")
        return tensor_to_pil(out), notes
