"""What a checkpoint is, named from its keys and tensor shapes (never from its file name).

latentdiff builds two families, stored as ModelConfig.family: "sd1" (OpenAI CLIP ViT-L text tower under
`cond_stage_model.transformer.`) and "sd2" (OpenCLIP ViT-H under `cond_stage_model.model.`). Every other
kind of file gets a message naming what it is: another model family or variant (UnsupportedModelError),
or an add-on or a single network that is not a whole model (CheckpointError).
"""

import torch

from ..checkpoint import ORIGINAL_PREFIXES
from ..config import TextEncoderConfig
from ..errors import CheckpointError, UnsupportedModelError

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
UNET, VAE, TEXT = (ORIGINAL_PREFIXES[part] for part in ("unet", "vae", "text"))
CLIP_TEXT, OPENCLIP_TEXT = TEXT + "transformer.", TEXT + "model."

# Model families and variants recognised by key prefixes only they have.
_OTHER_MODELS = [
    (("double_blocks.", "single_blocks.", UNET + "double_blocks.", UNET + "single_blocks."),
     "a Flux model (a rectified-flow transformer)"),
    ((UNET + "joint_blocks.",), "an SD3 model (MMDiT transformer)"),
    (("conditioner.embedders.",), "an SDXL model"),
    (("embedder.", "noise_augmentor."), "an SD 2.x unCLIP model (image variations)"),
    (("depth_model.",), "an SD 2.x depth-to-image model (5-channel U-Net + MiDaS depth model)"),
    (("low_scale_model.",), "the SD x4 upscaler (7-channel U-Net)"),
]
_LORA_PARTS = ("lora_up.", "lora_down.", "lora_A.", "lora_B.", ".lora.up.", ".lora.down.", ".hada_w1_a",
               ".lokr_w1", ".oft_blocks", "lora_unet_", "lora_te_")
_EMBEDDING_KEYS = {"string_to_param", "string_to_token", "emb_params", "clip_l", "clip_g"}
# diffusers pipelines of other families; a StableDiffusionPipeline folder is read part by part.
DIFFUSERS_PIPELINES = {
    "StableDiffusionXLPipeline": "an SDXL model", "StableDiffusionXLImg2ImgPipeline": "an SDXL (refiner) model",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
    "StableDiffusion3Pipeline": "an SD3 model (MMDiT transformer)", "FluxPipeline": "a Flux model",
    "StableDiffusionDepth2ImgPipeline": "an SD 2.x depth-to-image model",
    "StableDiffusionUpscalePipeline": "the SD x4 upscaler",
    "StableUnCLIPPipeline": "an SD 2.x unCLIP model", "StableUnCLIPImg2ImgPipeline": "an SD 2.x unCLIP model",
}
_SUPPORTED = "latentdiff builds SD 1.x and SD 2.x text-to-image models"


def unsupported(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: this is {what}; {_SUPPORTED}, and this kind is not supported yet")


def identify_single_file(sd: dict[str, torch.Tensor], where: str) -> str:
    """The family ("sd1" / "sd2") of a whole SD text-to-image checkpoint in the original layout (real or
    "meta" tensors); for anything else an error that names what the file holds."""
    keys = list(sd)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    # Add-ons first: their keys name the layers they patch, so they can look like a model's.
    if any(part in k for k in keys for part in _LORA_PARTS):
        raise CheckpointError(f"{where}: this is a LoRA (low-rank weight patches for a model), not a model; "
                              "pass a whole model checkpoint (LoRA files are not supported yet)")
    if set(keys) <= _EMBEDDING_KEYS or has("string_to_param."):
        raise CheckpointError(f"{where}: this is a textual-inversion embedding, not a model; pass a whole model "
                              "checkpoint (embeddings are not supported yet)")
    for prefixes, what in _OTHER_MODELS:
        if has(*prefixes):
            raise unsupported(where, what)
    family = "sd2" if has(OPENCLIP_TEXT) else "sd1" if has(CLIP_TEXT) else None
    # Inpainting (9 input channels) and InstructPix2Pix (8) U-Nets load: the pipeline builds their conditioning
    # (inpaint.py, instruct.py) and names the others when asked to generate with them (conditioning.concat_family).
    if has(UNET) and has(VAE) and family:
        return family
    raise CheckpointError(f"{where}: {_partial(keys, has)}")


def _partial(keys: list[str], has) -> str:
    """What a file holds that is not a whole model: the parts it has, or the standalone network it is."""
    parts = [name for name, present in (("U-Net", has(UNET)), ("VAE", has(VAE)), ("text encoder", has(TEXT)))
             if present]
    if parts:
        missing = [name for name in ("U-Net", "VAE", "text encoder") if name not in parts]
        text = "" if has(CLIP_TEXT, OPENCLIP_TEXT) or not has(TEXT) else \
            f" (its text encoder keys, like {next(k for k in keys if k.startswith(TEXT))!r}, are neither CLIP's " \
            f"{CLIP_TEXT!r} nor OpenCLIP's {OPENCLIP_TEXT!r})"
        return (f"holds the {' and '.join(parts)} but no {' and no '.join(missing) or 'known text encoder'}{text}; "
                "a Stable Diffusion single file holds all three (U-Net, VAE, text encoder)")
    if has("encoder.", "decoder.") and has("quant_conv.", "post_quant_conv."):
        layout = "diffusers layout" if any(".down_blocks." in k for k in keys) else "original layout"
        return ("this is a standalone VAE (" + layout + "), not a whole model; pass a whole model checkpoint "
                "and this file as its VAE (--vae, or Pipeline.from_pretrained(..., vae=...))")
    if has("input_blocks.", "conv_in.", "down_blocks."):
        return ("this is a standalone U-Net, not a whole model; pass a whole single file, or the whole diffusers "
                "folder this file belongs to")
    if has("text_model.", "transformer.resblocks.", "embeddings."):
        return "this is a standalone text encoder, not a whole model; pass a whole model checkpoint"
    return (f"no Stable Diffusion weights recognised (keys like {keys[0]!r}); a single file holds the U-Net "
            f"({UNET}*), the VAE ({VAE}*) and the text encoder ({TEXT}*)")


def identify_diffusers_folder(model_index: dict, text_config: dict, where: str) -> str:
    """The family of a diffusers folder: other pipelines are refused by name; a StableDiffusionPipeline
    folder holds one CLIPTextModel, OpenAI's ViT-L (quick_gelu: SD 1.x) or OpenCLIP's converted (gelu: SD 2.x)."""
    cls = model_index.get("_class_name")
    if cls in DIFFUSERS_PIPELINES:
        raise unsupported(where, f"{DIFFUSERS_PIPELINES[cls]} (model_index.json: {cls})")
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


# Published text towers: (activation, width, heads, ff_width, vocabulary) -> name and their layer counts
# (SD 2.x diffusers folders drop OpenCLIP's last layer: 23 of 24).
_TEXT_TOWERS = {("quick_gelu", 768, 12, 3072, 49408): ("CLIP ViT-L/14 text", (12,)),
                ("gelu", 1024, 16, 4096, 49408): ("OpenCLIP ViT-H/14 text", (24, 23))}


def text_tower_name(cfg: TextEncoderConfig) -> str:
    """The published tower's name only when the config is that tower; else its plain size."""
    name, layers = _TEXT_TOWERS.get((cfg.activation, cfg.width, cfg.heads, cfg.ff_width, cfg.vocab_size), (None, ()))
    if name and cfg.layers in layers and cfg.max_length == 77:
        return f"{name} ({cfg.layers} layers, {cfg.width} wide)"
    return f"CLIP-style text encoder, {cfg.layers} layers x {cfg.width}"
