"""The whole Stable Diffusion model as one module whose state dict IS an original single-file checkpoint.

The attribute names mirror the CompVis/ldm checkpoint: `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder), so `state_dict()` writes and
`load_state_dict()` reads the original layout with no mapping table.
"""

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


class _SkipInitialisers(TorchFunctionMode):
    """torch.nn.init's functions and the in-place random fills return their tensor untouched. On the meta
    device they compute nothing anyway, but a meta normal_ runs through torch._refs, whose first call
    imports torch._dynamo: ~1.8 s of the CLI's start-up (benchmarks/startup.md)."""

    FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # nn.init passes its tensor by name
        return func(*args, **(kwargs or {}))


def build_on_meta(config: ModelConfig, tokenizer: Tokenizer | None = None) -> StableDiffusion:
    """An empty model whose tensors are materialised by a strict load with assign=True.

    Building on the meta device skips random initialisation (seconds for SD size) and allocates no
    memory that the checkpoint's own tensors would then duplicate; the initialisers are skipped too
    (_SkipInitialisers): meta tensors hold no values for them to set.
    """
    with torch.device("meta"), _SkipInitialisers():
        return StableDiffusion(config, tokenizer)
