"""A1111 "parameters" text (infotext): written, read, and mapped to and from request fields.

AUTOMATIC1111 keeps an image's generation parameters in a PNG text chunk named `parameters`:

    a cat, sitting                                   the prompt (any number of lines)
    Negative prompt: blurry                          the negative prompt (any number of lines)
    Steps: 20, Sampler: DPM++ 2M, Seed: 1, ...       one line of `Key: value` pairs (at least three)
    Template: {a|the} cat                            optional, from prompt-template extensions
    Negative Template: ...

Forge, ComfyUI loaders, civitai and stable-diffusion.cpp read and write the same text, so our images
replay there and theirs replay here. Request fields use GenerationRequest's names (steps, sampler,
cfg_scale, ...); keys this module cannot map are kept and named so the caller can warn once.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InputError
from .sampling import sampler_names
from .schedules import schedule_names

# ---------------------------------------------------------------------------------------- grammar

# The order AUTOMATIC1111 writes its keys in; keys it does not know go between these and the tail.
A1111_KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD",
    "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
A1111_TAIL_KEYS = ("Version", "User")
# Lines after the parameters line; a template is how an extension produced the prompt.
TEMPLATE_KEYS = ("Template", "Negative Template")
_NEGATIVE = "Negative prompt:"
# One `Key: value` pair of the parameters line, as A1111 reads it: a value is either a JSON string in
# double quotes or runs to the next comma. Unlike A1111, a key has at most 64 characters: unbounded,
# a long line without colons takes quadratic time (80 kB of prompt: 100 s).
_PAIR = re.compile(r'\s*(\w[\w \-/]{1,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]{0,62}[\w\-/]")
# A1111 only takes the last line for parameters when it holds at least this many pairs.
_MIN_PAIRS = 3


class Infotext(NamedTuple):
    prompt: str
    negative_prompt: str
    params: dict[str, str]  # A1111 key -> value text, in the order read


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    """Generation parameters as A1111's infotext.

    Line 1 (more if the prompt has newlines) is the prompt, then `Negative prompt: ...` (left out
    when empty), then one line of `Key: value` pairs joined by ", ": A1111's keys in A1111's order,
    then other keys in the order given, then Version and User; then "Template" and "Negative
    Template" as lines of their own (trailing whitespace dropped). None values are left out (as
    A1111 does), an integral float is written without ".0" (CFG scale: 7), other values with str().
    Values holding a comma, colon, control character, leading quote or edge whitespace are written
    as JSON strings, as A1111 does. Size is the caller's "WIDTHxHEIGHT" string.

    Raises InputError for what the format cannot carry: keys outside A1111's key grammar, fewer
    than three parameters (A1111 would read the line as part of the prompt), a prompt line that
    starts with "Negative prompt:", or a template line that starts with "Negative Template:".
    """
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt),
                       ("Template", str(params.get("Template") or ""))):
        marker = "Negative Template:" if name == "Template" else _NEGATIVE
        for number, line in enumerate(text.split("\n"), start=1):
            if line.lstrip().startswith(marker):
                raise InputError(f"line {number} of the {name} starts with {marker!r}, which readers "
                                 f"of the parameters take as the start of the next section: reword "
                                 "that line")
    items = {key: value for key, value in params.items()
             if value is not None and key not in TEMPLATE_KEYS}
    for key in items:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InputError(f"parameter name {key!r} cannot be written in the A1111 parameters "
                             "line: use letters, digits, '_', '-', '/' and inner spaces, 2 to 64 "
                             "characters")
    if len(items) < _MIN_PAIRS:
        raise InputError(f"format_parameters got {len(items)} parameter(s) ({', '.join(items)}); "
                         f"A1111's format needs at least {_MIN_PAIRS} (e.g. Steps, Sampler, Seed) "
                         "to tell the parameters line from the prompt")
    known = [key for key in A1111_KEY_ORDER if key in items]
    tail = [key for key in A1111_TAIL_KEYS if key in items]
    others = [key for key in items if key not in known and key not in tail]
    pairs = ", ".join(f"{key}: {_quote(_value_text(items[key]))}" for key in known + others + tail)
    lines = [prompt] if prompt else []
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(pairs)
    lines += [f"{key}: {str(params[key]).rstrip()}" for key in TEMPLATE_KEYS
              if params.get(key) is not None]
    return "\n".join(lines)


def parse_parameters(text: str) -> Infotext:
    """Read A1111's infotext back into (prompt, negative_prompt, {key: value string}).

    The parameters line is the last line, or the line before a `Template:` / `Negative Template:`
    section; it counts when it has at least three `Key: value` pairs (A1111's rule), otherwise
    there are none and every line belongs to the prompts. Values stay strings (quoted ones
    unquoted; a repeated key keeps its last value); Size stays "WIDTHxHEIGHT"; templates come back
    as params "Template" and "Negative Template". Unlike A1111, prompt lines are not stripped, so
    format_parameters' output reads back exactly.

    A JSON object is not infotext (Fooocus and SwarmUI write one in the same chunk): InputError
    naming the tool, rather than reading the JSON as a prompt.
    """
    if not isinstance(text, str):
        raise InputError(f"parameters must be text, not {type(text).__name__}")
    document = _json_object(text)
    if document is not None:
        raise InputError(f"the parameters are a JSON object written by {_json_writer(document)}, "
                         "not A1111 text: they cannot be replayed as A1111 parameters")
    lines, templates = _split_templates(text.rstrip().split("\n"))
    *lines, last = lines
    pairs = _PAIR.findall(last)
    if len(pairs) < _MIN_PAIRS:
        lines.append(last)
        pairs = []
    prompt_lines, negative_lines = [], None
    for line in lines:
        if negative_lines is None and line.startswith(_NEGATIVE):
            negative_lines = [_after(line, _NEGATIVE)]
        elif negative_lines is None:
            prompt_lines.append(line)
        else:
            negative_lines.append(line)
    params = {key: _unquote(value) for key, value in pairs} | templates
    return Infotext("\n".join(prompt_lines), "\n".join(negative_lines or []), params)


def _split_templates(lines: list[str]) -> tuple[list[str], dict[str, str]]:
    """(lines up to the parameters line, {"Template": ..., "Negative Template": ...})."""
    for start in range(1, len(lines)):
        if (lines[start].startswith(("Template:", "Negative Template:"))
                and len(_PAIR.findall(lines[start - 1])) >= _MIN_PAIRS):
            break
    else:
        return lines, {}
    section = "\n".join(lines[start:])
    if section.startswith("Negative Template:"):
        return lines[:start], {"Negative Template": _after(section, "Negative Template:")}
    template, found, negative = section.partition("\nNegative Template:")
    templates = {"Template": _after(template, "Template:")}
    if found:
        templates["Negative Template"] = _after(negative, "")
    return lines[:start], templates


def _after(line: str, marker: str) -> str:
    rest = line[len(marker):]
    return rest[1:] if rest.startswith(" ") else rest


def _value_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(text: str) -> str:
    needs_quotes = (text != text.strip() or text.startswith('"')
                    or any(c in ",:" or c < " " for c in text))
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
    return text


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None  # a prompt may start with "{" ("{red|blue} cat"): only valid JSON counts
    try:
        value = json.loads(text, parse_int=str)  # str: int() refuses numbers of over 4300 digits
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _json_writer(document: dict) -> str:
    if "sui_image_params" in document:
        return "SwarmUI"
    if "fooocus" in json.dumps(document.get("metadata_scheme", document.get("Version", ""))).lower():
        return "Fooocus"
    return "a tool that is not A1111"


# ---------------------------------------------------------------------------------------- fields

# A1111 key -> (request field, value type) for the keys that map one to one. Sampler, Schedule type
# and Size are read together below (a combined sampler name carries the schedule; Size is two fields).
SCALAR_KEYS = {
    "Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int), "Eta": ("eta", float), "Denoising strength": ("strength", float),
    "Image CFG scale": ("image_cfg_scale", float),
}
# The hires fix's keys (hires.py) -> (request field, value type); Hires resize is two fields, read below. A1111
# pastes an infotext with the hires fix on when it has Hires upscale, Hires upscaler or Hires resize.
HIRES_KEYS = {
    "Hires sampler": ("hr_sampler_name", str), "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str), "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int), "Hires upscaler": ("hr_upscaler", str),
}
HIRES_ORDER = ("Hires sampler", "Hires prompt", "Hires negative prompt", "Hires schedule type", "Hires upscale",
               "Hires resize", "Hires steps", "Hires upscaler")  # as A1111 adds them
HIRES_SWITCHES = ("Hires upscale", "Hires upscaler", "Hires resize")
_HIRES_RESIZE = re.compile(r"([0-9]{1,9})\s*x\s*([0-9]{1,9})")
# Keys that describe the image without directing its generation: never worth a warning. (Lora and
# TI hashes do direct it: they record add-ons the prompt loaded.)
DESCRIPTIVE_KEYS = {"Model hash", "Model", "VAE hash", "VAE", "Version", "User", "Hashes", *TEMPLATE_KEYS}
# stable-diffusion.cpp's sampler names -> A1111's; its others (dpm++2mv2, ipndm, ipndm_v, tcd,
# ddim_trailing) have no A1111 name and are kept as written.
SD_CPP_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "dpm2": "DPM2",
                   "dpm++2s_a": "DPM++ 2S a", "dpm++2m": "DPM++ 2M", "lcm": "LCM"}
# A1111's "Schedule type" labels whose schedule has another name here: its Uniform is the model's own
# timestep spacing (our normal), its DDIM the ldm DDIM timesteps.
A1111_SCHEDULES = {"uniform": "normal", "ddim": "ddim_uniform"}
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")  # bounded: int() refuses over 4300 digits
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_SIZE = re.compile(r"([0-9]{1,9})\s*x\s*([0-9]{1,9})")


def to_fields(info: Infotext) -> tuple[dict, list[str]]:
    """Request fields for replaying `info`, and the A1111 keys the replay cannot honour.

    fields holds prompt and negative_prompt, plus what the parameters give: steps (int), sampler
    (str, A1111's spelling where it has one) with schedule (str, or None for the sampler's default:
    "Automatic" or no Schedule type), cfg_scale, seed, width and height (from Size), clip_skip, eta,
    strength (from Denoising strength: img2img's, or the hires fix's second pass's), and the hires fix's
    fields (enable_hr and HIRES_KEYS; an upscaler latentdiff lacks, such as ESRGAN, is left out and named as
    not honoured). A missing key leaves its field out, so the request's default applies. A value that
    does not read as its type raises InputError naming the key and the value. The second list names,
    in the text's order, every key that is neither mapped nor descriptive (Model, Version, ...): LoRA /
    TI hashes, unknown keys.
    """
    params = info.params
    fields = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, (field, kind) in SCALAR_KEYS.items():
        if key in params:
            fields[field] = _read_number(key, params[key], kind)
    if "Size" in params:
        fields["width"], fields["height"] = _read_size(params["Size"])
    if "Sampler" in params or "Schedule type" in params:
        sampler, schedule = _read_sampler(params)
        if sampler is not None:
            fields["sampler"] = sampler
        if sampler is not None or schedule is not None:  # a sampler's schedule is always set
            fields["schedule"] = schedule
    hires = _read_hires(params)
    fields |= hires
    if "Eta DDIM" in params and "eta" not in fields and fields.get("sampler") == "DDIM":
        fields["eta"] = _read_number("Eta DDIM", params["Eta DDIM"], float)
    fields |= _inpaint_fields(params)
    mapped = {*SCALAR_KEYS, "Size", "Sampler", "Schedule type", *DESCRIPTIVE_KEYS, *INPAINT_KEYS}
    if "eta" in fields:
        mapped.add("Eta DDIM")
    mapped |= {key for key, (field, _) in HIRES_KEYS.items() if field in hires}
    if "hr_resize_x" in hires:
        mapped.add("Hires resize")
    return fields, [key for key in params if key not in mapped]


def from_fields(fields: dict, extra: dict | None = None) -> str:
    """Infotext for request fields (to_fields' names), with `extra` A1111 keys (Model hash, Model,
    Version, ...) written as given. None values, clip_skip 1 and a schedule of None (the sampler's
    default) are left out, as A1111 leaves out defaults. The sampler is written as given. The hires fix's
    fields are written as A1111's Hires keys (enable_hr alone: its default Hires upscale)."""
    names = {field: key for key, (field, _) in SCALAR_KEYS.items()}
    hires = {field: key for key, (field, _) in HIRES_KEYS.items()}
    allowed = {"prompt", "negative_prompt", "sampler", "schedule", "width", "height", *names, *hires,
               "hr_resize_x", "hr_resize_y", "enable_hr", *INPAINT_KEYS.values()}
    unknown = [name for name in fields if name not in allowed]
    if unknown:
        raise InputError(f"from_fields: unknown field(s) {unknown}; the infotext carries "
                         f"{sorted(allowed)}")
    if (fields.get("width") is None) != (fields.get("height") is None):
        raise InputError("from_fields: give width and height together (they are written as Size)")
    params = {"Sampler": fields.get("sampler"), "Schedule type": _schedule_label(fields.get("schedule"))}
    if fields.get("width") is not None:
        params["Size"] = f"{fields['width']}x{fields['height']}"
    for field, key in names.items():
        if fields.get(field) is not None and not (field == "clip_skip" and fields[field] == 1):
            params[key] = fields[field]
    written = {key: fields.get(field) for field, key in hires.items()}
    written["Hires schedule type"] = _schedule_label(fields.get("hr_scheduler"))
    if fields.get("hr_resize_x") is not None:
        written["Hires resize"] = f"{fields['hr_resize_x']}x{fields['hr_resize_y']}"
    if fields.get("enable_hr") and not any(written.get(key) is not None for key in HIRES_SWITCHES):
        from .request import DEFAULTS
        written["Hires upscale"] = DEFAULTS.hr_scale  # the hires fix was on: a reader must see it
    params |= {key: written.get(key) for key in HIRES_ORDER}
    params |= _inpaint_params(fields)
    return format_parameters(fields.get("prompt") or "", fields.get("negative_prompt") or "",
                             params | dict(extra or {}))


def _read_hires(params: dict) -> dict:
    """The hires fix's request fields from its keys ({} when it was off)."""
    if not any(key in params for key in HIRES_SWITCHES):
        return {}
    from .hires import UPSCALERS
    fields = {"enable_hr": True}
    for key, (field, kind) in HIRES_KEYS.items():
        if key in params:
            fields[field] = params[key] if kind is str else _read_number(key, params[key], kind)
    label = fields.pop("hr_scheduler", "").strip()
    if label and label.lower() != "automatic":
        fields["hr_scheduler"] = _schedule_name(label)
    if fields.get("hr_upscaler", "").lower() not in {name.lower() for name in UPSCALERS}:
        fields.pop("hr_upscaler", None)  # e.g. R-ESRGAN 4x+: named as not honoured, the default replays
    if "Hires resize" in params:
        match = _HIRES_RESIZE.fullmatch(params["Hires resize"].strip())
        if match is None:
            raise InputError(f"parameter 'Hires resize' is {params['Hires resize']!r}: expected WIDTHxHEIGHT such "
                             f"as 1024x1536 (0 for a side taken from the aspect ratio)")
        fields["hr_resize_x"], fields["hr_resize_y"] = int(match[1]), int(match[2])
    return fields


# Inpainting as A1111 records it (each key only when not its default, except Mask blur, which A1111 writes
# when it is above 0 and we always write with a mask, so that a replay never falls back to another default),
# and latentdiff's own Outpaint ("left:64,right:64").
INPAINT_KEYS = {"Mask blur": "mask_blur", "Mask mode": "inpainting_mask_invert", "Masked content": "inpainting_fill",
                "Inpaint area": "inpaint_full_res", "Masked area padding": "inpaint_full_res_padding",
                "Outpaint": "outpaint"}
_CHOICES = {"Mask mode": {"inpaint masked": False, "inpaint not masked": True},
            "Inpaint area": {"whole picture": False, "only masked": True}}


def _inpaint_fields(params: dict) -> dict:
    fields = {}
    for key, field in INPAINT_KEYS.items():
        if key not in params:
            continue
        value = params[key].strip()
        if key in _CHOICES:
            if value.lower() not in _CHOICES[key]:
                choices = ", ".join(map(repr, _CHOICES[key]))
                raise InputError(f"parameter {key!r} is {value!r}: expected one of {choices}")
            fields[field] = _CHOICES[key][value.lower()]
        elif key in ("Mask blur", "Masked area padding"):
            fields[field] = _read_number(key, value, int)
        else:
            fields[field] = value
    return fields


def _inpaint_params(fields: dict) -> dict:
    params = {"Mask blur": fields.get("mask_blur"), "Outpaint": fields.get("outpaint")}
    if fields.get("inpainting_mask_invert"):
        params["Mask mode"] = "Inpaint not masked"
    if fields.get("inpainting_fill") not in (None, "original"):
        params["Masked content"] = fields["inpainting_fill"]
    if fields.get("inpaint_full_res"):
        params |= {"Inpaint area": "Only masked", "Masked area padding": fields.get("inpaint_full_res_padding")}
    return params


def hash_entry_name(name: str) -> str:
    """A name as A1111 writes it in a "name: hash, ..." list (TI hashes, Lora hashes): without ":" and ","."""
    return name.replace(":", "").replace(",", "")


def hash_list(pairs) -> str:
    """A1111's `TI hashes` / `Lora hashes` value from (name, short hash) pairs (the writer quotes it)."""
    return ", ".join(f"{hash_entry_name(name)}: {short}" for name, short in pairs)


def _read_number(key: str, text: str, kind: type):
    pattern, expected = (_INTEGER, "a whole number") if kind is int else (_NUMBER, "a number")
    value = text.strip()
    if pattern.fullmatch(value) and (kind is int or math.isfinite(float(value))):
        return kind(value)
    raise InputError(f"parameter {key!r} is {text!r}: expected {expected}")


def _read_size(text: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(text.strip())
    if match is None or 0 in (width := int(match[1]), height := int(match[2])):
        raise InputError(f"parameter 'Size' is {text!r}: expected WIDTHxHEIGHT such as 512x768")
    return width, height


def _squash(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def _read_sampler(params: dict) -> tuple[str | None, str | None]:
    """(sampler, schedule) from Sampler and Schedule type. An old combined name ("DPM++ 2M Karras",
    sd.cpp's "euler_a karras") is split when both halves are names the registries know; a name we
    do not know is kept as written so that the sampler registry's error names it."""
    sampler, schedule = None, None
    if "Sampler" in params:
        written = params["Sampler"].strip()
        if not written:
            raise InputError("parameter 'Sampler' is empty: expected a sampler name such as Euler a")
        sampler = _sampler_name(written)
        if sampler is None:
            sampler, schedule = _split_combined(written)
        sampler = sampler or written
    label = params.get("Schedule type", "").strip()
    if "Schedule type" in params and not label:
        raise InputError("parameter 'Schedule type' is empty: expected a schedule such as Karras "
                         "or Automatic")
    if label and label.lower() != "automatic":
        schedule = _schedule_name(label)
    return sampler, schedule


def _split_combined(written: str) -> tuple[str | None, str | None]:
    for name in schedule_names():
        for suffix in (name, name.replace("_", " ")):
            head = written[:len(written) - len(suffix)]
            if written.lower().endswith(suffix) and head.endswith(" ") and _sampler_name(head):
                return _sampler_name(head), name
    return None, None


def _sampler_name(written: str) -> str | None:
    known = {_squash(name): name for name in sampler_names()}
    found = known.get(_squash(written))
    if found is None and written.strip().lower() in SD_CPP_SAMPLERS:
        found = SD_CPP_SAMPLERS[written.strip().lower()]
    return found if found in sampler_names() else None


def _schedule_name(label: str) -> str:
    squashed = re.sub(r"[\s_\-]+", "", label.lower())
    known = {re.sub(r"_", "", name): name for name in schedule_names()}
    found = known.get(squashed) or A1111_SCHEDULES.get(squashed)
    return found if found in schedule_names() else label


def _schedule_label(schedule: str | None) -> str | None:
    """A schedule name as A1111 labels it (karras -> Karras, ddim_uniform -> DDIM)."""
    if schedule is None:
        return None
    if schedule not in schedule_names():
        return schedule  # written as given, so that it reads back the same
    special = {"ddim_uniform": "DDIM", "sgm_uniform": "SGM Uniform"}
    return special.get(schedule) or schedule.replace("_", " ").title()


# ---------------------------------------------------------------------------------------- PNG files

# Text chunks by which other tools' PNGs are known when they carry no `parameters`; ComfyUI's hold
# JSON graphs (a plain-text `prompt` chunk is some other tool's).
FOREIGN_CHUNKS = {"prompt": "ComfyUI", "workflow": "ComfyUI", "invokeai_metadata": "InvokeAI",
                  "invokeai_graph": "InvokeAI", "sd-metadata": "InvokeAI"}


def read_png_parameters(path: str | os.PathLike) -> str:
    """The `parameters` text chunk (tEXt, iTXt or zTXt) of a PNG.

    Raises InputError saying why there is none: not a PNG (A1111 keeps JPEG/WebP parameters in
    EXIF, not read here), made by a tool that records something else (ComfyUI's workflow,
    InvokeAI's or NovelAI's metadata), or no such chunk. UTF-8 written into a tEXt chunk (which is
    Latin-1 by the PNG standard; stable-diffusion.cpp does this) is read as UTF-8.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            kind = image.format
            # Chunks before the pixel data (where PIL, hence A1111, writes them) are in `info` after
            # the open; `text` also finds chunks after it, but has to decode the pixels for that.
            chunks = {key: value for key, value in image.info.items() if isinstance(value, str)}
            if kind == "PNG" and "parameters" not in chunks:
                chunks |= image.text
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder: pass a PNG file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image PIL can read: pass a PNG file") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path} is refused as a possible decompression bomb ({e}): raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"cannot read the text chunks of {path} ({e}): the file is truncated, "
                         "corrupt or unreadable") from None
    if kind != "PNG":
        raise InputError(f"{path} is a {kind} image, not a PNG: generation parameters are read "
                         "from PNG text chunks only")
    parameters = chunks.get("parameters")
    if parameters:
        return parameters if isinstance(parameters, PngImagePlugin.iTXt) else _utf8(parameters)
    tool = _foreign_tool(chunks)
    if tool is not None:
        what = "metadata" if tool == "NovelAI" else "workflow"
        raise InputError(f"{path} was made by {tool}; its {what} cannot be replayed as A1111 "
                         "parameters")
    state = "an empty" if parameters is not None else "no"
    raise InputError(f"{path} carries {state} 'parameters' text chunk: it holds no generation "
                     "parameters to read")


def _foreign_tool(chunks: dict[str, str]) -> str | None:
    for key, tool in FOREIGN_CHUNKS.items():
        if key in chunks and (tool != "ComfyUI" or _json_object(chunks[key]) is not None):
            return tool
    if str(chunks.get("Software", "")).startswith("NovelAI"):
        return "NovelAI"
    return None


def _utf8(text: str) -> str:
    """A tEXt chunk's Latin-1 reading of what may be UTF-8 bytes, as UTF-8 when it is valid UTF-8
    (Latin-1 text with bytes >= 0x80 almost never is)."""
    if text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text
