"""Stage 1: the KL autoencoder, trained to reconstruct images through a slightly noisy latent bottleneck.

The loss is ldm's without its two pretrained parts (no LPIPS network, no discriminator, neither of which
exists offline): L1 on pixels plus a small KL pull toward N(0, 1), and, standing in for the perceptual
terms that keep SD's outlines sharp, an L1 on the pixel differences across the image's edges.

- The pixel L1 is balanced between each image's background and the rest: with plain L1 a shape covering
  5-20 % of the picture weighs so little that the measured autoencoder settled on perfect backgrounds and
  no shapes at all.
- The edge L1 counts only the pixels where the image steps from one colour to another, so an outline of a
  few dozen pixels weighs as much as the whole picture. Without it, measured (weights/README.md), small
  stars, crosses and diamonds came back as round blobs and the autoencoder kept the shape in 75-80 % of
  reconstructions whatever the steps or learning rate; with it, 98 %. (An L1 on the differences of all
  pixels, tried earlier, slowed early training several-fold: nearly all of them are flat background.)
"""

import math

import torch
from torch import nn

from ..errors import InputError
from ..vae import AutoencoderKL
from .loop import Stage, StageRecipe, draw_images


def _per_image_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `error` over each image's pixels where `mask` is 1: one value per image."""
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def balanced_l1(recon: torch.Tensor, images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Mean absolute error, per image half from the pixels within `threshold` of the image's median colour
    (the background of a shapes image) and half from the others (the shape and its anti-aliased rim), then
    averaged over images. Per image rather than pooled over the batch, so that a small shape weighs as much
    as a big one."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    shape = ((images - median).abs().amax(dim=1, keepdim=True) > threshold).float()
    error = (recon - images).abs().mean(dim=1, keepdim=True)
    return ((_per_image_mean(error, shape) + _per_image_mean(error, 1 - shape)) / 2).mean()


def edge_l1(recon: torch.Tensor, images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Mean absolute error of the differences between neighbouring pixels, horizontal and vertical, over
    the places where the image has an edge (a step of more than `threshold` in some channel), per image."""
    terms = []
    for dim in (2, 3):
        target, made = images.diff(dim=dim), recon.diff(dim=dim)
        edge = (target.abs().amax(dim=1, keepdim=True) > threshold).float()
        terms.append(_per_image_mean((made - target).abs().mean(dim=1, keepdim=True), edge))
    return ((terms[0] + terms[1]) / 2).mean()


class AutoencoderLoss(nn.Module):
    """forward(batch) -> (loss, parts). `kl_weight` follows ldm's convention: the weight of the per-image
    KL sum against the per-image sum of absolute pixel errors (SD used 1e-6); `edge_weight` that of the
    edge L1 against the balanced pixel L1."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, edge_weight: float):
        super().__init__()
        self.vae, self.kl_weight, self.edge_weight = vae, kl_weight, edge_weight

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["images"]
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * batch["noise"]  # the posterior sample, noise drawn by the loop
        recon = self.vae.decode(z).float()
        kl = posterior.kl().float().mean()
        edges = edge_l1(recon, images)
        loss = balanced_l1(recon, images) + self.edge_weight * edges + self.kl_weight * kl / images[0].numel()
        return loss, {"l1": (recon - images).abs().mean().detach(), "edge": edges.detach(), "kl": kl}


def init_posterior_std(vae: AutoencoderKL, std: float) -> None:
    """Start the posterior at a small std. A fresh encoder outputs logvar ~ 0 (std ~ 1, the prior's): the
    decoder then sees mostly noise and learns only the mean colour until the encoder, pushed by nothing but
    the reconstruction gradient (the KL weight is tiny), has shrunk it, which takes thousands of steps."""
    with torch.no_grad():
        vae.quant_conv.bias[vae.cfg.latent_channels:] = 2 * math.log(std)  # the logvar half of the moments


def autoencoder_stage(vae: AutoencoderKL, recipe: StageRecipe, *, seed: int, image_size: int, low_res: int,
                      low_res_steps: int, kl_weight: float, edge_weight: float) -> Stage:
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

    return Stage("vae", AutoencoderLoss(vae, kl_weight, edge_weight), make_batch, recipe)


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
