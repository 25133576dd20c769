"""Checkpoint files: safe reading, strict loading into modules, atomic writing.

Reading never executes code from a file: safetensors is plain data, and PyTorch pickles go through
`torch.load(weights_only=True)`, which refuses any object that is not a tensor or a plain container.
The file's content decides how it is read; its extension only serves to catch a pickle that poses
as a .safetensors file. Large files are memory-mapped, so a tensor costs RAM only once it is used.
"""

import hashlib
import json
import logging
import os
import pickle
import pickletools
import re
import secrets
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, InputError

log = logging.getLogger("latentdiff")

# Where each component lives in an original (CompVis/ldm) single-file checkpoint: the module tree of
# model.StableDiffusion. The one table of these prefixes: formats/ and the loader take them from here.
ORIGINAL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.",
}

ACCEPTED_FORMATS = ".safetensors, or a PyTorch checkpoint written by torch.save (.ckpt, .pt, .pth, .bin)"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


# ---------------------------------------------------------------------------------------------------
# File layer: one file in, a flat {name: tensor} dict out.
# ---------------------------------------------------------------------------------------------------


def checkpoint_format(path) -> str:
    """What a checkpoint file holds, judged from its first bytes: "safetensors", "torch-zip"
    (torch.save since PyTorch 1.6) or "torch-pickle" (the older, non-zip torch.save format).

    Raises CheckpointError for anything that is not a readable checkpoint, with the reason.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; pass the file inside it")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes); the download or copy failed, fetch it again")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: is a git-LFS pointer (a small text stub), not the weights; "
                              "run `git lfs pull` in its repository to fetch the real file")
    if head.startswith(_ZIP_MAGIC):
        kind = "torch-zip"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        kind = "torch-pickle"
    elif len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        kind = "safetensors"
    else:
        raise CheckpointError(f"{path}: is not a checkpoint (it starts with {head[:16]!r}); "
                              f"accepted formats: {ACCEPTED_FORMATS}")
    if kind != "safetensors" and path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path}: is named .safetensors but holds a PyTorch pickle; refusing to "
                              "load it, since pickles can run code. Get the genuine .safetensors file")
    return kind


def safetensors_metadata(path) -> dict[str, str]:
    """The text metadata of a safetensors header (`__metadata__`); {} for a PyTorch pickle."""
    if checkpoint_format(path) != "safetensors":
        return {}
    return _safetensors_header(Path(path)).get("__metadata__", {})


def read_state_dict(path, *, dtype: torch.dtype | None = None, meta: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, memory-mapped where the format allows.

    A {"state_dict": {...}, "global_step": ...} wrapper is unwrapped and non-tensor entries are
    dropped. `dtype` casts floating-point tensors (which copies them out of the mapping). meta=True
    returns "meta" tensors, shapes and stored dtypes without data: a safetensors file is then read
    from its header alone.
    """
    path = Path(path)
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"read_state_dict: dtype must be a floating-point dtype, not {dtype}")
    kind = checkpoint_format(path)
    if kind == "safetensors":
        tensors = _read_safetensors_meta(path) if meta else _read_safetensors(path)
    else:
        tensors = _read_torch(path, kind)
        if meta:
            tensors = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; it is not a model checkpoint")
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    return tensors


def _safetensors_header(path: Path) -> dict:
    """The parsed JSON header, after checking that the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or damaged safetensors file: the header claims "
                                  f"{header_len} bytes but the file has {size}; download it again")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header ({e}); download it again") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object); download it again")
    try:
        data_len = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header (bad data_offsets); download it again") from e
    if 8 + header_len + data_len > size:
        raise CheckpointError(f"{path}: truncated safetensors file: it has {size} bytes, its header "
                              f"needs {8 + header_len + data_len}; the download was cut short, fetch it again")
    return header


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _safetensors_header(path)  # for the precise truncation message; safe_open re-reads it
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: damaged safetensors file ({e}); download it again") from e


def _read_safetensors_meta(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, entry in _safetensors_header(path).items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], [int(n) for n in entry["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has an unknown or damaged dtype/shape in the "
                                  f"header ({entry!r:.80}); download the file again") from e
        tensors[name] = torch.empty(shape, dtype=dtype, device="meta")
    return tensors


def read_torch_object(path, *, allow: tuple[type, ...] = ()):
    """The whole object a PyTorch pickle holds (nested dicts and lists of tensors, numbers, strings), read
    with the same code-free reader and refusals as read_state_dict, for files whose tensors are nested
    (A1111 embeddings keep theirs under "string_to_param"). `allow`: classes the caller knows to be plain
    data containers, rebuilt without running any of their code but __setstate__ (torch.nn.ParameterDict)."""
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "safetensors":
        raise CheckpointError(f"{path}: is a safetensors file, not a PyTorch pickle; read it with read_state_dict")
    return _load_torch(path, kind, allow)


def _read_torch(path: Path, kind: str) -> dict[str, torch.Tensor]:
    obj = _load_torch(path, kind)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_torch(path: Path, kind: str, allow: tuple[type, ...] = ()):
    try:
        with warnings.catch_warnings():  # torch warns on every pickle protocol but 2; the outcome says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # mmap only works for the zip format; weights_only refuses every non-tensor global.
            with torch.serialization.safe_globals(list(allow)):  # restores torch's list on the way out
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except Exception as e:  # torch raises a zoo of types (RuntimeError, EOFError, struct.error, ...)
        text = _plain(e)
        if isinstance(e, pickle.UnpicklingError):
            named = re.search(r"GLOBAL (\S+?)(?:\s|$)", text)
            # torch names the global only where its reader gets that far: not past a protocol 4+ FRAME
            forbidden = named.group(1) if named else _first_unsafe_global(path, kind, allow)
            if forbidden:
                raise CheckpointError(
                    f"{path}: refused to load: this pickle calls {forbidden}, not just tensor "
                    "constructors, and pickles can run arbitrary code. If you trust its source, convert it to "
                    ".safetensors in a separate trusted environment, or download the model's .safetensors "
                    "release") from e
            if "Unsupported operand" in text:
                raise CheckpointError(
                    f"{path}: cannot read this PyTorch checkpoint safely: it is pickled with a protocol (4 or "
                    "later) that torch's code-free reader does not support. If you trust its source, re-save it "
                    "as .safetensors in a separate trusted environment, or download the model's .safetensors "
                    "release") from e
        reason = re.split(r"\.\s|\n", text)[0] or type(e).__name__  # torch's first sentence says it
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint: the file is damaged, "
                              f"truncated or not written by torch.save ({reason}); download it again") from e
    return obj


def _first_unsafe_global(path: Path, kind: str, allow: tuple[type, ...] = ()) -> str | None:
    """The first "module.name" the file's pickles would call that torch's weights-only reader does not allow,
    found by reading their opcodes: nothing is unpickled. None if there is none or the file is unreadable."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # private: the exact list torch allows
    except ImportError:
        return None
    allowed = set(_get_allowed_globals()) | {f"{c.__module__}.{c.__qualname__}" for c in allow}
    try:
        if kind == "torch-zip":
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                names = _pickle_globals(archive.open(name), pickles=1)
        else:  # legacy: magic number, protocol, system info, the object, storage keys; then raw storages
            with open(path, "rb") as f:
                names = _pickle_globals(f, pickles=5)
        return next((n for n in names if n not in allowed), None)
    except (StopIteration, zipfile.BadZipFile, OSError):
        return None


def _pickle_globals(f, pickles: int) -> list[str]:
    """Globals named by the next `pickles` pickles in a file. STACK_GLOBAL takes its module and name from
    the two values pushed before it (strings, or memo entries holding them); names built any other way
    are reported as such."""
    found = []
    for _ in range(pickles):
        pushed, memo = [], {}
        try:
            for op, arg, _pos in pickletools.genops(f):
                if op.name == "GLOBAL":
                    # protocol 2 names Python 3's builtins "__builtin__", as pickle's own reader maps them
                    found.append(re.sub(r"^__builtin__ ", "builtins ", arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    module, name = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                    found.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str)
                                 else "a function whose name it builds while loading")
                if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name != "FRAME":
                    pushed.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
        except ValueError:  # past the pickles: a legacy file's raw storage bytes
            break
    return found


def file_sha256(path, *, start: int = 0) -> str:
    """The hex sha256 of a file's bytes from offset `start` on, read in blocks (model files are gigabytes):
    the digest behind A1111's short hashes of models, VAEs, embeddings and LoRAs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(error: Exception) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch colours parts of its messages


# ---------------------------------------------------------------------------------------------------
# Loading into a module: all or nothing, never a random weight left in place.
# ---------------------------------------------------------------------------------------------------


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, where: str,
                dtype: torch.dtype | None = None) -> None:
    """Load `state_dict` into `module`, which must find every tensor it expects at its shape.

    Extra checkpoint entries (EMA copies, position_ids, ...) are ignored with one log line. Tensors
    are cast to `dtype` (floating point only; default: the module's own dtypes) and then *assigned*,
    not copied, so no second copy of the weights is held: build the module on the "meta" device to
    skip its random initialisation entirely. `where` names the file or component in messages.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"load_strict: dtype must be a floating-point dtype, not {dtype}")
    expected = module.state_dict()
    bad = [k for k, want in expected.items()
           if k not in state_dict or state_dict[k].shape != want.shape]
    if bad:
        key = bad[0]
        want = tuple(expected[key].shape)
        if key in state_dict:
            problem = f"tensor {key!r} has the wrong shape: expected {want}, found {tuple(state_dict[key].shape)}"
        else:
            problem = f"tensor {key!r} is missing: expected shape {want}, found nothing"
        hint = ""
        if len(bad) == len(expected) and state_dict:
            hint = f"; the checkpoint's keys look like {next(iter(state_dict))!r} (wrong component or prefix?)"
        raise CheckpointError(f"{where}: {problem} ({len(bad)} of {len(expected)} expected tensors are "
                              f"missing or mis-shaped){hint}. The checkpoint does not match this model's "
                              "configuration; check the file and the model config")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        log.info("%s: ignoring %d checkpoint tensor(s) the model does not use, e.g. %s",
                 where, len(extra), ", ".join(extra[:3]))
    module.load_state_dict({k: _cast_like(state_dict[k], want, dtype) for k, want in expected.items()},
                           strict=True, assign=True)


def _cast_like(tensor: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` on the module's device (kept where it is for a meta module) and in the target dtype;
    `.to` returns the tensor itself when nothing changes, so matching tensors are never copied."""
    target = dtype if dtype is not None and want.is_floating_point() else want.dtype
    device = tensor.device if want.device.type == "meta" else want.device
    return tensor.to(device=device, dtype=target)


# ---------------------------------------------------------------------------------------------------
# Writing: a temporary file beside the target, renamed into place once complete.
# ---------------------------------------------------------------------------------------------------


def save_safetensors(state_dict: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None,
                     *, overwrite: bool = False) -> Path:
    """Write `state_dict` as a .safetensors file and return its path. A failure leaves neither the
    target nor a temporary file behind; an existing file is only replaced with overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; refusing to overwrite it. Choose another output "
                              "path or pass overwrite=True")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: output folder {path.parent} does not exist; create it first")
    bad_meta = [k for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad_meta:
        raise InputError(f"save_safetensors: metadata must map str to str; offending key(s): {bad_meta}")
    tensors = _packed(state_dict)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode  # 0o666 less the umask: what any new file here gets
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors writes a private (0600) file of its own and renames it onto ours
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        _publish(tmp, path, overwrite)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise CheckpointError(f"{path}: writing failed ({e}); nothing was written") from e
        raise
    return path


def _packed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each owning its storage: safetensors refuses entries that share memory
    (tied weights, q/k/v views of one fused tensor), so later sharers are copied."""
    seen, out = set(), {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(f"save_safetensors: entry {key!r} is a {type(tensor).__name__}; "
                             "only str -> torch.Tensor entries can be saved")
        tensor = tensor.detach().contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor
    return out


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    if not overwrite:
        try:
            os.link(tmp, path)  # creates `path` only if absent: a file that appeared meanwhile survives
        except OSError:  # FileExistsError, or a filesystem without hard links (FAT, some network mounts)
            if path.exists():
                raise CheckpointError(f"{path}: a file appeared there while writing; "
                                      "refusing to overwrite it") from None
        else:
            os.unlink(tmp)
            return
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Single-file checkpoints hold every component under its own key prefix.
# ---------------------------------------------------------------------------------------------------


def split_prefixed(state_dict: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, dict]:
    """Split a state dict by key prefix, e.g. ORIGINAL_PREFIXES: {name: {key without prefix: tensor}},
    plus "unused" for the keys no prefix matches (kept whole). The longest matching prefix wins."""
    if "unused" in prefixes:
        raise InputError("split_prefixed: 'unused' is reserved for the leftover keys; rename that part")
    parts = {name: {} for name in prefixes}
    parts["unused"] = {}
    longest_first = sorted(prefixes.items(), key=lambda item: -len(item[1]))
    for key, tensor in state_dict.items():
        for name, prefix in longest_first:
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
                break
        else:
            parts["unused"][key] = tensor
    return parts
