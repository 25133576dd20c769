"""Load a model from whatever the user has: a single file, a diffusers folder, or a preset + weights."""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ORIGINAL_PREFIXES, file_sha256, load_strict, read_state_dict, split_prefixed
from .config import ModelConfig, preset
from .errors import CheckpointError
from .formats.diffusers_folder import (WEIGHT_FILES, is_diffusers_folder, read_diffusers_folder, weights_file,
                                       write_diffusers_folder)
from .formats.single_file import read_single_file, write_single_file
from .formats.vae_keys import detect_vae_config, vae_config_from_diffusers, vae_from_diffusers
from .model import StableDiffusion

log = logging.getLogger("latentdiff")
COMPONENTS = {"unet": "unet", "vae": "vae", "text_encoder": "text"}  # model part -> ORIGINAL_PREFIXES name


def load_model(source: str | Path, *, config: ModelConfig | str | None = None, prediction: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> StableDiffusion:
    """`source` is a single-file checkpoint or a diffusers folder. `config` (a ModelConfig or a preset
    name) overrides detection for single files; `prediction` ("eps" / "v") overrides the prediction type.
    device="meta" reads shapes only (a safetensors file's header): a model to inspect, not to run."""
    meta = torch.device(device).type == "meta"
    model = _read(Path(source).expanduser(), config, prediction, dtype, meta)
    return (model if meta else model.to(device)).eval().requires_grad_(False)


def _read(path: Path, config, prediction, dtype, meta) -> StableDiffusion:
    if isinstance(config, str):
        config = preset(config)
    if is_diffusers_folder(path):
        return read_diffusers_folder(path, prediction=prediction, dtype=dtype, meta=meta)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers model folder. "
                              f"Pass a .safetensors/.ckpt file or a diffusers folder.")
    return read_single_file(path, config=config, prediction=prediction, dtype=dtype, meta=meta)


def stored_dtypes(source: str | Path) -> dict[str, tuple[torch.dtype, ...]]:
    """The floating-point dtypes each component's tensors have in the file ({"unet": (torch.float16,), ...}),
    read from headers where the format allows; a model loads in float32 unless told otherwise."""
    path = Path(source).expanduser()
    if is_diffusers_folder(path):
        parts = {name: read_state_dict(weights_file(path, name), meta=True) for name in COMPONENTS}
    else:
        split = split_prefixed(read_state_dict(path, meta=True), ORIGINAL_PREFIXES)
        parts = {name: split[prefix] for name, prefix in COMPONENTS.items()}
    return {name: tuple(sorted({t.dtype for t in sd.values() if t.is_floating_point()}, key=str))
            for name, sd in parts.items()}


@dataclass(frozen=True)
class ModelSummary:
    config: ModelConfig
    parameters: dict[str, int]  # per component: "unet", "vae", "text_encoder"
    dtypes: dict[str, tuple[torch.dtype, ...]]  # per component, as stored in the file


def describe_model(source: str | Path, *, prediction: str | None = None) -> ModelSummary:
    """What a checkpoint holds, without reading its weights (for safetensors files and folders)."""
    model = load_model(source, prediction=prediction, device="meta")
    return ModelSummary(model.config, model.parameter_counts(), stored_dtypes(source))


def convert(source: str | Path, target: str | Path, *, config: ModelConfig | str | None = None,
            prediction: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Rewrite a model in the other layout (see save_model). Each component keeps the dtype it is stored
    in (an fp16 file stays fp16) unless `dtype` casts them all."""
    target = Path(target).expanduser()
    _refuse_existing(target)  # before the minutes a big model takes to load
    if dtype is not None:
        return save_model(load_model(source, config=config, prediction=prediction, dtype=dtype), target)
    kept = {name: found[0] if len(found) == 1 else torch.float32 for name, found in stored_dtypes(source).items()}
    single = set(kept.values())
    model = load_model(source, config=config, prediction=prediction,
                       dtype=single.pop() if len(single) == 1 else None)
    for name, part_dtype in kept.items():
        getattr(model, name).to(part_dtype)
    return save_model(model, target)


def save_model(model: StableDiffusion, target: str | Path) -> Path:
    """`*.safetensors` -> original single file; anything else -> a new diffusers folder. An existing
    target is never replaced."""
    target = Path(target).expanduser()
    _refuse_existing(target)
    if target.suffix == ".safetensors":
        return write_single_file(model, target)
    if target.suffix in (".ckpt", ".pt", ".bin"):
        raise CheckpointError(f"{target}: latentdiff writes only .safetensors single files (pickles can carry "
                              f"code); use a .safetensors name or a folder name for a diffusers folder")
    return write_diffusers_folder(model, target)


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise CheckpointError(f"{target}: already exists; latentdiff never overwrites a model. Choose a new "
                              "target path (or move the old one away first)")


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (folders: of unet weights)."""
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("unet/diffusion_pytorch_model*"), None) or path / "model_index.json"
    return file_sha256(path)[:10]


def swap_vae(model: StableDiffusion, source: str | Path) -> Path:
    """Replace the model's VAE weights with those of `source`, in place; returns the weights file read (its
    hash goes into the infotext). `source`: a standalone VAE file in the original layout (bare
    `encoder.*`/`decoder.*` keys or `first_stage_model.*`; .safetensors or a .pt/.ckpt pickle, read safely),
    a whole single-file checkpoint (its VAE is taken, as A1111 users expect of "that model's VAE"), the same
    keys in diffusers' layout, or a diffusers AutoencoderKL folder (config.json + weights) or whole model
    folder (its vae/). The VAE must have the model's architecture; every tensor comes from the file (extra
    keys, e.g. `model_ema.*`, are ignored with a log line). Swap before building a Pipeline on the model: the
    Pipeline packs weights for its device."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"vae: {path} does not exist; pass a VAE file or a diffusers AutoencoderKL folder")
    weights, sd = _read_vae(path, model.config)
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        raise CheckpointError(f"{weights}: not a VAE: no {ORIGINAL_PREFIXES['vae']}*, encoder.* or decoder.* keys "
                              f"(its keys look like {next(iter(sd), 'nothing')!r}); pass a VAE file or a diffusers "
                              f"AutoencoderKL folder")
    found, wanted = detect_vae_config(sd, where=str(weights)), model.config.vae
    if found != wanted:
        differences = ", ".join(f"{f.name} {getattr(found, f.name)} (the model's: {getattr(wanted, f.name)})"
                                for f in dataclasses.fields(wanted) if getattr(found, f.name) != getattr(wanted, f.name))
        raise CheckpointError(f"{weights}: this VAE does not fit the model: {differences}; pass a VAE made for "
                              f"this model's family")
    load_strict(model.vae, sd, where=str(weights))
    return weights


def _read_vae(path: Path, config: ModelConfig) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its VAE tensors under our keys plus its keys of no other part, for load_strict to name)."""
    if is_diffusers_folder(path):
        path = path / "vae"
    if path.is_dir():
        json_file = path / "config.json"
        weights = next((path / name for name in WEIGHT_FILES["vae"] if (path / name).is_file()), None)
        if not json_file.is_file() or weights is None:
            raise CheckpointError(f"{path}: a folder, but not a diffusers AutoencoderKL folder (config.json and "
                                  f"one of {', '.join(WEIGHT_FILES['vae'])}); pass a VAE file or such a folder")
        try:
            folder_config = json.loads(json_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{json_file}: not valid JSON ({e})") from None
        scale = folder_config.get("scaling_factor", config.latent_scale)
        if abs(scale - config.latent_scale) > 1e-6:  # e.g. SDXL's VAE: the same shapes, another latent space
            log.warning("%s: scaling_factor %s is not the model's latent scale %s; the model's is used, but a VAE "
                        "trained for another family gives wrong colours", json_file, scale, config.latent_scale)
        cfg = vae_config_from_diffusers(folder_config, where=str(json_file))
        return weights, vae_from_diffusers(read_state_dict(weights), cfg, where=str(weights))
    sd = read_state_dict(path)
    if any(k.startswith(ORIGINAL_PREFIXES["vae"]) for k in sd):
        parts = split_prefixed(sd, ORIGINAL_PREFIXES)
        if parts["unet"] or parts["text"]:
            log.info("%s: a whole checkpoint; taking its VAE (%s*)", path, ORIGINAL_PREFIXES["vae"])
        return path, parts["vae"] | parts["unused"]
    if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.")) for k in sd):
        return path, vae_from_diffusers(sd, config.vae, where=str(path))  # diffusers' keys, no config: the model's
    return path, sd


def vae_name(weights: str | Path) -> str:
    """The VAE's name as A1111 writes it in the infotext: its file name (a folder's name for diffusers weights)."""
    weights = Path(weights)
    if not weights.name.startswith("diffusion_pytorch_model"):
        return weights.name
    folder = weights.parent
    return folder.parent.name if folder.name == "vae" and is_diffusers_folder(folder.parent) else folder.name
