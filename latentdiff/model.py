"""The whole Stable Diffusion model as one module whose state dict IS an original single-file checkpoint.

The attribute names mirror the CompVis/ldm checkpoint: `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder), so `state_dict()` writes and
`load_state_dict()` reads the original layout with no mapping table.
"""

import torch
from torch import nn

from .clip import TextEncoder, Tokenizer
from .config import ModelConfig
from .unet import UNet
from .vae import AutoencoderKL


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict({"diffusion_model": UNet(config.unet)})
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = TextEncoder(config.text)
        self.tokenizer = tokenizer or Tokenizer(pad_id=config.text.pad_id, max_length=config.text.max_length)

    @property
    def unet(self) -> UNet:
        return self.model["diffusion_model"]

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in part.parameters())
                for name, part in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))}


def build_on_meta(config: ModelConfig, tokenizer: Tokenizer | None = None) -> StableDiffusion:
    """An empty model whose tensors are materialised by a strict load with assign=True.

    Building on the meta device skips random initialisation (seconds for SD size) and allocates no
    memory that the checkpoint's own tensors would then duplicate.
    """
    with torch.device("meta"):
        return StableDiffusion(config, tokenizer)
