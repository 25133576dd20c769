"""Tiled VAE decode and encode: large images in overlapping tiles, blended, so memory stays flat.

The decoder's activations at full resolution (128 channels x H x W, several alive at once) dominate the
memory of a large decode; decoding latent tiles one at a time bounds them by the tile size. Each tile's
output is weighted by a ramp that rises across the overlap from every tile edge, and every output pixel
is the weighted mean of the tiles that cover it, so seams fade instead of cutting.

The result is close to, not equal to, an untiled decode: GroupNorm statistics and the mid-block
attention see one tile instead of the whole image, and pixels near a tile edge lose context (measured
on random-weight VAEs, the lost context dominates). A wide overlap (default half a tile) keeps the
weight of those edge pixels low; on the cases of tests/test_speedups.py this is 1-6 dB closer to the
untiled result than diffusers' tiling (a quarter-tile overlap, cropped seams) at the same tile size.
Tiles are laid out on the latent grid in both directions, so tile and overlap count latent pixels
(x8 in image pixels for SD).
"""

import torch

from .errors import FieldError, InputError
from .vae import AutoencoderKL, DiagonalGaussian

DEFAULT_TILE, DEFAULT_OVERLAP = 64, 32  # latent pixels: 512 px tiles overlapping by 256 px
AUTO_TILE_PIXELS = 1024 * 1024  # "auto" tiles images larger than this (see wants_tiling)
TILING_MODES = ("auto", "on", "off")


def check_tiling_mode(mode: str) -> str:
    if mode not in TILING_MODES:
        raise FieldError("vae_tiling", f"{mode!r}: choose one of {', '.join(TILING_MODES)}")
    return mode


def wants_tiling(mode: str, height: int, width: int) -> bool:
    """Whether to tile the VAE for an image of height x width pixels: "on", "off", or "auto", which tiles
    only above 1024x1024 px, where an untiled decode's activations pass several GiB (benchmarks/cpu.md)
    and tiling also shortens the mid-block attention's quadratic cost."""
    check_tiling_mode(mode)
    return mode == "on" or (mode == "auto" and height * width > AUTO_TILE_PIXELS)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering 0..size, neighbours sharing at least `overlap`."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last tile ends at the border (its overlap may be larger)


def ramp(length: int, overlap: int) -> torch.Tensor:
    """Blend weights along one tile side: rising linearly over `overlap` pixels from both ends, never 0
    (so a pixel that only one tile covers, at the image border, keeps its value after normalising)."""
    i = torch.arange(length, dtype=torch.float32)
    edge = torch.minimum(i + 0.5, length - i - 0.5)
    return (edge / max(overlap, 1)).clamp(max=1.0)


def _check(tile: int, overlap: int) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise InputError(f"VAE tiling: tile ({tile}) must be >= 1 and overlap ({overlap}) in 0..tile-1 "
                         f"(both in latent pixels, e.g. tile {DEFAULT_TILE}, overlap {DEFAULT_OVERLAP})")


def run_tiled(fn, x: torch.Tensor, *, tile: int, overlap: int, in_scale: int, out_scale: int) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x and blend the results (fp32, on x's device).

    Tiles are laid on a grid whose unit is `in_scale` pixels of x and `out_scale` pixels of fn's output
    (decode: 1 and 8, encode: 8 and 1); tile and overlap are counted in grid units."""
    _check(tile, overlap)
    rows_total, cols_total = x.shape[2] // in_scale, x.shape[3] // in_scale
    h, w = min(tile, rows_total), min(tile, cols_total)  # every tile has the same size
    mask = ramp(h * out_scale, overlap * out_scale)[:, None] * ramp(w * out_scale, overlap * out_scale)[None]
    out = weight = None
    for r in tile_starts(rows_total, tile, overlap):
        for c in tile_starts(cols_total, tile, overlap):
            piece = fn(x[:, :, r * in_scale:(r + h) * in_scale, c * in_scale:(c + w) * in_scale]).float()
            if out is None:
                out = piece.new_zeros(piece.shape[0], piece.shape[1], rows_total * out_scale, cols_total * out_scale)
                weight = piece.new_zeros(1, 1, *out.shape[2:])
                mask = mask.to(piece.device)
            rows, cols = slice(r * out_scale, (r + h) * out_scale), slice(c * out_scale, (c + w) * out_scale)
            out[:, :, rows, cols] += piece * mask
            weight[:, :, rows, cols] += mask
    return out / weight


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """vae.decode(z) tile by tile: unscaled latents -> fp32 images in about [-1, 1]."""
    f = vae.cfg.downsample_factor
    return run_tiled(vae.decode, z, tile=tile, overlap=overlap, in_scale=1, out_scale=f)


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> DiagonalGaussian:
    """vae.encode(x) tile by tile: the posterior's moments (mean, logvar) are blended, then split."""
    f = vae.cfg.downsample_factor
    if x.ndim != 4 or x.shape[2] % f or x.shape[3] % f:
        raise InputError(f"tiled_encode: expected images (batch, channels, H, W) with H and W multiples of {f}, "
                         f"got {tuple(x.shape)}; resize or crop the image first")

    def moments(piece: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(piece)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    return DiagonalGaussian(run_tiled(moments, x, tile=tile, overlap=overlap, in_scale=f, out_scale=1))
