"""The generation jobs of a command line: one GenerationRequest per prompt, from the flags, a prompts file's
lines or a PNG's parameters, each knowing where its fields came from, so that an error names the flag, the
line or the PNG that set the bad value."""

import hashlib
import json
from pathlib import Path

from .errors import FieldError, InputError

# request fields and pipeline options as the command line names them
FLAGS = {"prompt": "the prompt", "negative_prompt": "--negative-prompt", "width": "--width", "height": "--height",
         "steps": "--steps", "sampler": "--sampler", "schedule": "--schedule", "cfg_scale": "--cfg-scale",
         "seed": "--seed", "batch_size": "--batch-size", "n_iter": "--n-iter", "clip_skip": "--clip-skip",
         "eta": "--eta", "strength": "--strength", "init_image": "--init-image", "resize_mode": "--resize-mode",
         "device": "--device", "dtype": "--dtype", "threads": "--threads", "attention_slice": "--attention-slice",
         "vae_tiling": "--vae-tiling", "offload": "--offload",
         "enable_hr": "--hr-scale", "hr_scale": "--hr-scale", "hr_resize_x": "--hr-resize-x",
         "hr_resize_y": "--hr-resize-y", "hr_upscaler": "--hr-upscaler", "hr_second_pass_steps": "--hr-steps",
         "hr_sampler_name": "--hr-sampler", "hr_scheduler": "--hr-schedule", "hr_prompt": "--hr-prompt",
         "hr_negative_prompt": "--hr-negative-prompt", "image_cfg_scale": "--image-cfg-scale",
         "mask": "--mask", "mask_blur": "--mask-blur", "inpainting_mask_invert": "--invert-mask",
         "inpainting_fill": "--masked-content", "inpaint_full_res": "--only-masked",
         "inpaint_full_res_padding": "--mask-padding", "outpaint": "--outpaint"}
# the fields whose flag (or prompts-file key) turns the hires fix on: A1111's enable_hr
HIRES_SWITCHES = ("hr_scale", "hr_resize_x", "hr_resize_y")
# the per-line options of a JSON prompts file: the request's plain fields
JOB_KEYS = ("prompt", "negative_prompt", "width", "height", "steps", "sampler", "schedule", "cfg_scale", "seed",
            "batch_size", "n_iter", "clip_skip", "eta", "strength", "resize_mode", "enable_hr", "hr_scale",
            "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_sampler_name", "hr_scheduler",
            "hr_prompt", "hr_negative_prompt", "image_cfg_scale", "mask_blur", "inpainting_mask_invert",
            "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "outpaint")


def for_the_command_line(error: Exception) -> str:
    """A library error as the command line names things: field names become the flags that set them (or the
    prompts-file line or PNG that did), as recorded in the error's `origin`."""
    if not isinstance(error, FieldError):
        return str(error)
    origin = getattr(error, "origin", {}).get(error.field) or FLAGS.get(error.field, error.field)
    return f"{origin} {error.problem}"


class Job:
    """One request to run, where each of its fields came from (for messages), and in batch mode the stem of
    its files, made from its content so that a rerun of an edited prompts file finds what is already done."""

    def __init__(self, request, origin: dict[str, str], stem: str | None = None):
        self.request, self.origin, self.stem = request, origin, stem

    def check(self, fn, *args, **kwargs):
        """fn(...) with a FieldError told where its field came from."""
        try:
            return fn(*args, **kwargs)
        except FieldError as e:
            e.origin = self.origin
            raise


def _flags(args) -> dict:
    """The request fields given as flags (left-out flags are absent: see _add_generation_flags)."""
    from .request import FIELD_NAMES
    fields = {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}
    if getattr(args, "init_image", None) is None:
        fields.pop("init_image", None)
    return _switch_hires(fields)


def _switch_hires(fields: dict) -> dict:
    """A hires size given turns the hires fix on."""
    return fields | {"enable_hr": True} if any(name in fields for name in HIRES_SWITCHES) else fields


def command_jobs(args, mode: str) -> tuple[list[Job], list[str]]:
    """The jobs of a command line: one per prompts-file line in batch mode, else one from the flags and
    (with --from-png) the PNG's parameters. Each is validated here, before any model loads. Also returns
    notes for the user (what a replayed PNG holds that cannot be honoured)."""
    from .request import GenerationRequest
    flags = _flags(args)
    base, origin, notes = {}, {name: FLAGS[name] for name in flags}, []
    if mode == "txt2img" and "strength" in flags:  # the hires pass's strength, as A1111's txt2img names it
        origin["strength"] = "--denoising-strength"
    if args.from_png:
        base, unhonoured = _png_fields(args.from_png, mode)
        # the add-on hashes are honoured with their folders: embeddings if found and equal, LoRAs by the tags
        honoured = [key for key, folder in (("TI hashes", "embeddings_dir"), ("Lora hashes", "lora_dir"))
                    if key in unhonoured and getattr(args, folder, None)]
        if honoured:
            from .infotext import parse_parameters, read_png_parameters
            info = parse_parameters(read_png_parameters(args.from_png))
            unhonoured = [key for key in unhonoured if key not in honoured]
        if "TI hashes" in honoured:
            from .formats.embeddings import ti_replay_notes
            notes += ti_replay_notes(info.params["TI hashes"], Path(args.embeddings_dir).expanduser())
        if "Lora hashes" in honoured:
            from .extra_networks import lora_replay_notes
            notes += lora_replay_notes(info.params["Lora hashes"], info.prompt, Path(args.lora_dir).expanduser())
        if unhonoured:
            notes.append(f"--from-png: not replayed (latentdiff cannot honour them): {', '.join(unhonoured)}")
        origin = {name: f"--from-png {args.from_png}: {name}" for name in base} | origin
    if mode == "img2img" and "init_image" not in flags:
        raise InputError("img2img needs --init-image IMAGE: the picture to start from")
    if args.from_png and "mask" not in flags and _inpainted(base):
        raise InputError(f"--from-png {args.from_png}: this image was inpainted; replay it with --mask MASK (the "
                         f"mask it was made with) beside --init-image")
    if not args.prompts_file:
        if "prompt" not in flags and "prompt" not in base:
            raise InputError("no prompt: give one as the first argument (or use --prompts-file / --from-png)")
        job = Job(GenerationRequest(**(base | flags)), origin)
        job.check(job.request.validate)
        _check_strength_flag(job, flags, mode)
        return _load_init_images([job]), notes
    jobs, seen = [], {}
    for n, line_fields in _prompts_file(Path(args.prompts_file)):
        where = f"--prompts-file {args.prompts_file}:{n}:"
        fields = base | flags | _switch_hires(line_fields)
        line_origin = origin | {name: f"{where} {name}" for name in line_fields}
        content = json.dumps({k: str(v) for k, v in sorted(fields.items())}, ensure_ascii=False)
        seen[content] = seen.get(content, -1) + 1  # identical lines are separate jobs
        key = hashlib.sha256(f"{content}#{seen[content]}".encode()).hexdigest()[:12]
        job = Job(GenerationRequest(**fields), line_origin, stem=key)
        job.check(job.request.validate)
        _check_strength_flag(job, flags, mode)
        jobs.append(job)
    return _load_init_images(jobs), notes


def _check_strength_flag(job: Job, flags: dict, mode: str) -> None:
    """txt2img's --denoising-strength is the hires pass's: refused, not ignored, with the hires fix off."""
    if mode == "txt2img" and "strength" in flags and not job.request.enable_hr:
        raise InputError("--denoising-strength is the hires fix's second-pass strength: add --hr-scale or "
                         "--hr-resize-x/--hr-resize-y (img2img takes --strength)")


def _inpainted(fields: dict) -> bool:
    from .inpaint import INPAINT_FIELDS
    return "outpaint" not in fields and any(name in fields for name in INPAINT_FIELDS)


def _load_init_images(jobs: list[Job]) -> list[Job]:
    """Each init image and mask read once, now: a bad file fails before the model loads."""
    from .images import load_image
    from .inpaint import MASK_FROM_ALPHA, load_mask, mask_from_alpha
    loaded = {}
    for job in jobs:
        mask = job.request.mask
        if mask is not None:  # the alpha before load_image drops it
            mask = mask_from_alpha(job.request.init_image) if mask == MASK_FROM_ALPHA else load_mask(mask)
            job.request = job.request.replace(mask=mask)
        path = job.request.init_image
        if path is not None:
            loaded[path] = loaded.get(path) or load_image(path)
            job.request = job.request.replace(init_image=loaded[path])
    return jobs


def _prompts_file(path: Path):
    """(line number, fields) for each prompt of a prompts file: plain lines are prompts, JSON lines hold
    request fields (JOB_KEYS); blank lines and # comments are skipped."""
    if not path.is_file():
        raise InputError(f"--prompts-file {path}: no such file")
    found = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            found.append((n, {"prompt": line}))
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--prompts-file {path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(fields, dict):
            raise InputError(f"--prompts-file {path}:{n}: a JSON line must be an object of options")
        unknown = sorted(set(fields) - set(JOB_KEYS))
        if unknown or "prompt" not in fields:
            raise InputError(f"--prompts-file {path}:{n}: needs a 'prompt'; allowed keys {list(JOB_KEYS)}, "
                             f"unknown {unknown}")
        found.append((n, fields))
    if not found:
        raise InputError(f"--prompts-file {path}: no prompts in it")
    return found


def _png_fields(path: str, mode: str) -> tuple[dict, list[str]]:
    """The request fields a PNG's parameters give, for a replay, and the keys it cannot honour."""
    from .infotext import parse_parameters, read_png_parameters, to_fields
    try:
        fields, unhonoured = to_fields(parse_parameters(read_png_parameters(path)))
    except InputError as e:
        raise InputError(f"--from-png {path}: {e}") from None
    if mode == "img2img" and fields.get("enable_hr"):
        raise InputError(f"--from-png {path}: this image was made by txt2img with the hires fix; replay it with "
                         f"`latentdiff txt2img --from-png {path}`")
    if "strength" in fields and mode == "txt2img" and not fields.get("enable_hr"):
        raise InputError(f"--from-png {path}: this image was made by img2img (Denoising strength "
                         f"{fields['strength']:g}); replay it with `latentdiff img2img --from-png {path} "
                         f"--init-image IMAGE`, giving the image it started from")
    return fields, unhonoured
