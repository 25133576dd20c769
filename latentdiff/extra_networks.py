"""A1111's extra-network prompt tags, `<lora:name:0.8>` and `<lora:name:te_weight:unet_weight>`, and the LoRA
folder the names are looked up in.

As A1111 reads them: a tag is `<kind:arguments>`, the arguments split on ":", `key=value` ones named (`te=`,
`unet=`); the first positional argument is the name, the next the text-encoder multiplier (default 1), the next
the U-Net multiplier (default: the text encoder's). `lyco` is another spelling of `lora`; other kinds
(`hypernet`, ...) are removed and not applied. Tags are removed from every prompt of a batch before it is
encoded, and the LoRAs of the batch's FIRST prompt apply to the whole batch (one set of merged weights
serves the batch); the negative prompt is not searched for tags (A1111 reads a tag there as words).

A name is a file's stem in the LoRA folder or its subfolders (.safetensors, .pt, .ckpt), as A1111 names
LoRAs; the exact stem first, then the one stem equal to it ignoring case. Two files with one stem: the first in
sorted path order wins.
"""

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FieldError, InputError

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float

    @property
    def strength(self) -> tuple[float, float]:
        return self.te, self.unet


def strip_tags(prompt: str) -> str:
    """The prompt without its extra-network tags, as it is encoded."""
    return TAG.sub("", prompt)


def prompt_loras(prompts: list[str]) -> tuple[list[LoraTag], list[str]]:
    """The LoRA tags that apply to a batch (its first prompt's) and notes on tags that do not apply."""
    notes, tags = [], []
    for i, prompt in enumerate(prompts):
        for match in TAG.finditer(prompt):
            kind = match[1].lower()
            if kind not in LORA_KINDS:
                notes.append(f"prompt tag {match[0]!r}: latentdiff has no {match[1]!r} networks; removed, not applied")
            elif i == 0:
                tags.append(_lora_tag(match[0], match[2]))
            elif match[0] not in prompts[0]:
                notes.append(f"prompt {i + 1} of the batch: {match[0]} is not applied (as in A1111, the batch's "
                             f"first prompt chooses the LoRAs of all its images)")
    return tags, notes


def negative_tag_notes(negative_prompts: list[str]) -> list[str]:
    found = sorted({m[0] for text in negative_prompts for m in TAG.finditer(text) if m[1].lower() in LORA_KINDS})
    return [f"negative prompt: {', '.join(found)} not applied: A1111 applies LoRA tags of the prompt only, and "
            f"reads these as words"] if found else []


def _lora_tag(tag: str, arguments: str) -> LoraTag:
    positional, named = [], {}
    for arg in arguments.split(":"):
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(arg)
    if not positional or not positional[0].strip():
        raise FieldError("prompt", f"{tag}: no LoRA name; write <lora:NAME:WEIGHT>")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise FieldError("prompt", f"{tag}: a weight is not a number; write <lora:NAME:WEIGHT> or "
                                   f"<lora:NAME:TE_WEIGHT:UNET_WEIGHT>") from None
    return LoraTag(positional[0].strip(), te, unet)


def lora_files(folder) -> dict[str, Path]:
    """stem -> file for every LoRA file under `folder` (the first in sorted path order wins a shared stem)."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            files.setdefault(path.stem, path)
    return files


def find_lora(name: str, folder, files: dict[str, Path] | None = None) -> Path:
    """The file `name` means in `folder`; InputError naming both (and the nearest names) if there is none."""
    files = lora_files(folder) if files is None else files
    if name in files:
        return files[name]
    same = [stem for stem in files if stem.lower() == name.lower()]
    if len(same) == 1:
        return files[same[0]]
    close = same or difflib.get_close_matches(name, list(files), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(files)} LoRA files there)"
    raise InputError(f"LoRA {name!r} not found in the LoRA folder {folder}: no {name}.safetensors/.pt/.ckpt there "
                     f"or in its subfolders{hint}")


def resolve_lora(path_or_name, folder) -> Path:
    """A LoRA given as a file path or, when no such file exists, as a name in `folder`."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if folder is None:
        raise InputError(f"LoRA file not found: {path_or_name} (give a file, or a name with a LoRA folder)")
    return find_lora(str(path_or_name), folder)


def lora_replay_notes(value: str, prompt: str, folder) -> list[str]:
    """One note on what a replay cannot honour of an image's `Lora hashes` value ("name: hash, ...") with the
    LoRA folder: names with no file there, files whose hash differs (another version), and LoRAs the prompt has
    no tag for (given as --lora when the image was made). A tagged name whose file has the image's hash is
    honoured: the prompt's tag loads it."""
    from .formats.lora import lora_hash
    from .infotext import hash_entry_name
    files = lora_files(folder)
    by_entry_name = {hash_entry_name(stem): path for stem, path in reversed(files.items())}
    tagged = {hash_entry_name(tag.name).lower() for tag in prompt_loras([prompt])[0]}
    missing, changed, untagged = [], [], []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        name, _, wanted = (s.strip() for s in entry.rpartition(":"))
        path = by_entry_name.get(name) or next((p for n, p in by_entry_name.items() if n.lower() == name.lower()), None)
        if name.lower() not in tagged:
            untagged.append(name)
        elif path is None:
            missing.append(name)
        elif (found := lora_hash(path)) != wanted:
            changed.append(f"{path} has hash {found}, the image's {name!r} had {wanted}")
    parts = ([f"not in {folder}: {', '.join(missing)}"] if missing else []) + changed + \
        ([f"no tag in the prompt for {', '.join(untagged)} (given with --lora when the image was made: pass "
          f"--lora NAME:WEIGHT again)"] if untagged else [])
    return [f"--from-png: Lora hashes: {'; '.join(parts)}"] if parts else []
