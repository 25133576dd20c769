"""The pipeline object: prompt -> text features -> sampled latents -> decoded images (txt2img, img2img)."""

import functools
import logging
import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__, hires, inpaint, instruct, speedups
from .conditioning import Cond, concat_family, map_tensors
from .denoisers import CFGDenoiser, DiscreteDenoiser, InstructCFGDenoiser
from .devices import DTYPE_NAMES, check_device, default_device_dtype, parse_dtype, to_device
from .diffedit import FIELD_NAMES as DIFFEDIT_FIELDS, DiffEditRequest, diffedit
from .errors import FieldError, GenerationError, InputError, UnsupportedModelError
from .formats.embeddings import load_embeddings_dir, ti_hashes
from .extra_networks import find_lora, lora_files, negative_tag_notes, prompt_loras, resolve_lora, strip_tags
from .formats.lora import Strength
from .images import as_rgb_image, fit_to_multiple, pil_to_tensor, resize_to, tensor_to_pil
from .infotext import from_fields, hash_list
from .loader import load_model, model_hash, swap_vae, vae_name
from .lora_merge import MergedLoras
from .memory import keep_freed_memory
from .model import StableDiffusion
from .prompt_schedule import PromptPlan, ScheduledCFGDenoiser, ScheduledText
from .prompts import count_chunks, encode_prompts, used_embeddings
from .request import RANDOM_SEED, GenerationRequest, request_from_kwargs, resize_mode
from .resources import demo_model
from .sampling import diffusers_layout
from .sampling_stochastic import brownian_noise_sampler
from .schedules import alphas_cumprod_for, img2img_sigmas, make_sigmas, spacing_options
from .threads import check_threads, generation_threads
from .tiling import check_tiling_mode, tiled_decode, tiled_encode, wants_tiling

log = logging.getLogger("latentdiff")


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks taken, e.g. the fp32 VAE retry
    request: GenerationRequest | None = None  # what ran, with seed, size and init image filled in


RUN_OPTIONS = ("callback", "progress", "return_latents", "noise_device")


class Interrupted(Exception):
    """Raised by a generate() callback to stop sampling early (A1111's interrupt and skip): the pipeline
    decodes `latents` (give the step's denoised prediction) as the batch's images; `skip` moves on to the
    next n_iter iteration, else the request ends there."""

    def __init__(self, latents: torch.Tensor, step: int, *, skip: bool = False):
        super().__init__(f"{'skipped' if skip else 'interrupted'} at step {step + 1}")
        self.latents, self.step, self.skip = latents, step, skip


class Pipeline:
    """Speed and memory options (off by default except the dtype / memory layout choice and the last):
    `vae_tiling` "auto" | "on" | "off": decode and encode in overlapping tiles ("auto": above 1024x1024 px);
    `attention_slice`: sliced attention with query blocks of that many tokens (None: off);
    `compile`: torch.compile the U-Net, falling back to eager if compiling fails;
    `offload` (CUDA only): text encoder and VAE wait on the CPU and visit the GPU only while they run;
    `keep_freed_memory` (CPU; on by default): sampling reuses freed memory instead of fresh pages from the
    kernel (memory.keep_freed_memory);
    `threads`: intra-op CPU threads while generating; None: as many as there are idle cores, at most the
    process's setting, which is restored after each generation (threads.generation_threads);
    `embeddings_dir`: a folder of textual-inversion embeddings, read once; a file's name (its stem) used as a
    word in a prompt stands for its vectors (formats/embeddings.py, prompts.py);
    `lora_dir`: the folder LoRA names are found in (prompt tags `<lora:name:0.8>`, set_loras, a request's `loras`;
    extra_networks.py)."""

    def __init__(self, model: StableDiffusion, *, device=None, dtype=None, source: str | Path | None = None,
                 vae_tiling: str = "auto", attention_slice: int | None = None, compile: bool = False,
                 offload: bool = False, keep_freed_memory: bool = True, threads: int | None = None,
                 vae_source: str | Path | None = None, embeddings_dir: str | Path | None = None,
                 lora_dir: str | Path | None = None):
        self.model = model
        self.embeddings = load_embeddings_dir(embeddings_dir, model.config.text) if embeddings_dir else {}
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        self.standing_loras: list[tuple[Path, Strength]] = []  # set_loras': merged for every generation
        self._merged_loras = MergedLoras(model)
        self.vae_source = Path(vae_source) if vae_source else None  # a VAE file swapped in (loader.swap_vae)
        self.threads = threads if threads is None else check_threads(threads)
        self.keep_freed_memory = keep_freed_memory
        self.source = Path(source) if source else None
        self.vae_tiling = check_tiling_mode(vae_tiling)
        speedups.set_attention_slicing(model, attention_slice)
        self.offload, self.compile = offload, compile
        self.to(*default_device_dtype(device, dtype))
        self._unet = speedups.compile_unet(model.unet, self.device) if compile else model.unet

    @classmethod
    def from_pretrained(cls, source: str | Path | None = None, *, config=None, prediction: str | None = None,
                        device=None, dtype=None, vae: str | Path | None = None, loras=(), **options) -> "Pipeline":
        """A single-file checkpoint or a diffusers folder; `config` is a preset name (e.g. "sd2-v") or a
        ModelConfig for single files whose architecture should not be detected. `vae`: a VAE file or folder
        to use instead of the model's own (loader.swap_vae). `loras`: [(LoRA file, weight)] merged in
        (set_loras). `options`: see the class.
        Without a source: the bundled demo model."""
        source = demo_model() if source is None else source
        device, dtype = default_device_dtype(device, dtype)
        model = load_model(source, config=config, prediction=prediction, dtype=dtype)
        vae_source = swap_vae(model, vae) if vae is not None else None
        pipe = cls(model, device=device, dtype=dtype, source=source, vae_source=vae_source, **options)
        if loras:
            pipe.set_loras(loras)
        return pipe

    def set_loras(self, loras) -> None:
        """Merge [(LoRA file, or a name in lora_dir; strength)] into the weights for every generation (a request's
        `loras` and prompt tags add to them); a strength is one number or (text encoder, U-Net). What was merged
        before is restored bit for bit first; `set_loras([])` removes them all. All files are read and checked
        before anything changes."""
        standing = [(resolve_lora(path, self.lora_dir), strength) for path, strength in loras]
        self._merged_loras.merge(standing)
        self.standing_loras = standing

    @property
    def loras(self) -> list[tuple[Path, Strength, str]]:
        """The LoRAs merged now: (path, strength, A1111 short hash)."""
        return self._merged_loras.used

    def _request_loras(self, request: GenerationRequest) -> list[str]:
        """Merge what a request asks for: the standing LoRAs, its `loras` field and its prompt tags (the first
        prompt's, as A1111). Returns notes on tags not applied."""
        tags, notes = prompt_loras(request.prompts)
        notes += negative_tag_notes(request.negative_prompts)
        if tags and self.lora_dir is None:
            raise FieldError("prompt", f"names the LoRA {tags[0].name!r} in a tag, and no LoRA folder is set to find "
                                       f"it in: give the pipeline lora_dir= (the command line: --lora-dir DIR)")
        files = lora_files(self.lora_dir) if tags else {}
        wanted = [*self.standing_loras, *((resolve_lora(p, self.lora_dir), s) for p, s in request.loras),
                  *((find_lora(tag.name, self.lora_dir, files), tag.strength) for tag in tags)]
        self._merged_loras.merge(wanted)
        return notes

    def to(self, *args, device=None, dtype=None) -> "Pipeline":
        """Like nn.Module.to: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cpu", "bf16")`."""
        for arg in args:
            is_dtype = isinstance(arg, torch.dtype) or (isinstance(arg, str) and arg.lower() in DTYPE_NAMES)
            dtype, device = (arg, device) if is_dtype else (dtype, arg)
        device = check_device(device) if device is not None else self.model.device
        dtype = parse_dtype(dtype) if dtype is not None else None
        if self.offload and device.type != "cuda":
            raise FieldError("offload", f"keeps the text encoder and VAE in CPU memory between their runs on a "
                                        f"CUDA GPU; this pipeline runs on {device}, where it would save nothing: "
                                        f"leave it out (or run on cuda)")
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

    def encode_prompt(self, prompts: list[str], clip_skip: int = 1, chunks: int = 1) -> torch.Tensor:
        """Token features for each prompt, in A1111's prompt syntax (latentdiff/prompts.py): emphasis
        weights, 75-token chunks joined along the token axis, at least `chunks` of them. `clip_skip` counts
        as A1111 does: 1 = the model's own layer, 2 = one layer earlier, ..."""
        if not 1 <= clip_skip <= self.config.text.layers:
            raise FieldError("clip_skip", f"must be between 1 and {self.config.text.layers}, not {clip_skip}")
        layer = self.config.text.output_layer - (clip_skip - 1)
        with self._on_device(self.model.text_encoder) as text_encoder:
            return encode_prompts(prompts, self.model.tokenizer,
                                  lambda tokens, **kw: text_encoder(tokens.to(self.device), layer=layer, **kw),
                                  chunks, self.embeddings)

    # -- sampling -----------------------------------------------------------------------------------

    def size_multiple(self) -> int:
        """Image sides must divide down through the VAE and every U-Net level: 64 for SD, whose
        8x VAE feeds a U-Net that halves the latent three times."""
        return self.config.vae.downsample_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    def _generators(self, seeds: list[int], noise_device: str) -> list[torch.Generator]:
        """One generator per image seeded with its own seed (A1111: image i gets seed + i), so a batch
        gives the images of separate runs. Noise is drawn on `noise_device` (CPU by default: the same seed
        gives the same image on any device) and moved."""
        return [torch.Generator(noise_device).manual_seed(s) for s in seeds]

    def _randn(self, gens: list[torch.Generator], shape: tuple) -> torch.Tensor:
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in gens])
        return to_device(noise, self.device)

    def _denoiser(self, cond: Cond, uncond: Cond | None, cfg_scale, image_cfg_scale=None):
        dtype = self.dtype
        unet = self._unet

        def network(x, t, context, **parts):  # latents stay fp32 between steps; the network runs in the model dtype
            return unet(x.to(dtype), t, context.to(dtype), **map_tensors(parts, lambda p: p.to(dtype))).float()

        acp = alphas_cumprod_for(self.config)  # on the host, as the sigmas
        base = DiscreteDenoiser(network, acp, prediction=self.config.prediction)
        if image_cfg_scale is not None:  # InstructPix2Pix: three-way guidance
            return InstructCFGDenoiser(base), dict(cond=cond, uncond=uncond, cfg_scale=cfg_scale,
                                                   image_cfg_scale=image_cfg_scale), acp
        guide = ScheduledCFGDenoiser(base) if isinstance(cond, ScheduledText) else CFGDenoiser(base)
        return guide, dict(cond=cond, uncond=uncond, cfg_scale=cfg_scale), acp

    # -- generation ---------------------------------------------------------------------------------

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", **options) -> Result:
        """`options`: any GenerationRequest field (steps, sampler, seed, ...) and the run options of generate()."""
        return self._run("txt2img", dict(prompt=prompt, negative_prompt=negative_prompt), options)

    def img2img(self, image, prompt: str | list[str], negative_prompt: str | list[str] = "", **options) -> Result:
        """SDEdit: encode the image (a PIL image or a path), noise it to the strength's level, denoise the rest
        of the schedule. Without width/height the image keeps its size, cropped to the model's size multiple.
        With `mask` (white = repaint) or `outpaint` it inpaints (latentdiff/inpaint.py)."""
        return self._run("img2img", dict(init_image=image, prompt=prompt, negative_prompt=negative_prompt), options)

    def diffedit(self, image, source_prompt: str, target_prompt: str, **options):
        """DiffEdit (diffedit.py): edit what the target prompt changes from the source prompt, keep the rest.
        `options`: any DiffEditRequest field (steps, cfg_scale, seed, mask_encode_strength, ...)."""
        unknown = sorted(set(options) - set(DIFFEDIT_FIELDS))
        if unknown:
            raise InputError(f"diffedit: unknown parameter(s) {unknown}; valid ones are {', '.join(DIFFEDIT_FIELDS)}")
        request = DiffEditRequest(image=image, source_prompt=source_prompt, target_prompt=target_prompt, **options)
        return diffedit(self, request)

    def _run(self, where: str, fields: dict, options: dict) -> Result:
        run = {k: options.pop(k) for k in RUN_OPTIONS if k in options}
        if options.get("seed", 0) is None:  # Python callers say None for "random"
            options["seed"] = RANDOM_SEED
        return self.generate(request_from_kwargs(where, **fields, **options), **run)

    def prepare(self, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
        """The request with everything the model decides filled in (size, seed, init image at its final size),
        checked against the model. Returns it with notes for the user (e.g. how the init image was fitted)."""
        if not isinstance(request, GenerationRequest):
            raise InputError(f"generate() needs a GenerationRequest, not {type(request).__name__}")
        request.validate()
        unet = self.config.unet
        inpaint.check_model(request, unet)
        usable = instruct.is_instruct_model(self.config) or inpaint.is_inpainting_unet(unet)
        if unet.in_channels != unet.out_channels and not usable:  # nothing builds the others' conditioning
            raise UnsupportedModelError(
                f"this checkpoint is {concat_family(unet.in_channels, unet.out_channels)}: its U-Net takes "
                f"{unet.in_channels} input channels, and the pipeline cannot yet build that conditioning; "
                f"use a text-to-image checkpoint ({unet.out_channels} input channels)")
        layers = self.config.text.layers
        if request.clip_skip > layers:
            raise FieldError("clip_skip", f"must be between 1 and {layers} (this text encoder's layers), "
                                          f"not {request.clip_skip}")
        image_cfg_scale = instruct.check_request(request, self.config)
        multiple, notes = self.size_multiple(), []
        seed = secrets.randbelow(2**32) if request.seed == RANDOM_SEED else request.seed
        width, height, image, mask = request.width, request.height, request.init_image, request.mask
        if isinstance(mask, str) and mask == inpaint.MASK_FROM_ALPHA:
            mask = inpaint.mask_from_alpha(image)
        if image is not None:
            image = as_rgb_image(image)
            if request.outpaint is not None:  # the canvas first, so that Size is the canvas when replayed
                image, mask = inpaint.outpaint_canvas(image, inpaint.outpaint_margins(request.outpaint))
            mask = None if mask is None else inpaint.load_mask(mask)
            fitted = _fit_init_image(image, width, height, resize_mode(request.resize_mode), multiple, notes)
            if mask is not None:  # the mask goes where the image went
                mask = inpaint.check_mask_size(mask, image.size, notes)
                mask = _fit_init_image(mask.convert("RGB"), width, height, resize_mode(request.resize_mode),
                                       multiple, []).convert("L")
            image = fitted
            width, height = image.size
            if int(request.steps * request.strength) < 1:
                raise FieldError("strength", f"{request.strength} with {request.steps} steps runs no step "
                                             f"(int(steps * strength) == 0): raise the strength or the steps")
        spec, schedule = request.sampler_spec  # recorded by A1111's name, with the schedule it resolves to
        prepared = request.replace(seed=seed, sampler=spec.name, schedule=schedule, init_image=image, mask=mask,
                                   width=width or self.config.resolution, height=height or self.config.resolution,
                                   batch_size=len(request.prompts), resize_mode=resize_mode(request.resize_mode),
                                   image_cfg_scale=image_cfg_scale)
        prepared.check_size(multiple)
        if prepared.enable_hr:
            prepared = hires.prepare(prepared, multiple, request.schedule)
        return prepared, notes

    @torch.no_grad()
    def generate(self, request: GenerationRequest, *, callback=None, progress: bool = True,
                 return_latents: bool = False, noise_device: str = "cpu") -> Result:
        """Run a request: n_iter sampling runs of batch_size images. `callback` is called every step with the
        step index, sigma, the current latents and the denoised prediction, and may raise Interrupted to stop
        early (the server's interrupt and skip); initial noise is drawn on `noise_device` (the CPU by default,
        so a seed gives the same image on any device)."""
        request, notes = self.prepare(request)
        notes += self._request_loras(request)
        images, seeds, latents = [], [], []
        inpainting = inpaint.for_request(request, notes)  # None without a mask
        with generation_threads(self.threads):
            conds = self._conditioning(request)  # once: every iteration has the same prompts
            second_pass = hires.SecondPass(self, request, conds) if request.enable_hr else None
            for iteration in range(request.n_iter):
                first = request.seed + iteration * request.batch_size
                batch_seeds = [first + i for i in range(request.batch_size)]
                try:
                    x, stop = self._sample(request, conds, batch_seeds, callback, progress, noise_device,
                                           inpainting), None
                    if second_pass is not None:  # the hires fix: upscaled, then refined at the larger size
                        x = second_pass(x, batch_seeds, notes, callback=callback, progress=progress,
                                        noise_device=noise_device)
                except Interrupted as e:  # what it has: the last step's denoised latents
                    x, stop = e.latents, e
                    notes.append(f"iteration {iteration + 1}: {e}")
                decoded, decode_notes = self.decode(x)
                if inpainting is not None:
                    decoded = [inpainting.paste_back(image) for image in decoded]
                images += decoded
                seeds += batch_seeds
                notes += decode_notes
                if return_latents:
                    latents.append(x)
                if stop is not None and not stop.skip:
                    break
        return Result(images=images, seeds=seeds, latents=torch.cat(latents) if latents else None, notes=notes,
                      request=request)

    def infotext(self, request: GenerationRequest, index: int) -> str:
        """A1111's parameters text for image `index` of a prepared request (Result.request), as PNGs carry it."""
        i = index % request.batch_size
        fields = dict(prompt=request.prompts[i], negative_prompt=request.negative_prompts[i], steps=request.steps,
                      sampler=request.sampler, schedule=request.schedule, cfg_scale=request.cfg_scale,
                      seed=request.seed + index, width=request.width, height=request.height,
                      clip_skip=request.clip_skip, eta=request.eta, image_cfg_scale=request.image_cfg_scale,
                      strength=request.strength if request.init_image is not None or request.enable_hr else None,
                      **hires.infotext_fields(request, index))
        fields |= inpaint.infotext_fields(request)
        vae = {"VAE hash": self.vae_hash, "VAE": vae_name(self.vae_source)} if self.vae_source else {}
        used = {id(e): e for text in (strip_tags(fields["prompt"]), fields["negative_prompt"])
                for e in used_embeddings(text, self.embeddings)}
        ti = {"TI hashes": ti_hashes(used.values())} if used else {}
        return from_fields(fields, {"Model hash": self.model_hash,
                                    "Model": self.source.stem if self.source else self.config.name,
                                    **vae, **ti, **self._lora_infotext(), "Version": f"latentdiff {__version__}"})

    def _lora_infotext(self) -> dict:
        """A1111's `Lora hashes` entry: "name: hash, ..." (names without ":" and ",", as A1111 writes them)."""
        return {"Lora hashes": hash_list((p.stem, h) for p, _, h in self.loras)} if self.loras else {}

    @functools.cached_property
    def model_hash(self) -> str | None:
        """A1111's short hash of the model file (read once: hashing a 4 GB file takes seconds)."""
        return model_hash(self.source) if self.source else None

    @functools.cached_property
    def vae_hash(self) -> str | None:
        """The same short hash of the swapped-in VAE's file."""
        return model_hash(self.vae_source) if self.vae_source else None

    def _conditioning(self, request: GenerationRequest, hires_steps: int | None = None
                      ) -> tuple[Cond | ScheduledText, Cond | ScheduledText | None]:
        """The (cond, uncond) records of a request's prompts; uncond None without guidance. Prompts with
        editing, alternation or AND give ScheduledText records instead (prompt_schedule.py), scheduled over
        the request's steps, or with `hires_steps` over a hires fix's second pass of that many steps."""
        spec, _ = request.sampler_spec
        calls = 2 if spec.second_order else 1  # A1111 counts model calls: two per step for these samplers
        guided = instruct.needs_uncond(request.cfg_scale, request.image_cfg_scale)
        # the plan encodes the negative prompts when cfg_scale != 1; InstructPix2Pix's image guidance needs them too
        plan_cfg = request.cfg_scale if request.cfg_scale != 1.0 or not guided else 0.0
        prompts = [strip_tags(p) for p in request.prompts]  # extra-network tags are not words (A1111)
        plan = PromptPlan.of(prompts, request.negative_prompts, request.steps * calls, plan_cfg,
                             hires_steps and hires_steps * calls)
        if plan.scheduled and request.image_cfg_scale is not None:
            raise FieldError("prompt", "uses prompt editing, alternation or AND, which InstructPix2Pix checkpoints "
                                       "(three-way guidance) cannot take yet: write the instruction without them")
        if plan.scheduled:
            return plan.encode(lambda texts, chunks: self.encode_prompt(texts, request.clip_skip, chunks),
                               lambda texts: count_chunks(texts, self.model.tokenizer, self.embeddings))
        prompts, negatives = plan.prompts, plan.negatives
        chunks = 1  # CFG batches cond and uncond: both get the chunk count of the longer
        if guided:
            chunks = count_chunks(prompts + negatives, self.model.tokenizer, self.embeddings)
        cond = Cond(context=self.encode_prompt(prompts, request.clip_skip, chunks))
        uncond = None
        if guided:
            uncond = Cond(context=self.encode_prompt(negatives, request.clip_skip, chunks))
        if request.image_cfg_scale is not None:  # InstructPix2Pix: the image's latents beside every call's
            latents = instruct.image_latents(self.posterior(request.init_image)).expand(len(prompts), -1, -1, -1)
            cond, uncond = instruct.with_image(cond, latents), instruct.with_image(uncond, latents)
        return cond, uncond

    def _sample(self, request: GenerationRequest, conds: tuple[Cond, Cond | None], seeds: list[int], callback,
                progress, noise_device, inpainting: "inpaint.Inpainting | None" = None,
                latents: torch.Tensor | None = None, run_steps: int | None = None):
        """Sampled latents for one batch; with `latents` (the hires fix's second pass), the last `run_steps`
        steps of the request's schedule from those latents plus the seeds' first noise draw."""
        spec, schedule = request.sampler_spec
        cond, uncond = conds
        denoiser, extra_args, acp = self._denoiser(cond, uncond, request.cfg_scale, request.image_cfg_scale)
        # sigmas stay on the host: samplers branch on them every step, which must not sync with a GPU
        # diffusers' spacings laid out as this sampler's diffusers scheduler does
        sigmas = make_sigmas(schedule, request.steps, acp,
                             **spacing_options(schedule, diffusers_layout(spec.fn), self.config))

        f = self.config.vae.downsample_factor
        shape = (self.config.unet.out_channels, request.height // f, request.width // f)
        gens = self._generators(seeds, noise_device)
        if latents is not None:
            sigmas = sigmas[len(sigmas) - 1 - run_steps:]
            x = latents + self._randn(gens, shape) * sigmas[0]
        elif request.init_image is None:
            x = self._randn(gens, shape) * sigmas[0]
        else:  # draw order as diffusers' img2img: posterior sample, then the added noise
            sigmas = img2img_sigmas(sigmas, request.strength)
            latents = self.encode_image(request.init_image if inpainting is None else inpainting.image, gens)
            noise = self._randn(gens, shape)
            if inpainting is not None:
                latents, denoiser, extra_args, finish = inpaint.start_sampling(
                    inpainting, latents, denoiser, extra_args, encode=lambda pixels: self.encode_image(pixels, gens),
                    fresh_noise=lambda: self._randn(self._generators(seeds, noise_device), shape),
                    inpainting_unet=inpaint.is_inpainting_unet(self.config.unet))
            x = latents + noise * sigmas[0]
        if inpainting is None and inpaint.is_inpainting_unet(self.config.unet):  # nothing to keep: all repainted
            extra_args = inpaint.whole_image_conditioning(
                extra_args, encode=lambda pixels: self.encode_image(pixels, gens), size=(request.height, request.width))

        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", unit="step")

        def on_step(info):
            bar.update(1)
            if callback is not None:
                callback(info)

        options = {} if request.eta is None else {"eta": request.eta}
        noise = None if spec.noise == "none" else lambda sigma, sigma_next: self._randn(gens, shape)  # noqa: E731
        if spec.noise == "brownian":  # its two draws per step must correlate like a Brownian path
            noise = brownian_noise_sampler(x, draw=noise)
        keep = self.keep_freed_memory and self.device.type == "cpu"
        with keep_freed_memory() if keep else nullcontext(), bar:  # the bar closes on an Interrupted too
            x = spec.fn(denoiser, x, sigmas, extra_args=extra_args, callback=on_step, noise_sampler=noise, **options)
        if inpainting is not None:
            x = finish(x)
        # a schedule ending above 0 (diffusers' DDIM / PNDM spacings) leaves x in sigma space at that sigma,
        # where those schedulers return the variance-preserving latents; for a schedule ending at 0 this is x / 1
        return x / (float(sigmas[-1]) ** 2 + 1) ** 0.5

    # -- autoencoder --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Image.Image | torch.Tensor, gens: list[torch.Generator] | None) -> torch.Tensor:
        """Scaled latents: one posterior sample per generator (as diffusers' img2img draws them); without
        generators, the posterior's mean (the hires fix's image upscalers)."""
        posterior = self.posterior(image)
        if gens is None:
            return posterior.mode().float() * self.config.latent_scale
        return torch.cat([posterior.sample(generator=g).float() for g in gens]) * self.config.latent_scale

    @torch.no_grad()
    def posterior(self, image: Image.Image | torch.Tensor):
        """The VAE's posterior of an image (tiled as vae_tiling says): unscaled latents' mean and spread.
        `image`: a PIL image or a (1, 3, H, W) tensor in [-1, 1]."""
        x = (image if isinstance(image, torch.Tensor) else pil_to_tensor(image)).to(self.device, self.dtype)
        with self._on_device(self.model.vae) as vae:
            return tiled_encode(vae, x) if wants_tiling(self.vae_tiling, *x.shape[2:]) else vae.encode(x)

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


def _side_like(side: int, other: int, other_target: int, multiple: int) -> int:
    """The side that keeps an image's aspect ratio when its other side becomes `other_target`, rounded to the
    size multiple (img2img given only a width or only a height)."""
    return max(multiple, round(side * other_target / other / multiple) * multiple)


def _fit_init_image(image: Image.Image, width, height, mode: str, multiple: int, notes: list[str]) -> Image.Image:
    """The init image at its final size: its own, cropped to the size multiple (by less than `multiple` px),
    when no size is asked for or the asked size is that one (so a replay from a PNG's Size draws the same
    image as the run without one); else resized to the asked size by the resize mode."""
    if min(image.size) < multiple:
        raise FieldError("init_image", f"is {image.width}x{image.height}: each side must be at least {multiple} px")
    fitted = fit_to_multiple(image, multiple)
    if width is None and height is None or (width, height) == fitted.size:
        if fitted.size != image.size:
            notes.append(f"init image cropped from {image.width}x{image.height} to {fitted.width}x{fitted.height} "
                         f"(sides must be multiples of {multiple})")
        return fitted
    width = width or _side_like(image.width, image.height, height, multiple)
    height = height or _side_like(image.height, image.width, width, multiple)
    GenerationRequest(width=width, height=height).check_size(multiple)
    return resize_to(image, width, height, mode)
