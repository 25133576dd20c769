"""The hires fix (A1111's "Hires. fix"): txt2img at the asked size, an upscale, then an img2img pass that
refines the upscaled picture at the larger size. The request's fields carry A1111's API names (enable_hr,
hr_scale, hr_resize_x, hr_resize_y, hr_upscaler, hr_second_pass_steps, hr_sampler_name, hr_prompt,
hr_negative_prompt) and its denoising strength is the request's `strength`, as A1111 has one
denoising_strength for img2img and the hires pass. A1111's rules, followed here:

- Target size: hr_resize_x / hr_resize_y when either is set (one alone keeps the aspect ratio; both: the
  image is upscaled to cover that size, then its latents are cropped to it, centred), else width and height
  times hr_scale, truncated to whole pixels.
- Upscalers: the "Latent ..." ones interpolate the latents (torch's mode and antialias flag); the image ones
  (Lanczos, Nearest) decode, resize the image and encode it again.
- The second pass runs exactly `hr_second_pass_steps or steps` steps: the last ones of a schedule of
  int(steps / min(strength, 0.999)) steps. (A1111 hands its hires pass the step count, and with a count
  given its setup_img2img_steps takes this branch whatever the img2img_fix_steps option says.) Its noise
  comes from generators seeded afresh with each image's seed: the first draw is the noise added to the
  upscaled latents, later draws feed the ancestral steps, as A1111's per-image generators give them.
"""

import dataclasses

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import FieldError
from .prompt_schedule import ScheduledText
from .sampling import canonical_sampler_name, field_sampler_spec, sampler_spec
from .schedules import schedule_names

# A1111's latent upscale modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
# the request fields that only mean something with enable_hr
HIRES_FIELDS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_sampler_name",
                "hr_scheduler", "hr_prompt", "hr_negative_prompt")
MAX_SCALE = 8.0  # a guard against typos (A1111's slider stops at 4); the cap on the sides decides the rest


def upscaler_name(name) -> str:
    """A1111's spelling of an upscaler name typed in any case."""
    known = {n.lower(): n for n in UPSCALERS}
    if isinstance(name, str) and name.strip().lower() in known:
        return known[name.strip().lower()]
    raise FieldError("hr_upscaler", f"{name!r} is not an upscaler latentdiff has; choose one of "
                                    f"{', '.join(map(repr, UPSCALERS))} (model upscalers such as ESRGAN are not "
                                    f"supported)")


def check_fields(request) -> None:
    """The hires fields of a request, checked without a model (GenerationRequest.validate)."""
    if not isinstance(request.enable_hr, bool):
        raise FieldError("enable_hr", f"must be True or False, not {request.enable_hr!r}")
    if not request.enable_hr:
        defaults = {f.name: f.default for f in dataclasses.fields(request)}
        for name in HIRES_FIELDS:
            if getattr(request, name) != defaults[name]:
                raise FieldError(name, "applies only to the hires fix, which is off: turn it on (enable_hr; on the "
                                       "command line --hr-scale or --hr-resize-x/--hr-resize-y) or leave it out")
        return
    if request.init_image is not None:
        raise FieldError("enable_hr", "is a txt2img option (the second pass is itself an img2img): leave it out "
                                      "with an init image")
    scale = request.hr_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 1.0 <= scale <= MAX_SCALE:
        raise FieldError("hr_scale", f"must be a number from 1 to {MAX_SCALE:g}, not {scale!r}")
    for name in ("hr_resize_x", "hr_resize_y", "hr_second_pass_steps"):
        value = getattr(request, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FieldError(name, f"must be a whole number >= 0 (0: {'steps' if 'steps' in name else 'unset'}), "
                                   f"not {value!r}")
    upscaler_name(request.hr_upscaler)
    if request.hr_sampler_name is not None:
        spec, _ = field_sampler_spec("hr_sampler_name", request.hr_sampler_name)
        if request.eta is not None and not spec.takes_eta:
            raise FieldError("hr_sampler_name", f"{request.hr_sampler_name!r} takes no eta, which this request "
                                                f"sets: leave eta out or pick a sampler with a noise amount")
    if request.hr_scheduler is not None and request.hr_scheduler not in schedule_names():
        raise FieldError("hr_scheduler", f"unknown schedule {request.hr_scheduler!r}; choose one of "
                                         f"{', '.join(schedule_names())}, or leave it out for the first pass's")
    for name, first in (("hr_prompt", request.prompts), ("hr_negative_prompt", request.negative_prompts)):
        value = getattr(request, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(item, str) for item in items):
            raise FieldError(name, f"must be a string or a list of strings, not {value!r}")
        if isinstance(value, (list, tuple)) and len(value) != len(first):
            raise FieldError(name, f"has {len(value)} entries for {len(first)} prompts; give one per prompt, or "
                                   f"one string for all (empty: the first pass's)")


def second_prompts(request) -> tuple[list[str], list[str]]:
    """The second pass's prompts and negative prompts, one per image: empty ones are the first pass's."""
    def per_image(value, first):
        items = list(value) if isinstance(value, (list, tuple)) else [value] * len(first)
        return [item or own for item, own in zip(items, first)]
    return (per_image(request.hr_prompt, request.prompts),
            per_image(request.hr_negative_prompt, request.negative_prompts))


def target_sizes(request, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) the first image is upscaled to, (width, height) after the centred crop), A1111's rule;
    the final sides must be multiples of `multiple` (the model's) within the request's limits."""
    from .request import MAX_SIDE, MIN_SIDE
    w, h, x, y = request.width, request.height, request.hr_resize_x, request.hr_resize_y
    if x == 0 and y == 0:
        up = final = (int(w * request.hr_scale), int(h * request.hr_scale))
        names, how = ("hr_scale", "hr_scale"), f"{request.hr_scale:g} times {w}x{h}"
    elif y == 0:
        up = final = (x, x * h // w)
        names, how = ("hr_resize_x", "hr_resize_x"), f"width {x} with the aspect ratio of {w}x{h}"
    elif x == 0:
        up = final = (y * w // h, y)
        names, how = ("hr_resize_y", "hr_resize_y"), f"height {y} with the aspect ratio of {w}x{h}"
    else:  # cover the asked size, then crop to it
        up = (x, x * h // w) if w / h < x / y else (y * w // h, y)
        final, names, how = (x, y), ("hr_resize_x", "hr_resize_y"), f"{x}x{y}"
    for name, side, label in zip(names, final, ("width", "height")):
        if side % multiple or not MIN_SIDE <= side <= MAX_SIDE:
            raise FieldError(name, f"gives a hires {label} of {side} px ({how}): each hires side must be a multiple "
                                   f"of {multiple} between {MIN_SIDE} and {MAX_SIDE}")
    if max(up) > MAX_SIDE:
        raise FieldError(names[0], f"needs an upscale to {up[0]}x{up[1]} before the crop to {how}: over "
                                   f"{MAX_SIDE} px; choose a size closer to the first pass's aspect ratio")
    return up, final


def prepare(request, multiple: int, first_schedule: str | None):
    """A prepared request's hires fields settled: sizes checked against the model, the upscaler and the second
    pass's sampler in A1111's spelling, and its schedule resolved (so that a prepared request prepares the same
    again): hr_scheduler, else the one the hires sampler's name carries ("DPM++ 2M Karras"), else the first
    pass's as the request named it (`first_schedule`; A1111's hr_scheduler default), else the hires sampler's
    own; without a hires sampler, the first pass's."""
    target_sizes(request, multiple)
    sampler, schedule = request.sampler, request.schedule  # the first pass's, resolved
    if request.hr_sampler_name is not None:
        sampler, suffix = canonical_sampler_name(request.hr_sampler_name)
        schedule = suffix or first_schedule or sampler_spec(sampler)[1]
    return request.replace(hr_upscaler=upscaler_name(request.hr_upscaler), hr_sampler_name=sampler,
                           hr_scheduler=request.hr_scheduler or schedule)


def infotext_fields(request, index: int) -> dict:
    """The hires keys of image `index` (infotext.from_fields names), as A1111 writes them: Hires upscale or
    Hires resize, Hires steps when set, the upscaler, and sampler, schedule and prompts where they differ."""
    if not request.enable_hr:
        return {}
    i = index % len(request.prompts)
    prompts, negatives = second_prompts(request)
    x, y = request.hr_resize_x, request.hr_resize_y
    resized = bool(x or y)  # A1111 writes Hires resize then, else Hires upscale
    return dict(hr_scale=None if resized else request.hr_scale, hr_resize_x=x if resized else None,
                hr_resize_y=y if resized else None, hr_second_pass_steps=request.hr_second_pass_steps or None,
                hr_upscaler=request.hr_upscaler,
                hr_sampler_name=request.hr_sampler_name if request.hr_sampler_name != request.sampler else None,
                hr_scheduler=request.hr_scheduler if request.hr_scheduler != request.schedule else None,
                hr_prompt=prompts[i] if prompts[i] != request.prompts[i] else None,
                hr_negative_prompt=negatives[i] if negatives[i] != request.negative_prompts[i] else None)


def schedule_steps(steps: int, strength: float) -> int:
    """The length of the schedule whose last `steps` steps the second pass runs (A1111's rule)."""
    return int(steps / min(strength, 0.999))


class SecondPass:
    """The hires pass of a prepared request (hires.prepare): built once per request (prompts encoded once),
    called per batch with the first pass's latents."""

    def __init__(self, pipe, request, conds):
        self.pipe = pipe
        self.upscale_size, (width, height) = target_sizes(request, pipe.size_multiple())
        self.steps = request.hr_second_pass_steps or request.steps
        prompts, negatives = second_prompts(request)
        self.request = request.replace(prompt=prompts, negative_prompt=negatives, schedule=request.hr_scheduler,
                                       sampler=request.hr_sampler_name or request.sampler,
                                       steps=schedule_steps(self.steps, request.strength), width=width, height=height,
                                       enable_hr=False)
        same = prompts == request.prompts and negatives == request.negative_prompts
        scheduled = any(isinstance(c, ScheduledText) for c in conds)  # edits count the second pass's steps
        self.conds = conds if same and not scheduled else pipe._conditioning(
            self.request.replace(steps=request.steps), hires_steps=self.steps)

    def __call__(self, latents: torch.Tensor, seeds: list[int], notes: list[str], **run) -> torch.Tensor:
        """The refined latents at the hires size; `run`: _sample's callback, progress and noise_device."""
        upscaled = self.upscale(latents, notes)
        return self.pipe._sample(self.request, self.conds, seeds, latents=upscaled, run_steps=self.steps, **run)

    def upscale(self, latents: torch.Tensor, notes: list[str]) -> torch.Tensor:
        """The first pass's latents at the hires size: upscaled to cover it, then cropped to it, centred."""
        f = self.pipe.config.vae.downsample_factor
        width, height = self.upscale_size
        name = self.request.hr_upscaler
        if name in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[name]
            x = F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias)
        else:
            images, decode_notes = self.pipe.decode(latents)
            notes += decode_notes
            # on the latent grid: the VAE takes multiples of f (A1111 resizes to any size and encodes that)
            size = (width // f * f, height // f * f)
            # the posterior's mean: A1111 samples it from the unseeded global generator, which no seed
            # reproduces; the mean keeps each seed's first draw for the added noise, as A1111 has it
            x = torch.cat([self.pipe.encode_image(resize_image(image, size, IMAGE_UPSCALERS[name]), None)
                           for image in images])
        crop_x = (x.shape[3] - self.request.width // f)
        crop_y = (x.shape[2] - self.request.height // f)
        return x[:, :, crop_y // 2:x.shape[2] - (crop_y + 1) // 2, crop_x // 2:x.shape[3] - (crop_x + 1) // 2]


def resize_image(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """A1111's resize with an image upscaler: scaled by the larger of the two ratios with the upscaler's filter,
    then, if that is not exactly the size, Lanczos to it."""
    scale = max(size[0] / image.width, size[1] / image.height)
    if scale > 1.0:
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample)
    return image if image.size == size else image.resize(size, Image.LANCZOS)
