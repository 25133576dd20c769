"""Original (CompVis/ldm) single-file checkpoints: `.safetensors`, `.ckpt`, `.pt`.

The model's own module tree is this layout, so reading is: name what the file is from its keys
(families.py), detect the architecture from tensor shapes, build an empty model, one strict load. The only
translations are of the text tower: SD 2.x's OpenCLIP keys, and SD 1.x CLIP keys saved without `text_model.`.
"""

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from ..checkpoint import (ORIGINAL_PREFIXES, load_strict, read_state_dict, safetensors_metadata, save_safetensors,
                          split_prefixed)
from ..config import ModelConfig, config_from_dict, config_to_dict
from ..errors import CheckpointError
from ..model import StableDiffusion, build_on_meta
from .clip_keys import detect_text_config, flat_clip_to_ours, openclip_to_ours, ours_to_openclip
from .families import identify_single_file
from .unet_keys import detect_unet_config
from .vae_keys import detect_vae_config

TEXT = ORIGINAL_PREFIXES["text"]
OPENCLIP = "model."  # SD 2.x: OpenCLIP's own parameter names follow `cond_stage_model.model.`
CONFIG_METADATA_KEY = "latentdiff_config"
log = logging.getLogger("latentdiff")


def _prediction_from_sidecar(path: Path) -> str | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` is the ldm config, which says
    `parameterization: "v"` for v models; without that line ldm's default, eps, applies."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    return "v" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.M) else "eps"


def _text_in_our_layout(sd: dict, family: str) -> dict:
    """The text tower's keys in our layout (the module tree): from OpenCLIP's (SD 2.x), or from CLIP's
    without `text_model.` (many SD 1.x files)."""
    parts = split_prefixed(sd, {"text": TEXT})
    text = parts["text"]
    if family == "sd2":
        text, _ = openclip_to_ours({k[len(OPENCLIP):]: v for k, v in text.items() if k.startswith(OPENCLIP)})
    else:
        text = flat_clip_to_ours(text)
    return parts["unused"] | {TEXT + k: v for k, v in text.items()}


def detect_config(sd: dict, path: Path, prediction: str, family: str) -> ModelConfig:
    """The architecture from tensor shapes (text keys already in our layout)."""
    parts = split_prefixed(sd, ORIGINAL_PREFIXES)
    text = detect_text_config(parts["text"], openclip=family == "sd2")
    unet = detect_unet_config(parts["unet"])
    vae = detect_vae_config(parts["vae"])
    resolution = 768 if (family == "sd2" and prediction == "v") else 512
    return ModelConfig(name=path.stem, family=family, text=text, unet=unet, vae=vae, prediction=prediction,
                       resolution=resolution)


def _stored_config(path: Path, family: str) -> ModelConfig | None:
    """The config latentdiff wrote into the header. Files written before `family` existed lack it: their
    text key layout says it (the writer used OpenCLIP's layout exactly for SD 2.x)."""
    stored = safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if not stored:
        return None
    try:
        data = json.loads(stored)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the {CONFIG_METADATA_KEY!r} metadata is not valid JSON ({e}); pass a "
                              "config to load it") from None
    return config_from_dict({"family": family} | data, where=f"{path} (metadata)")


def read_single_file(path: str | Path, *, config: ModelConfig | None = None, prediction: str | None = None,
                     dtype: torch.dtype | None = None, meta: bool = False) -> StableDiffusion:
    """Config precedence: the `config` argument, then the one latentdiff stored in the file's metadata,
    then detection from shapes. The prediction type: `prediction`, else that config's, else the .yaml
    beside the file, else eps, with a warning for SD 2.x (whose 768 px models are v). meta=True builds
    the model on the "meta" device from the shapes alone (a safetensors file's header is all it reads)."""
    path = Path(path)
    sd = read_state_dict(path, meta=meta)
    family = identify_single_file(sd, str(path))
    sd = _text_in_our_layout(sd, family)
    known = prediction is not None or config is not None
    if config is None:
        config = _stored_config(path, family)
        known = known or config is not None
    if config is None:
        sidecar = _prediction_from_sidecar(path)
        known = known or sidecar is not None
        config = detect_config(sd, path, prediction or sidecar or "eps", family)
    if prediction is not None:
        config = dataclasses.replace(config, prediction=prediction)
    if not known and family == "sd2":
        log.warning("%s: nothing says this SD 2.x file's prediction type (no prediction argument, no %s beside "
                    "it, no config in its metadata); assuming eps at 512 px. A 768-v model (SD 2.0/2.1 768) then "
                    "draws noise: pass prediction=\"v\" (CLI: --prediction v)", path, path.with_suffix(".yaml").name)
    model = build_on_meta(config)
    load_strict(model, sd, where=str(path), dtype=dtype)
    return model


def write_single_file(model: StableDiffusion, path: str | Path) -> Path:
    """A `.safetensors` in the original layout, SD 2.x text weights in OpenCLIP's fused form.

    The config travels in the header metadata, so architecture and prediction type load back exactly.
    """
    sd = model.state_dict()
    if model.config.family == "sd2":  # OpenCLIP's key layout, as SD 2.x files have it
        text = {k[len(TEXT):]: sd.pop(k) for k in list(sd) if k.startswith(TEXT)}
        sd |= {TEXT + OPENCLIP + k: v for k, v in ours_to_openclip(text).items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config_to_dict(model.config))}
    return save_safetensors(sd, path, metadata=metadata)
