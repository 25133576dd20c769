"""Original (CompVis/ldm) single-file checkpoints: `.safetensors`, `.ckpt`, `.pt`.

The model's own module tree is this layout, so reading is: detect the architecture from tensor shapes,
build an empty model, one strict load. The only translation is SD 2.x's OpenCLIP text tower.
"""

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..checkpoint import load_strict, read_state_dict, safetensors_metadata, save_safetensors
from ..config import ModelConfig, config_from_dict, config_to_dict
from ..errors import CheckpointError
from ..model import StableDiffusion, build_on_meta
from .clip_keys import detect_text_config, openclip_to_ours, ours_to_openclip
from .unet_keys import detect_unet_config
from .vae_keys import detect_vae_config

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPENCLIP = TEXT + "model."
CONFIG_METADATA_KEY = "latentdiff_config"


def _component(sd: dict, prefix: str, what: str, path: Path) -> dict:
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(
            f"{path}: no {what} weights (no keys starting with '{prefix}'). A Stable Diffusion single file "
            f"holds the U-Net, the VAE and the text encoder; a file with only some of them (a LoRA, a "
            f"standalone VAE or U-Net) cannot be loaded as a model.")
    return part


def _prediction_from_sidecar(path: Path) -> str | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` says `parameterization: "v"`."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.M):
        return "v"
    return None


def _from_openclip(sd: dict) -> dict:
    text, _ = openclip_to_ours({k[len(OPENCLIP):]: v for k, v in sd.items() if k.startswith(OPENCLIP)})
    return {k: v for k, v in sd.items() if not k.startswith(TEXT)} | {TEXT + k: v for k, v in text.items()}


def detect_config(sd: dict, path: Path, prediction: str | None, openclip: bool) -> ModelConfig:
    """The architecture from tensor shapes (text keys already in our layout); the prediction type from
    the flag or a sidecar yaml. Rule when neither says: eps, so SD 2.x 768-v checkpoints need
    `prediction="v"` or their .yaml.
    """
    text = detect_text_config(_component(sd, TEXT, "text encoder", path), openclip=openclip)
    unet = detect_unet_config(_component(sd, UNET, "U-Net", path))
    vae = detect_vae_config(_component(sd, VAE, "VAE", path))
    prediction = prediction or _prediction_from_sidecar(path) or "eps"
    resolution = 768 if (openclip and prediction == "v") else 512
    return ModelConfig(name=path.stem, text=text, unet=unet, vae=vae, prediction=prediction,
                       resolution=resolution)


def read_single_file(path: str | Path, *, config: ModelConfig | None = None, prediction: str | None = None,
                     dtype: torch.dtype | None = None) -> StableDiffusion:
    """Config precedence: the `config` argument, then the one latentdiff stored in the file's metadata,
    then detection from shapes. `prediction` overrides whichever is used."""
    path = Path(path)
    sd = read_state_dict(path)
    openclip = any(k.startswith(OPENCLIP) for k in sd)
    if openclip:
        sd = _from_openclip(sd)
    stored = safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if config is None and stored:
        config = config_from_dict(json.loads(stored), where=f"{path} (metadata)")
    if config is None:
        config = detect_config(sd, path, prediction, openclip)
    if prediction is not None:
        config = dataclasses.replace(config, prediction=prediction)
    model = build_on_meta(config)
    load_strict(model, sd, where=str(path), dtype=dtype)
    return model


def write_single_file(model: StableDiffusion, path: str | Path) -> Path:
    """A `.safetensors` in the original layout, SD 2.x text weights in OpenCLIP's fused form.

    The config travels in the header metadata, so architecture and prediction type load back exactly.
    """
    sd = model.state_dict()
    if model.config.text.activation == "gelu":  # SD 2.x family: OpenCLIP key layout
        text = {k[len(TEXT):]: sd.pop(k) for k in list(sd) if k.startswith(TEXT)}
        sd |= {OPENCLIP + k: v for k, v in ours_to_openclip(text).items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config_to_dict(model.config))}
    return save_safetensors(sd, path, metadata=metadata)
