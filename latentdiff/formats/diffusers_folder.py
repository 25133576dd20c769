"""diffusers model folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

Every key goes through the component mapping tables in this package; nothing else knows this layout.
"""

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from ..checkpoint import ORIGINAL_PREFIXES, load_strict, read_state_dict, save_safetensors
from ..clip import Tokenizer
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import StableDiffusion, build_on_meta
from .clip_keys import OURS, text_config_from_hf, text_config_to_hf
from .families import identify_diffusers_folder
from .unet_keys import unet_config_from_diffusers, unet_config_to_diffusers, unet_from_diffusers, unet_to_diffusers
from .vae_keys import vae_config_from_diffusers, vae_config_to_diffusers, vae_from_diffusers, vae_to_diffusers

UNET, VAE, TEXT = (ORIGINAL_PREFIXES[part] for part in ("unet", "vae", "text"))
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent.parent}: diffusers folder is missing {path.parent.name}/{path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weights_file(folder: Path, part: str) -> Path:
    """The weights file of `part` ("unet", "vae", "text_encoder"), in the order diffusers prefers them."""
    for name in WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise CheckpointError(f"{folder}: no weights in {part}/ (looked for {', '.join(WEIGHT_FILES[part])})")


def read_diffusers_folder(path: str | Path, *, prediction: str | None = None, dtype: torch.dtype | None = None,
                          meta: bool = False) -> StableDiffusion:
    """meta=True builds the model on the "meta" device from configs and safetensors headers alone."""
    path = Path(path)
    text_json = _json(path / "text_encoder" / "config.json")
    family = identify_diffusers_folder(_json(path / "model_index.json"), text_json, str(path))
    unet = unet_config_from_diffusers(_json(path / "unet" / "config.json"))
    vae_json = _json(path / "vae" / "config.json")
    vae = vae_config_from_diffusers(vae_json)
    text = text_config_from_hf(text_json)
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    steps_offset = _scheduler_field(scheduler, path, "steps_offset", int, 0)
    alpha_to_one = _scheduler_field(scheduler, path, "set_alpha_to_one", bool, True)
    tokenizer = Tokenizer.from_folder(path / "tokenizer", max_length=text.max_length)
    text = dataclasses.replace(text, pad_id=tokenizer.pad_id)
    config = ModelConfig(
        name=path.name, family=family, text=text, unet=unet, vae=vae,
        prediction=prediction or PREDICTION.get(scheduler.get("prediction_type", "epsilon"), "eps"),
        latent_scale=vae_json.get("scaling_factor", 0.18215),
        resolution=_json(path / "unet" / "config.json").get("sample_size", 64) * vae.downsample_factor,
        beta_schedule=scheduler.get("beta_schedule", "scaled_linear"),
        beta_start=scheduler.get("beta_start", 0.00085), beta_end=scheduler.get("beta_end", 0.012),
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
        steps_offset=steps_offset, set_alpha_to_one=alpha_to_one)

    def weights(part: str) -> dict:
        return read_state_dict(weights_file(path, part), meta=meta)

    sd = {UNET + k: v for k, v in unet_from_diffusers(weights("unet"), unet).items()}
    sd |= {VAE + k: v for k, v in vae_from_diffusers(weights("vae"), vae).items()}
    # transformers < 5 saves CLIPTextModel keys under `text_model.`; 5.x saves them without it.
    sd |= {TEXT + OURS + k.removeprefix("text_model."): v for k, v in weights("text_encoder").items()}
    model = build_on_meta(config, tokenizer)
    load_strict(model, sd, where=str(path), dtype=dtype)
    return model


def _scheduler_field(scheduler: dict, path: Path, key: str, kind: type, default):
    """A scheduler_config.json value, or diffusers' DDIMScheduler default when the key is absent."""
    value = scheduler.get(key, default)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        problem = "a non-negative integer"
    elif kind is bool and not isinstance(value, bool):
        problem = "true or false"
    else:
        return value
    raise CheckpointError(f"{path / 'scheduler' / 'scheduler_config.json'}: {key} must be {problem}, not "
                          f"{value!r}; fix the file (SD ships steps_offset 1, set_alpha_to_one false)")


def _text_for_diffusers(model: StableDiffusion) -> tuple[dict, dict]:
    """CLIPTextModel always returns its last layer, so a model that conditions on layer -k is written with
    its last k-1 layers dropped (how diffusers converts SD 2.x: 24 OpenCLIP layers -> 23)."""
    cfg = model.config.text
    keep = cfg.layers + cfg.output_layer + 1
    dropped = tuple(f"text_model.encoder.layers.{i}." for i in range(keep, cfg.layers))
    sd = {k[len("transformer."):]: v for k, v in model.text_encoder.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    return sd, text_config_to_hf(dataclasses.replace(cfg, layers=keep, output_layer=-1))


def write_diffusers_folder(model: StableDiffusion, path: str | Path) -> Path:
    """Write a folder diffusers' StableDiffusionPipeline.from_pretrained loads. Built in a temporary folder
    beside the target and renamed, so a failure leaves nothing; an existing target is never touched."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose a new output folder (nothing was overwritten)")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: output folder {path.parent} does not exist; create it first")
    cfg = model.config
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # the mode any new folder here gets (tempfile.mkdtemp's would be private: 0700)
    try:
        text_sd, text_json = _text_for_diffusers(model)
        parts = {
            "unet": (unet_config_to_diffusers(cfg.unet) | {"sample_size": cfg.resolution // cfg.vae.downsample_factor},
                     unet_to_diffusers(model.unet.state_dict(), cfg.unet), "diffusion_pytorch_model.safetensors"),
            "vae": (vae_config_to_diffusers(cfg.vae, cfg.latent_scale) | {"sample_size": cfg.resolution},
                    vae_to_diffusers(model.vae.state_dict(), cfg.vae), "diffusion_pytorch_model.safetensors"),
            "text_encoder": (text_json, text_sd, "model.safetensors"),
            "scheduler": (_scheduler_config(cfg), None, None),
        }
        for part, (config, weights, filename) in parts.items():
            (tmp / part).mkdir()
            (tmp / part / ("scheduler_config.json" if part == "scheduler" else "config.json")).write_text(
                json.dumps(config, indent=2))
            if weights is not None:
                save_safetensors(weights, tmp / part / filename)
        model.tokenizer.save(tmp / "tokenizer")
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _scheduler_config(cfg: ModelConfig) -> dict:
    # What SD 1.5 / 2.x ship: PNDM, leading spacing (steps_offset and set_alpha_to_one: the model's).
    return {"_class_name": "PNDMScheduler", "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end, "num_train_timesteps": cfg.num_train_timesteps,
            "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[cfg.prediction],
            "set_alpha_to_one": cfg.set_alpha_to_one, "skip_prk_steps": True, "steps_offset": cfg.steps_offset,
            "clip_sample": False, "timestep_spacing": "leading"}


def _model_index() -> dict:
    return {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
