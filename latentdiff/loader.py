"""Load a model from whatever the user has: a single file, a diffusers folder, or a preset + weights."""

import hashlib
from pathlib import Path

import torch

from .config import ModelConfig, preset
from .errors import CheckpointError
from .formats.diffusers_folder import is_diffusers_folder, read_diffusers_folder, write_diffusers_folder
from .formats.single_file import read_single_file, write_single_file
from .model import StableDiffusion


def load_model(source: str | Path, *, config: ModelConfig | str | None = None, prediction: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> StableDiffusion:
    """`source` is a single-file checkpoint or a diffusers folder. `config` (a ModelConfig or a preset
    name) overrides detection for single files; `prediction` ("eps" / "v") overrides the prediction type."""
    path = Path(source).expanduser()
    if isinstance(config, str):
        config = preset(config)
    if is_diffusers_folder(path):
        model = read_diffusers_folder(path, prediction=prediction, dtype=dtype)
    elif path.is_dir():
        raise CheckpointError(f"{path} is a folder without model_index.json: not a diffusers model folder. "
                              f"Pass a .safetensors/.ckpt file or a diffusers folder.")
    else:
        model = read_single_file(path, config=config, prediction=prediction, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def save_model(model: StableDiffusion, target: str | Path) -> Path:
    """`*.safetensors` -> original single file; anything else -> a new diffusers folder."""
    target = Path(target).expanduser()
    if target.suffix == ".safetensors":
        return write_single_file(model, target)
    if target.suffix in (".ckpt", ".pt", ".bin"):
        raise CheckpointError(f"{target}: latentdiff writes only .safetensors single files (pickles can carry "
                              f"code); use a .safetensors name or a folder name for a diffusers folder")
    return write_diffusers_folder(model, target)


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (folders: of unet weights)."""
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("unet/diffusion_pytorch_model*"), None) or path / "model_index.json"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
