"""AUTOMATIC1111's txt2img / img2img JSON -> GenerationRequest, and the response's `parameters` and `info`.

One alias table maps A1111's field names to the request's; every request field is either there or in
NOT_IN_A1111_JSON (tests/test_server_units.py checks), so a field a later issue adds to the request
reaches the API by one line here. A feature's parts are read only with its switch, as A1111 reads them
(clients send them always): the hires fix's (txt2img) with enable_hr, the inpainting fields (img2img) with
a mask. Fields latentdiff cannot honour are accepted and named in `info["ignored_fields"]` unless they hold
A1111's "off" value (restore_faces false, styles [], ...), which changes nothing. Errors are FieldErrors
naming the A1111 field (`field` = its JSON path).
"""

import base64
import binascii
import inspect
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import FieldError, InputError
from ..hires import target_sizes
from ..images import as_rgb_image
from ..infotext import A1111_SCHEDULES
from ..instruct import is_instruct_model
from ..request import FIELD_NAMES, RANDOM_SEED, GenerationRequest
from ..schedules import schedule_names

# the hires fix's parts (txt2img, hires.py) and the inpainting fields (img2img, inpaint.py), by A1111's names
HIRES_FIELDS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_sampler_name",
                "hr_scheduler", "hr_prompt", "hr_negative_prompt")
MASK_FIELDS = ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
               "inpainting_mask_invert")
# A1111 name -> GenerationRequest field
ALIASES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "steps": "steps", "sampler_name": "sampler", "scheduler": "schedule", "cfg_scale": "cfg_scale",
    "seed": "seed", "batch_size": "batch_size", "n_iter": "n_iter", "eta": "eta",
    "denoising_strength": "strength", "init_images": "init_image", "resize_mode": "resize_mode",
    "image_cfg_scale": "image_cfg_scale", "mask": "mask", "enable_hr": "enable_hr",
    **{name: name for name in HIRES_FIELDS + MASK_FIELDS},
}
# request fields A1111's JSON does not carry by a field of its own: clip skip is the CLIP_stop_at_last_layers
# option (or override), LoRAs and embeddings are named in the prompt, outpaint is latentdiff's own (A1111's
# outpainting is a script); control awaits its issue
NOT_IN_A1111_JSON = {"clip_skip", "loras", "embeddings", "control", "outpaint"}
IMG2IMG_ONLY = {"init_images", "resize_mode", "image_cfg_scale", "mask", *MASK_FIELDS}
TXT2IMG_ONLY = {"enable_hr", *HIRES_FIELDS}
SWITCHES = {"enable_hr", "mask"}  # set in the other mode: listed as ignored (their parts are not)
# request fields that arrive as one base64 image (init_images is a list of them, read below)
IMAGE_FIELDS = ("mask",)
# A1111's request defaults where they differ from GenerationRequest's (its processing classes and API models)
A1111_DEFAULTS = {"steps": 50, "sampler_name": "Euler", "scheduler": None, "seed": RANDOM_SEED, "cfg_scale": 7.0,
                  "batch_size": 1, "n_iter": 1, "denoising_strength": 0.75, "resize_mode": 0}
# A1111's img2img defaults of the inpainting fields (StableDiffusionProcessingImg2Img): applied with a mask
MASK_DEFAULTS = {"mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
                 "inpainting_mask_invert": 0}
# the values of hr_sampler_name / hr_scheduler that mean the first pass's (A1111's UI sends these words)
SAME_SAMPLER, SAME_SCHEDULER = (None, "", "Use same sampler"), (None, "", "Use same scheduler")
# fields the server itself reads, and fields that never change an image
FIRST_PHASE = ("firstphase_width", "firstphase_height")  # A1111's legacy first-pass size (txt2img)
SERVER_FIELDS = {"send_images", "save_images", "override_settings", "sampler_index", "include_init_images",
                 *FIRST_PHASE, "mask_blur_x", "mask_blur_y"}
NO_EFFECT = {"do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "force_task_id",
             "disable_extra_networks"}
# A1111 fields latentdiff does not implement, with the values that switch them off (then nothing is ignored)
OFF = {"styles": ([], None), "subseed": (-1, None), "subseed_strength": (0, None), "seed_resize_from_h": (-1, 0, None),
       "seed_resize_from_w": (-1, 0, None), "restore_faces": (False, None), "tiling": (False, None),
       "s_min_uncond": (0, None), "s_churn": (0, None), "s_tmax": (0, None),
       "s_tmin": (0, None), "s_noise": (1, None), "refiner_checkpoint": (None, ""), "refiner_switch_at": (None, 0),
       "firstpass_image": (None, ""), "script_name": (None, ""), "script_args": ([], None), "comments": ({}, None),
       "alwayson_scripts": ({}, None), "infotext": (None, ""), "initial_noise_multiplier": (1, None),
       "latent_mask": (None, "")}
# parts of a feature that latentdiff does not implement, read only with the feature's switch, and their off
# values (mask_round: latentdiff rounds the latent mask, as A1111 by default)
HIRES_PARTS = {"hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_additional_modules":
               (None, [], ["Use same choices"]), "hr_cfg": (), "hr_distilled_cfg": ()}
MASK_PARTS = {"mask_round": (True, None)}
# options a request may override (override_settings) and the request field each sets
OVERRIDES = {"CLIP_stop_at_last_layers": "clip_skip"}


@dataclass(frozen=True)
class Caps:
    """What one request may ask for (documented in the README's Server section)."""
    max_steps: int = 150
    max_pixels: int = 2048 * 2048  # width x height of each generated image
    max_images: int = 64  # batch_size x n_iter
    max_input_pixels: int = 4096 * 4096  # each uploaded image


@dataclass
class Parsed:
    request: GenerationRequest
    ignored: list[str]
    send_images: bool
    save_images: bool
    parameters: dict  # A1111's echo of the request, defaults filled in, images left out


def a1111_name(field: str) -> str:
    """The A1111 JSON path of a request field, for error messages."""
    reverse = {v: k for k, v in ALIASES.items()} | {v: f"override_settings.{k}" for k, v in OVERRIDES.items()}
    return reverse.get(field, field)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FieldError("body", f"is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object of request fields, not {type(body).__name__}")
    return body


def _mapped(body: dict, mode: str) -> tuple[dict, list[str]]:
    """(request fields from the aliased A1111 fields this request reads, the A1111 fields given that cannot be
    honoured). A feature's parts are read only with its switch on; a part left null is left out."""
    fields, ignored = {}, []
    hires_on = mode == "txt2img" and body.get("enable_hr") not in (None, False)
    mask_on = mode == "img2img" and body.get("mask") not in (None, "")
    for name, value in body.items():
        if name in ALIASES:
            if _reads(name, mode, hires_on, mask_on) and not (value is None and name in HIRES_FIELDS + MASK_FIELDS):
                fields[ALIASES[name]] = value
            elif name in SWITCHES and value not in (None, False, ""):
                ignored.append(name)  # e.g. a mask sent to txt2img
        elif name in OFF:
            if value not in OFF[name]:
                ignored.append(name)
        elif name in HIRES_PARTS or name in MASK_PARTS:
            on, off = (hires_on, HIRES_PARTS[name]) if name in HIRES_PARTS else (mask_on, MASK_PARTS[name])
            ignored += [name] if on and value not in off else []
        elif name not in SERVER_FIELDS | NO_EFFECT:
            ignored.append(name)  # a field unknown here
    return fields, ignored


def _reads(name: str, mode: str, hires_on: bool, mask_on: bool) -> bool:
    """Whether a request reads an aliased field: each mode its own, a feature's parts with its switch. (txt2img's
    denoising_strength is the hires fix's, as in A1111.)"""
    if name in HIRES_FIELDS or name == "denoising_strength" and mode == "txt2img":
        return hires_on
    if name in MASK_FIELDS:
        return mask_on
    return not (name in TXT2IMG_ONLY and mode != "txt2img" or name in IMG2IMG_ONLY and mode != "img2img")


def parse_generation(body: dict, mode: str, *, options: dict, checkpoint: str, caps: Caps) -> Parsed:
    """A txt2img / img2img request body -> the request to run (for_model() settles what depends on the model).
    `options`: the server's A1111 options (CLIP_stop_at_last_layers), `checkpoint`: the loaded model's title."""
    fields, ignored = _mapped(body, mode)
    fields.setdefault("steps", A1111_DEFAULTS["steps"])
    if fields.get("sampler") is None:
        fields["sampler"] = body.get("sampler_index") or A1111_DEFAULTS["sampler_name"]
    fields["schedule"] = _schedule(fields.get("schedule"))
    if fields.get("seed") is None:
        fields["seed"] = RANDOM_SEED
    if mode == "txt2img":
        _first_phase(body, fields)
    else:  # A1111's img2img has no first pass
        ignored += [name for name in FIRST_PHASE if body.get(name) not in (None, 0)]
    if fields.get("width") is None and fields.get("height") is None:
        fields.pop("width", None), fields.pop("height", None)
    for name in ("negative_prompt", "prompt"):
        if fields.get(name) is None:
            fields[name] = ""
    if mode == "img2img":
        fields["init_image"] = _init_image(fields.get("init_image"), caps)
        fields.setdefault("strength", A1111_DEFAULTS["denoising_strength"])
        fields.setdefault("resize_mode", A1111_DEFAULTS["resize_mode"])
    if fields.get("enable_hr") is not None:
        _hires(fields)
    if fields.get("mask") not in (None, ""):
        if "mask_blur" not in fields:
            fields["mask_blur"] = _mask_blur(body)
        fields |= {name: value for name, value in MASK_DEFAULTS.items() if name not in fields}
        for name in ("inpaint_full_res", "inpainting_mask_invert"):  # A1111's API sends 0/1 or true/false
            fields[name] = _as_bool(fields[name])
    for name in IMAGE_FIELDS:
        if fields.get(name) not in (None, ""):
            fields[name] = decode_image(fields[name], name, caps, rgb=False)
    if fields.get("eta") is not None and _sampler_eta(fields["sampler"]) in (None, fields["eta"]):
        # A1111 passes eta only to the samplers that have one (clients send it always) and records it only
        # when it is not the sampler's own
        fields.pop("eta")
    fields["clip_skip"] = options.get("CLIP_stop_at_last_layers", 1)
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise FieldError("override_settings", f"must be an object of option names and values, not {overrides!r}")
    for key, value in overrides.items():
        if key in OVERRIDES:
            fields[OVERRIDES[key]] = value
        elif not (key == "sd_model_checkpoint" and value == checkpoint):
            ignored.append(f"override_settings.{key}")
    request = GenerationRequest(**{k: v for k, v in fields.items() if k in FIELD_NAMES})
    _check_caps(request, caps)
    request.validate()
    defaults = A1111_DEFAULTS | (MASK_DEFAULTS if mode == "img2img" else {})
    parameters = {name: body.get(name, defaults.get(name)) for name in body.keys() | defaults.keys()}
    if not body.get("include_init_images"):
        parameters |= {"init_images": None, "mask": None} if mode == "img2img" else {}
    if mode == "txt2img":
        parameters.pop("resize_mode", None)
    return Parsed(request, ignored, _flag(body, "send_images", True), _flag(body, "save_images", False), parameters)


def for_model(request: GenerationRequest, config, caps: Caps) -> GenerationRequest:
    """The request as the loaded model (`config`) runs it; the worker calls this, as it knows the model.
    A1111 clients send image_cfg_scale always and A1111 uses it only on InstructPix2Pix models: on others it
    is dropped (the request would refuse it there). The hires fix's final size is held to the pixel cap here,
    where the model's native size (the first pass's when width and height are left out) is known."""
    if request.image_cfg_scale is not None and not is_instruct_model(config):
        request = request.replace(image_cfg_scale=None)
    if request.enable_hr:
        first = request.replace(width=request.width or config.resolution, height=request.height or config.resolution)
        _, (width, height) = target_sizes(first, 1)
        if width * height > caps.max_pixels:
            name = "hr_scale" if not (request.hr_resize_x or request.hr_resize_y) else "hr_resize_x"
            raise FieldError(name, f"gives a hires size of {width}x{height}: over this server's cap of "
                                   f"{caps.max_pixels} pixels per image")
    return request


def _first_phase(body: dict, fields: dict) -> None:
    """A1111's legacy firstphase_width / firstphase_height: when set they replace width and height (its txt2img
    does so with the hires fix on or off; the hires size is then theirs times hr_scale)."""
    sides = {name: body.get(name) for name in FIRST_PHASE}
    if all(side in (None, 0) for side in sides.values()):
        return
    for name, side in sides.items():
        if not isinstance(side, int) or isinstance(side, bool) or side <= 0:
            raise FieldError(name, f"must be a whole number of pixels, with the other firstphase side set too "
                                   f"(A1111's legacy first-pass size, which replaces width and height; leave both "
                                   f"0 to use width and height), not {side!r}")
    fields["width"], fields["height"] = sides["firstphase_width"], sides["firstphase_height"]


def _hires(fields: dict) -> None:
    """The hires fields as the request takes them: enable_hr 0/1 as a bool, the words A1111's UI sends for "the
    first pass's" sampler and scheduler as None, A1111's scheduler names as the request's."""
    fields["enable_hr"] = _as_bool(fields["enable_hr"])
    if fields.get("hr_sampler_name") in SAME_SAMPLER:
        fields.pop("hr_sampler_name", None)
    scheduler = fields.pop("hr_scheduler", None)
    if scheduler not in SAME_SCHEDULER:
        schedule = _schedule(scheduler, "hr_scheduler")
        if schedule is None:  # "Automatic": the hires sampler's own schedule, whatever the first pass's
            schedule = _own_schedule(fields.get("hr_sampler_name") or fields["sampler"])
        fields["hr_scheduler"] = schedule


def _mask_blur(body: dict) -> int:
    """A1111's mask_blur_x / mask_blur_y (its mask_blur, when given, sets both): latentdiff blurs a mask by one
    radius, so they must agree."""
    x, y = body.get("mask_blur_x", MASK_DEFAULTS["mask_blur"]), body.get("mask_blur_y", MASK_DEFAULTS["mask_blur"])
    if x != y:
        raise FieldError("mask_blur_y", f"{y!r} differs from mask_blur_x {x!r}: latentdiff blurs a mask by the same "
                                        f"radius across and down; give mask_blur (or equal values)")
    return x


def _as_bool(value):
    """0/1 (and false/true) as a bool; anything else as given, for the request to name."""
    return bool(value) if isinstance(value, (bool, int)) and value in (0, 1) else value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise FieldError(name, f"must be true or false, not {value!r}")
    return value


def _schedule(scheduler, field: str = "schedule"):
    """A1111's scheduler name ("automatic", "karras", "Uniform", ...) -> the request's schedule (None: the
    sampler's own); errors name `field`."""
    if scheduler is None or isinstance(scheduler, str) and scheduler.strip().lower() in ("", "automatic"):
        return None
    if not isinstance(scheduler, str):
        raise FieldError(field, f"must be a scheduler name, not {scheduler!r}")
    key = scheduler.strip().lower().replace(" ", "_")
    found = A1111_SCHEDULES.get(key.replace("_", "")) or key
    if found not in schedule_names():
        raise FieldError(field, f"unknown scheduler {scheduler!r}; choose automatic or one of "
                                f"{', '.join(n for n, _ in scheduler_entries())} (GET /sdapi/v1/schedulers)")
    return found


def scheduler_entries() -> list[tuple[str, str]]:
    """(name, label) of every schedule, by A1111's names where it has one (uniform, ddim)."""
    a1111 = {ours: theirs for theirs, ours in A1111_SCHEDULES.items()}
    return [(a1111.get(n, n), a1111.get(n, n).replace("_", " ").title()) for n in schedule_names()]


def _own_schedule(sampler) -> str | None:
    """The schedule a sampler runs with of its own (its name's suffix, else its default); None for an unknown
    sampler (validate() names it)."""
    try:
        return GenerationRequest(sampler=sampler).sampler_spec[1]
    except InputError:
        return None


def _sampler_eta(sampler) -> float | str | None:
    """The sampler's default eta; None if it takes none; "unknown" for an unknown sampler (validate() names it)."""
    try:
        spec = GenerationRequest(sampler=sampler).sampler_spec[0]
    except InputError:
        return "unknown"
    return inspect.signature(spec.fn).parameters["eta"].default if spec.takes_eta else None


def _check_caps(request: GenerationRequest, caps: Caps) -> None:
    for name in ("steps", "hr_second_pass_steps"):
        steps = getattr(request, name)
        if isinstance(steps, int) and steps > caps.max_steps:
            raise FieldError(name, f"{steps} is over this server's cap of {caps.max_steps}")
    w, h = request.width, request.height
    if isinstance(w, int) and isinstance(h, int) and w * h > caps.max_pixels:
        raise FieldError("width", f"{w}x{h} is over this server's cap of {caps.max_pixels} pixels per image")
    batch = len(request.prompt) if isinstance(request.prompt, list) else request.batch_size
    if isinstance(batch, int) and isinstance(request.n_iter, int) and batch * request.n_iter > caps.max_images:
        raise FieldError("n_iter", f"batch_size x n_iter = {batch * request.n_iter} is over this server's cap of "
                                   f"{caps.max_images} images per request")


def _init_image(value, caps: Caps):
    if value is None or value == []:
        raise FieldError("init_image", "is missing: img2img needs one image in init_images (base64)")
    if not isinstance(value, list):
        raise FieldError("init_image", "must be a list of base64 images")
    if len(value) > 1:
        raise FieldError("init_image", f"holds {len(value)} images; latentdiff takes one init image per request")
    return decode_image(value[0], "init_image", caps)


def decode_image(text, field: str, caps: Caps, *, rgb: bool = True) -> Image.Image:
    """A base64 image (raw, or a data: URL as webuiapi sends) upright, as RGB (or in its own mode: a mask's
    alpha says what to repaint, as A1111 reads it); FieldError naming `field`."""
    if not isinstance(text, str):
        raise FieldError(field, f"must be a base64-encoded image string, not {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64: send the image file's bytes base64-encoded") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > caps.max_input_pixels:
                    raise FieldError(field, f"is {image.width}x{image.height}: over this server's cap of "
                                            f"{caps.max_input_pixels} pixels per uploaded image")
                image.load()
                return as_rgb_image(image) if rgb else ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, FieldError):
            raise
        raise FieldError(field, f"does not decode to an image ({type(e).__name__}): send a PNG, JPEG or WebP "
                                f"file, base64-encoded") from None


def info_json(result, request: GenerationRequest, infotexts: list[str], *, model_name: str, model_hash,
              ignored: list[str]) -> str:
    """A1111's `info`: a JSON string describing the images (processing.Processed.js's keys), with
    latentdiff's additions `ignored_fields` and `notes`."""
    prepared = result.request
    return json.dumps({
        "prompt": prepared.prompts[0], "all_prompts": [prepared.prompts[i % prepared.batch_size]
                                                       for i in range(len(result.images))],
        "negative_prompt": prepared.negative_prompts[0],
        "all_negative_prompts": [prepared.negative_prompts[i % prepared.batch_size] for i in range(len(result.images))],
        "seed": result.seeds[0] if result.seeds else prepared.seed, "all_seeds": result.seeds,
        "subseed": -1, "all_subseeds": [-1] * len(result.seeds), "subseed_strength": 0,
        "width": prepared.width, "height": prepared.height, "sampler_name": prepared.sampler,
        "scheduler": prepared.schedule, "cfg_scale": prepared.cfg_scale, "steps": prepared.steps,
        "batch_size": prepared.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": prepared.strength if prepared.init_image is not None or prepared.enable_hr else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "clip_skip": prepared.clip_skip, "is_using_inpainting_conditioning": False,
        "ignored_fields": ignored, "notes": result.notes,
    })
