"""InstructPix2Pix (Brooks et al. 2023): a U-Net conditioned on an input image that follows edit instructions.

Its U-Net has 8 input channels: the noisy latents and the input image's latents, which are the mode of the
VAE posterior NOT multiplied by the latent scale (the model was trained on them so; diffusers'
StableDiffusionInstructPix2PixPipeline and A1111 feed them the same way). Guidance is three-way: the
instruction is guided against the image alone with `cfg_scale`, the image against nothing with
`image_cfg_scale` (the paper's s_T and s_I; A1111's "Image CFG scale", default 1.5).

The checkpoint's shape decides: `img2img` with an 8-channel model is an InstructPix2Pix edit, as in A1111,
so prompts files, PNG replay and the request need no new mode; the init image is still the SDEdit start at
`strength` (1.0: from noise, as the paper samples).
"""

import dataclasses

import torch

from .conditioning import Cond
from .errors import FieldError

EXTRA_CHANNELS = 4  # the image latents beside the 4 latent channels
DEFAULT_IMAGE_CFG_SCALE = 1.5  # diffusers' and A1111's default


def is_instruct_model(config) -> bool:
    return config.unet.in_channels - config.unet.out_channels == EXTRA_CHANNELS


def check_request(request, config) -> float | None:
    """The image CFG scale a request runs with on a model: the default on an InstructPix2Pix model, None
    on others (where setting it is an error), and the image an InstructPix2Pix model needs."""
    if not is_instruct_model(config):
        if request.image_cfg_scale is not None:
            raise FieldError("image_cfg_scale", "is for InstructPix2Pix checkpoints (8-channel U-Nets); this model "
                                                f"has {config.unet.in_channels} input channels: leave it out")
        return None
    if request.init_image is None:
        raise FieldError("init_image", "is required: this is an InstructPix2Pix checkpoint, which edits an image "
                                       "(latentdiff img2img --init-image IMAGE \"instruction\")")
    return DEFAULT_IMAGE_CFG_SCALE if request.image_cfg_scale is None else request.image_cfg_scale


def needs_uncond(cfg_scale: float, image_cfg_scale: float | None) -> bool:
    """Whether guidance needs the unconditional text features: any scale other than 1 does."""
    return cfg_scale != 1.0 or image_cfg_scale not in (None, 1.0)


def image_latents(posterior) -> torch.Tensor:
    """The conditioning latents of an image's VAE posterior: its mode, unscaled."""
    return posterior.mode().float()


def with_image(cond: Cond | None, latents: torch.Tensor) -> Cond | None:
    return None if cond is None else dataclasses.replace(cond, concat=latents)
