"""The KL autoencoder: images in [-1, 1] <-> latents (4 x H/8 x W/8 for SD).

Module names are the original ldm checkpoint keys with `first_stage_model.` stripped, so a real SD VAE
loads with one strict `load_state_dict`. The latent scale (0.18215 for SD) is the pipeline's business:
`decode` takes unscaled latents and `encode` returns the unscaled posterior.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .errors import InputError
from .layers import attention, from_tokens, group_norm, to_tokens

NORM_EPS = 1e-6  # the autoencoder's GroupNorm eps (the U-Net uses 1e-5)


def resnet_channels(cfg: VAEConfig, part: str) -> list[list[tuple[int, int]]]:
    """(in, out) channels of every ResnetBlock, per resolution level (0 = full resolution).

    The encoder enters level i with the previous level's width and has `num_res_blocks` blocks there; the
    decoder walks the levels from the lowest resolution up, entering level i with level i+1's width, and
    has one block more per level. A block whose in and out differ carries a 1x1 `nin_shortcut`.
    """
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    if part == "encoder":
        entries, count = [cfg.base_channels] + widths[:-1], cfg.num_res_blocks
    elif part == "decoder":
        entries, count = widths[1:] + widths[-1:], cfg.num_res_blocks + 1
    else:
        raise InputError(f"resnet_channels: part must be 'encoder' or 'decoder', not {part!r}")
    return [[(entry if j == 0 else width, width) for j in range(count)] for entry, width in zip(entries, widths)]


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), split from 2 * latent_channels moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # ldm's clamp: keeps exp() finite for degenerate channels.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn on the generator's device so a seed gives the same latents whatever device the VAE runs on.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over channels and pixels: one value per image."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, eps=NORM_EPS)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels, eps=NORM_EPS)
        self.conv2 = conv3x3(out_channels, out_channels)
        # Identity has no weights, so the key exists only where the checkpoint has it.
        same = in_channels == out_channels
        self.nin_shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, projections as 1x1 convs (ldm's layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels, eps=NORM_EPS)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        self.chunk: int | None = None  # query block size of sliced attention (speedups.set_attention_slicing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (to_tokens(proj(h)) for proj in (self.q, self.k, self.v))
        return x + self.proj_out(from_tokens(attention(q, k, v, heads=1, chunk=self.chunk), like=x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ldm pads right and bottom only, so the stride-2 windows start at the top-left pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks, then halve the size unless it is the last level."""

    def __init__(self, channels: list[tuple[int, int]], downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in channels)
        self.downsample = Downsample(channels[-1][1]) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks, then double the size unless it is full resolution."""

    def __init__(self, channels: list[tuple[int, int]], upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in channels)
        self.upsample = Upsample(channels[-1][1]) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = resnet_channels(cfg, "encoder")
        last = len(levels) - 1
        width = levels[-1][-1][1]
        self.conv_in = conv3x3(cfg.in_channels, cfg.base_channels)
        self.down = nn.ModuleList(DownLevel(blocks, downsample=i < last) for i, blocks in enumerate(levels))
        self.mid = MidBlock(width)
        self.norm_out = group_norm(width, eps=NORM_EPS)
        self.conv_out = conv3x3(width, 2 * cfg.latent_channels)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        levels = resnet_channels(cfg, "decoder")
        width_in, width_out = levels[-1][0][0], levels[0][-1][1]
        self.conv_in = conv3x3(cfg.latent_channels, width_in)
        self.mid = MidBlock(width_in)
        # Indexed by resolution level as in ldm (up.0 is full resolution), run from the last one.
        self.up = nn.ModuleList(UpLevel(blocks, upsample=i > 0) for i, blocks in enumerate(levels))
        self.norm_out = group_norm(width_out, eps=NORM_EPS)
        self.conv_out = conv3x3(width_out, cfg.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (batch, in_channels, H, W) in [-1, 1], H and W multiples of the downsample factor."""
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise InputError(f"AutoencoderKL.encode: expected images of shape (batch, {self.cfg.in_channels}, "
                             f"height, width), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise InputError(f"AutoencoderKL.encode: image size {x.shape[3]}x{x.shape[2]} is not a multiple of "
                             f"{f}; resize or crop it to a multiple of {f} first")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (batch, latent_channels, h, w) -> images in about [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise InputError(f"AutoencoderKL.decode: expected latents of shape (batch, {self.cfg.latent_channels},"
                             f" height, width), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
