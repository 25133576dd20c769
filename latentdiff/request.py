"""One generation request: every parameter, its default and its validation in one place.

Every entry point builds a GenerationRequest (CLI flags, a prompts-file line, a PNG's parameters, Python
keyword arguments, later the HTTP API) and the pipeline runs it. Errors are FieldErrors naming the field;
each entry point names it its own way (the CLI as its flag).
"""

import dataclasses
import math
import os
from dataclasses import dataclass

from PIL import Image

from .errors import FieldError, InputError
from .hires import check_fields as check_hires_fields
from .inpaint import check_fields as check_inpaint_fields
from .sampling import field_sampler_spec
from .schedules import schedule_names

MIN_SIDE, MAX_SIDE = 64, 4096
MAX_BATCH = 64
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds (ComfyUI's go that high)
RANDOM_SEED = -1  # A1111's "random"
# A1111's img2img resize modes, by name and by the number its API uses
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    width: int | None = None  # None: the model's native size (img2img: the init image's size)
    height: int | None = None
    steps: int = 20
    sampler: str = "Euler a"
    schedule: str | None = None  # None: the sampler's own (A1111's "Automatic")
    cfg_scale: float = 7.0
    seed: int = RANDOM_SEED  # image i of a batch uses seed + i, iteration k starts at seed + k * batch_size
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1  # A1111 counting: 1 = the model's own layer, 2 = one earlier
    eta: float | None = None  # None: the sampler's default
    strength: float = 0.75  # img2img's denoising strength
    init_image: Image.Image | str | os.PathLike | None = None
    resize_mode: str | int = "just resize"  # img2img with width/height: how the init image gets that size
    image_cfg_scale: float | None = None  # InstructPix2Pix models only (None: 1.5 there); A1111's API name
    # inpainting (latentdiff/inpaint.py; A1111's API names): white = repaint; a path, a PIL image or "alpha"
    mask: Image.Image | str | os.PathLike | None = None
    mask_blur: int = 4  # px, Gaussian standard deviation
    inpainting_mask_invert: bool = False  # repaint the black part instead
    inpainting_fill: str | int = "original"  # masked content: fill, original, latent noise, latent nothing (0-3)
    inpaint_full_res: bool = False  # only the masked region (plus padding), repainted at the full size
    inpaint_full_res_padding: int = 32
    outpaint: str | dict | tuple | None = None  # (left, right, top, bottom) px, or "left:64,right:64"
    # room for the add-ons of later issues; each must stay empty until its feature lands
    loras: tuple = ()  # ((LoRA file or name in the pipeline's LoRA folder, strength or (te, unet)), ...)
    embeddings: tuple = ()
    control: tuple = ()
    # the hires fix (hires.py), by A1111's API names; its denoising strength is `strength`
    enable_hr: bool = False
    hr_scale: float = 2.0  # used when hr_resize_x and hr_resize_y are both 0
    hr_resize_x: int = 0  # 0: from the other side (and the aspect ratio); both 0: hr_scale
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0  # 0: steps
    hr_sampler_name: str | None = None  # None: the sampler
    hr_scheduler: str | None = None  # a schedule name; None: the first pass's if named, else hr_sampler_name's
    hr_prompt: str | list[str] = ""  # "": the prompt
    hr_negative_prompt: str | list[str] = ""

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    @property
    def prompts(self) -> list[str]:
        """One prompt per image of a batch: a list is the batch itself, a string is repeated."""
        return list(self.prompt) if isinstance(self.prompt, (list, tuple)) else [self.prompt] * self.batch_size

    @property
    def negative_prompts(self) -> list[str]:
        negative = self.negative_prompt
        return list(negative) if isinstance(negative, (list, tuple)) else [negative] * len(self.prompts)

    def validate(self) -> "GenerationRequest":
        """Check every field that needs no model; returns self. Raises FieldError naming the field."""
        _check_prompts(self)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _integer(name, value)
                if not MIN_SIDE <= value <= MAX_SIDE:
                    raise FieldError(name, f"{value}: must be between {MIN_SIDE} and {MAX_SIDE} (a multiple of 64 "
                                           f"for SD models); leave it out for the model's native size")
        _integer("steps", self.steps, minimum=1)
        _integer("batch_size", self.batch_size, minimum=1, maximum=MAX_BATCH)
        _integer("n_iter", self.n_iter, minimum=1)
        _integer("clip_skip", self.clip_skip, minimum=1)
        _integer("seed", self.seed, minimum=RANDOM_SEED, maximum=MAX_SEED)
        if self.seed != RANDOM_SEED and self.seed + self.batch_size * self.n_iter - 1 > MAX_SEED:
            raise FieldError("seed", f"{self.seed}: with {self.batch_size * self.n_iter} images the seeds pass "
                                     f"{MAX_SEED}; choose a smaller seed")
        _number("cfg_scale", self.cfg_scale)
        if self.image_cfg_scale is not None:
            _number("image_cfg_scale", self.image_cfg_scale)
        if self.eta is not None:
            _number("eta", self.eta, minimum=0.0)
        _number("strength", self.strength)
        if not 0.0 < self.strength <= 1.0:
            raise FieldError("strength", f"must be in (0, 1], not {self.strength}")
        spec, _ = self.sampler_spec
        if self.eta is not None and not spec.takes_eta:
            raise FieldError("eta", f"is not taken by sampler {self.sampler!r}: leave it out, or pick a sampler "
                                    f"with a noise amount (DDIM, the ancestral and the SDE samplers)")
        if self.schedule is not None and self.schedule not in schedule_names():
            raise FieldError("schedule", f"unknown schedule {self.schedule!r}; choose one of "
                                         f"{', '.join(schedule_names())}, or leave it out for the sampler's own")
        resize_mode(self.resize_mode)
        if self.init_image is not None and not isinstance(self.init_image, (Image.Image, str, os.PathLike)):
            raise FieldError("init_image", f"must be a PIL image or a file path, not {type(self.init_image).__name__}")
        check_hires_fields(self)
        check_inpaint_fields(self)
        _check_loras(self.loras)
        for name in ("embeddings", "control"):
            if getattr(self, name):
                raise FieldError(name, "is not supported yet; leave it out")
        return self

    @property
    def sampler_spec(self):
        """(the sampler's registry record, the schedule to use: the schedule field, else a suffix of the
        sampler's name as in "DPM++ 2M Karras", else the sampler's own)."""
        spec, schedule = field_sampler_spec("sampler", self.sampler)
        return spec, self.schedule or schedule

    def check_size(self, multiple: int, names: tuple[str, str] = ("width", "height")) -> None:
        """Both sides set, in range and multiples of `multiple` (the model's: 64 for SD)."""
        for name, side in zip(names, (self.width, self.height)):
            if side % multiple or not MIN_SIDE <= side <= MAX_SIDE:
                raise FieldError(name, f"{side}: must be a multiple of {multiple} between {MIN_SIDE} and {MAX_SIDE}")


def request_from_kwargs(where: str, **fields) -> GenerationRequest:
    """A request from keyword arguments, with an unknown name reported as such (not a TypeError deep down)."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise InputError(f"{where}: unknown parameter(s) {unknown}; valid ones are {', '.join(FIELD_NAMES)}")
    return GenerationRequest(**fields)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationRequest))
DEFAULTS = GenerationRequest()


def resize_mode(mode: str | int) -> str:
    """A1111's resize mode by name (case-insensitive) or API number (0, 1, 2)."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if isinstance(mode, str) and mode.strip().lower() in RESIZE_MODES:
        return mode.strip().lower()
    raise FieldError("resize_mode", f"{mode!r}: choose one of {', '.join(map(repr, RESIZE_MODES))} (or 0, 1, 2)")


def _check_prompts(request: GenerationRequest) -> None:
    for name in ("prompt", "negative_prompt"):
        value = getattr(request, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(item, str) for item in items):
            raise FieldError(name, f"must be a string or a list of strings, not {value!r}")
        if isinstance(value, (list, tuple)) and not value:
            raise FieldError(name, "is an empty list; give at least one prompt")
    if isinstance(request.prompt, (list, tuple)) and request.batch_size not in (1, len(request.prompt)):
        raise FieldError("batch_size", f"{request.batch_size} differs from the {len(request.prompt)} prompts given; "
                                       f"a list of prompts is the batch: leave batch_size out")
    if isinstance(request.negative_prompt, (list, tuple)) and len(request.negative_prompt) != len(request.prompts):
        raise FieldError("negative_prompt", f"has {len(request.negative_prompt)} entries for {len(request.prompts)} "
                                            f"prompts; give one per prompt, or one string for all")


def _integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError(name, f"must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise FieldError(name, f"must be >= {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise FieldError(name, f"must be <= {maximum}, not {value}")


def _number(name: str, value, *, minimum: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, not {value!r}")
    if minimum is not None and value < minimum:
        raise FieldError(name, f"must be >= {minimum}, not {value}")


def _check_loras(loras) -> None:
    """(file or name, strength) pairs; a strength is a number or (text encoder, U-Net) numbers."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(loras, (list, tuple)):
        raise FieldError("loras", f"must be a list of (file or name, strength) pairs, not {loras!r}")
    for entry in loras:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike))
        strength = entry[1] if ok else None
        if not ok or not (number(strength) or isinstance(strength, (list, tuple)) and len(strength) == 2
                          and all(map(number, strength))):
            raise FieldError("loras", f"entry {entry!r}: give (file or name, strength), the strength a number or "
                                      f"(text encoder, U-Net) numbers, e.g. ('ink_style', 0.8)")
