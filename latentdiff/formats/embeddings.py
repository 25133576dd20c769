"""Textual-inversion embeddings: every file format in circulation read into one record.

Formats (a file's content decides, not its extension):
- A1111 `.pt`: {"string_to_param": {"*": (n, width)}, "string_to_token": ..., "name", "step", ...}, and
  the original textual_inversion repository's files, whose string_to_param is a torch.nn.ParameterDict
- one tensor alone: kohya and others ({"emb_params": (n, width)}, .pt or .safetensors) and diffusers'
  learned_embeds.bin / .safetensors ({"<token>": (width,) or (n, width)})
- SDXL files ({"clip_l": ..., "clip_g": ...}) are refused: latentdiff runs SD 1.x and 2.x models.
Embeddings hidden in PNG/WebP images (A1111's other format) are not read.

The trigger word is the file name's stem, as in A1111 (a name stored inside the file is ignored).
Pickles go through checkpoint.py's code-free reader, like checkpoints.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import checkpoint_format, file_sha256, read_state_dict, read_torch_object
from ..config import TextEncoderConfig
from ..errors import CheckpointError, InputError
from ..infotext import hash_entry_name, hash_list

log = logging.getLogger("latentdiff")

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".avif")
_KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}


@dataclass(frozen=True)
class Embedding:
    """One trigger word's vectors. `hash` is A1111's short hash for the `TI hashes` infotext entry."""

    name: str
    vectors: torch.Tensor  # (n_vectors, width), float32
    source_format: str  # "a1111", "single-tensor" (emb_params, diffusers {token: tensor})
    hash: str
    path: Path

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


def read_embedding(path) -> Embedding:
    """The embedding in one file; CheckpointError with a one-line reason for anything else."""
    path = Path(path)
    if checkpoint_format(path) == "safetensors":
        shapes = read_state_dict(path, meta=True)  # the header alone: a 2 GB checkpoint costs nothing here
        _refuse_non_embedding(path, shapes)
        data = read_state_dict(path)
    else:
        # the original textual_inversion code (and early A1111) pickled a ParameterDict: plain data
        data = read_torch_object(path, allow=(torch.nn.ParameterDict,))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not an embedding (a dict of vectors)")
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])  # a ParameterDict's
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise CheckpointError(f"{path}: its string_to_param holds {count} entries, not one embedding; "
                                  "latentdiff reads one embedding per file, as A1111 does")
        vectors, source = next(iter(params.values())), "a1111"
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        _refuse_non_embedding(path, tensors)
        vectors, source = next(iter(tensors.values())), "single-tensor"
    return Embedding(path.stem, _as_vectors(path, vectors), source, a1111_hash(path), path)


def check_width(embedding: Embedding, text: TextEncoderConfig) -> None:
    """Refuse an embedding made for a text encoder of another width (an SD 2.x one on SD 1.x, ...)."""
    if embedding.width != text.width:
        made_for = _KNOWN_WIDTHS.get(embedding.width)
        made_for = f"made for {made_for}" if made_for else "not for any model latentdiff runs"
        raise InputError(f"{embedding.path}: embedding vectors have width {embedding.width} ({made_for}); this "
                         f"model's text encoder has width {text.width} ({_KNOWN_WIDTHS.get(text.width, 'its own')}); "
                         "use an embedding trained for this model family")


def load_embeddings_dir(path, text: TextEncoderConfig | None = None) -> dict[str, Embedding]:
    """Every embedding in a folder and its subfolders, by trigger name (the file stem).

    Files that are not embeddings (a LoRA, a checkpoint, a truncated download, an unsafe pickle) are skipped
    with one warning line each, never an exception; so are, given `text`, embeddings of another width.
    Image files (previews, or A1111's embeddings-in-PNG, which are not read) and other files are skipped
    with an info line. Two files with one stem: the first in sorted order wins, the other is named.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: embeddings folder does not exist or is not a folder")
    found: dict[str, Embedding] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = file.suffix.lower()
        if suffix not in EMBEDDING_SUFFIXES:
            what = ("an image (embeddings hidden in images are not read)" if suffix in _IMAGE_SUFFIXES
                    else f"not an embedding file ({', '.join(EMBEDDING_SUFFIXES)})")
            log.info("%s: skipped: %s", file, what)
            continue
        try:
            embedding = read_embedding(file)
            if text is not None:
                check_width(embedding, text)
        except (CheckpointError, InputError, OSError) as e:  # OSError: unreadable (permissions, gone meanwhile)
            log.warning("skipped embedding: %s", e)
            continue
        if embedding.name in found:
            log.warning("%s: skipped: an embedding named %r was already read from %s",
                        file, embedding.name, found[embedding.name].path)
            continue
        found[embedding.name] = embedding
    return found


def a1111_hash(path) -> str:
    """A1111's short hash of an embedding, as its `TI hashes` infotext entry shows it: the first 12 hex
    digits of the SHA-256 of the whole file. Checked against A1111's source (read for the fact, not copied):
    its embedding loader hashes the whole file (cache key "textual_inversion/<name>", no "addnet" variant,
    unlike LoRA's, which skips a safetensors header) and its "shorthash" is hash[0:12]. Not run against an
    A1111 install here; the value is computed, not tested against an A1111-written image."""
    return file_sha256(path)[:12]


def ti_hashes(embeddings) -> str:
    """The `TI hashes` infotext value for the embeddings a prompt used: "name: hash, name: hash", names
    stripped of ":" and "," as A1111 writes them (the infotext writer quotes the value, as it holds both)."""
    return hash_list((e.name, e.hash) for e in embeddings)


def _refuse_non_embedding(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One line saying what a dict of tensors is, unless it is a single-tensor embedding."""
    keys = list(tensors)
    if {"clip_l", "clip_g"} <= set(keys):
        raise CheckpointError(f"{path}: is an SDXL embedding (clip_l and clip_g vectors); latentdiff runs SD 1.x "
                              "(text width 768) and SD 2.x (1024) models: use an embedding made for those")
    if len(keys) == 1:
        return
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors; it is not an embedding")
    if any(part in k.lower() for k in keys for part in ("lora", "hada_", "lokr_")):
        what = "a LoRA/LyCORIS file"
    elif len(keys) > 100:
        what = "a model checkpoint or a network's weights"
    else:
        what = "not an embedding"
    raise CheckpointError(f"{path}: holds {len(keys)} tensors (e.g. {keys[0]!r}): {what}; an embedding file "
                          "holds one tensor of vectors (or A1111's string_to_param)")


def _as_vectors(path: Path, tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or not tensor.is_floating_point():
        what = (f"a {tensor.dim()}-D {tensor.dtype} tensor {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                else f"a {type(tensor).__name__}")
        raise CheckpointError(f"{path}: its embedding is {what}, not floating-point vectors (n, width)")
    vectors = tensor.detach().to(torch.float32, copy=True)  # owned: not a view into a mapped file
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors  # diffusers' single vector (width,)
    if vectors.shape[0] == 0 or not torch.isfinite(vectors).all():
        raise CheckpointError(f"{path}: its embedding vectors are empty or hold NaN/Inf; the file is damaged")
    return vectors


def ti_replay_notes(value: str, folder) -> list[str]:
    """What a replay cannot honour of an image's `TI hashes` value ("name: hash, ...") with the embeddings
    of `folder`: a name with no file of that stem there, or a file whose hash differs (another version of
    the embedding). A name whose file has the image's hash is honoured: the prompt's trigger word loads it."""
    files = {hash_entry_name(p.stem): p for p in sorted(Path(folder).rglob("*"), reverse=True)
             if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES}  # reversed: the first in sorted order wins
    notes = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        name, _, wanted = (s.strip() for s in entry.rpartition(":"))
        if name not in files:
            notes.append(f"TI hashes: no embedding {name!r} in {folder}; the image's prompt used it")
        elif (found := a1111_hash(files[name])) != wanted:
            notes.append(f"TI hashes: {files[name]} has hash {found}, the image's {name!r} "
                         f"had {wanted}: another version of the embedding, the image will differ")
    return notes
