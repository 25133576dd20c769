"""Stage 1: the KL autoencoder, trained to reconstruct images through a slightly noisy latent bottleneck.

The loss is ldm's without its two pretrained parts (no LPIPS network, no discriminator, neither of which
exists offline): L1 on pixels plus a small KL pull toward N(0, 1). The L1 is balanced between each image's
background and the rest: with plain L1 a shape covering 5-20 % of the picture weighs so little that the
measured autoencoder settled on perfect backgrounds and no shapes at all. (An L1 on pixel differences, to
sharpen outlines, was measured to slow early training several-fold and was dropped.)
"""

import math

import torch
from torch import nn

from ..errors import InputError
from ..vae import AutoencoderKL
from .loop import Stage, StageRecipe, draw_images


def balanced_l1(recon: torch.Tensor, images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Mean absolute error, half from the pixels within `threshold` of their image's median colour (the
    background of a shapes image), half from the others (the shape and its anti-aliased rim)."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    shape = ((images - median).abs().amax(dim=1, keepdim=True) > threshold).float()
    error = (recon - images).abs().mean(dim=1, keepdim=True)
    on_shape = (error * shape).sum() / shape.sum().clamp(min=1)
    off_shape = (error * (1 - shape)).sum() / (1 - shape).sum().clamp(min=1)
    return (on_shape + off_shape) / 2


class AutoencoderLoss(nn.Module):
    """forward(batch) -> (loss, parts). `kl_weight` follows ldm's convention: the weight of the per-image
    KL sum against the per-image sum of absolute pixel errors (SD used 1e-6)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["images"]
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * batch["noise"]  # the posterior sample, noise drawn by the loop
        recon = self.vae.decode(z).float()
        kl = posterior.kl().float().mean()
        loss = balanced_l1(recon, images) + self.kl_weight * kl / images[0].numel()  # per pixel, as the L1
        return loss, {"l1": (recon - images).abs().mean().detach(), "kl": kl}


def init_posterior_std(vae: AutoencoderKL, std: float) -> None:
    """Start the posterior at a small std. A fresh encoder outputs logvar ~ 0 (std ~ 1, the prior's): the
    decoder then sees mostly noise and learns only the mean colour until the encoder, pushed by nothing but
    the reconstruction gradient (the KL weight is tiny), has shrunk it, which takes thousands of steps."""
    with torch.no_grad():
        vae.quant_conv.bias[vae.cfg.latent_channels:] = 2 * math.log(std)  # the logvar half of the moments


def autoencoder_stage(vae: AutoencoderKL, recipe: StageRecipe, *, seed: int, image_size: int, low_res: int,
                      low_res_steps: int, kl_weight: float) -> Stage:
    """The first `low_res_steps` steps see the images rendered at `low_res` pixels, the rest at full size.

    Progressive resizing: at a quarter of the pixels a step costs a quarter and, measured, learns at least
    as fast (flat colours first, then outlines), and the weights carry over since the networks are
    convolutional and GroupNorm statistics of a smaller rendering of the same scene are alike. (Random
    crops, SD's way, do not carry over here: a crop's GroupNorm statistics differ from the whole image's,
    and a model trained on 32 px crops reconstructed whole images with twice the error.)
    """
    f, channels = vae.cfg.downsample_factor, vae.cfg.latent_channels
    if low_res_steps and (low_res % f or not 0 < low_res <= image_size):
        raise InputError(f"vae_low_res={low_res}: use a multiple of {f} up to the model's {image_size} px")

    def make_batch(step: int, first: int, count: int, generator: torch.Generator) -> dict:
        size = low_res if step < low_res_steps else image_size
        images, _, _ = draw_images(seed, first, count, size)
        noise = torch.randn(count, channels, size // f, size // f, generator=generator)
        return {"images": images, "noise": noise}

    return Stage("vae", AutoencoderLoss(vae, kl_weight), make_batch, recipe)


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, *, seed: int, image_size: int, count: int, device) -> float:
    """Standard deviation of posterior samples over `count` training images: the latent scale is its
    inverse, so that diffusion sees latents of about unit variance (SD measured 1 / 0.18215)."""
    images, _, _ = draw_images(seed, 0, count, image_size)
    generator = torch.Generator().manual_seed(seed)
    vae = vae.eval()
    samples = []
    for chunk in images.split(64):
        posterior = vae.encode(chunk.to(device))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        samples.append((posterior.mean + posterior.std * noise).float().cpu())
    return torch.cat(samples).std().item()
