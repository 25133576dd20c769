"""Tiny Stable Diffusion models for pipeline, parity and CLI tests: SD 1.x-style and SD 2.x v-style.

The layout is SD's (8x VAE, two U-Net levels with cross-attention, CLIP text tower) at a few channels, so
a 64x64 image is an 8x8 latent and a whole generation takes well under a second on one CPU thread.
"""

import dataclasses

import torch

from latentdiff.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from latentdiff.model import StableDiffusion

# 32 channels everywhere: GroupNorm32 needs multiples of 32; four VAE levels give SD's 8x downsampling.
_VAE = VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)

SD1 = ModelConfig(
    name="tiny-sd1",
    text=TextEncoderConfig(width=32, layers=2, heads=2, ff_width=64),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    num_heads=2, context_dim=32),
    vae=_VAE, resolution=64)

SD2_V = ModelConfig(
    name="tiny-sd2-v", family="sd2",
    text=TextEncoderConfig(width=32, layers=3, heads=2, ff_width=64, activation="gelu", output_layer=-2, pad_id=0),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    num_heads=None, head_dim=16, context_dim=32, use_linear_projection=True,
                    upcast_attention=True),
    vae=_VAE, prediction="v", resolution=64)


def with_inputs(config: ModelConfig, in_channels: int) -> ModelConfig:
    """`config` with a U-Net of `in_channels` inputs: 8 is InstructPix2Pix's (latents + image latents)."""
    return dataclasses.replace(config, name=f"{config.name}-{in_channels}ch",
                               unet=dataclasses.replace(config.unet, in_channels=in_channels))


def tiny_model(config: ModelConfig, seed: int = 0) -> StableDiffusion:
    """PyTorch's default initialisation, seeded: unlike all-N(0, 0.2) weights it keeps the decoded images
    away from saturation, so pixel comparisons see real gradations rather than mostly 0 and 255."""
    torch.manual_seed(seed)
    return StableDiffusion(config).eval().requires_grad_(False)


def inpainting_config(config: ModelConfig) -> ModelConfig:
    """The same tiny model with an inpainting U-Net: 9 inputs (latents, mask, masked-image latents)."""
    return dataclasses.replace(config, name=config.name + "-inpainting",
                               unet=dataclasses.replace(config.unet, in_channels=9))
