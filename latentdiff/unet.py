"""The Stable Diffusion U-Net: predicts the noise (eps) or velocity (v) in a latent at timestep t.

Module names equal the original CompVis/ldm checkpoint keys with `model.diffusion_model.` stripped,
index positions included, so a single-file checkpoint loads with one strict `load_state_dict`.
Slots that hold no weights in ldm (SiLU, dropout) are kept as parameter-free modules so that the
weighted layers keep their checkpoint index (e.g. `out_layers.3` is the second conv).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Control
from .config import UNetConfig
from .errors import InputError
from .layers import GroupNorm32, attention, from_tokens, group_norm, timestep_embedding, to_tokens


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between; 1x1 skip conv when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Identity(),  # ldm's dropout slot
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from `dim`-wide queries to `context_dim`-wide keys/values (self-attention when
    no context is given). q/k/v have no bias in ldm."""

    qkv_names = ("to_q", "to_k", "to_v")  # the projections speedups.fuse_projections fuses into `qkv`

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.chunk: int | None = None  # query block size of sliced attention (speedups.set_attention_slicing)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # ldm's to_out.1 (dropout) holds no weights
        self.qkv = None  # speedups.fuse_projections: q, k, v in one matmul when attending to x itself

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None and self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(attention(q, k, v, self.heads, upcast=self.upcast, chunk=self.chunk))


class GEGLU(nn.Module):
    """Gated GELU: one projection yields a value half and a gate half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # net.1: dropout slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, then a GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map as tokens, as a residual.

    SD 1.x projects in/out with 1x1 convs (before flattening), SD 2.x with Linear layers (after): the
    same map, but the checkpoints store different weight shapes."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool, upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = to_tokens(h)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = from_tokens(h, like=x)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepBlock(nn.Sequential):
    """One ldm block (`input_blocks.N`, ...): a sequence whose layers each take what they need."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Down path (input_blocks), middle_block, up path (output_blocks) joined by skip concatenation.

    Build it under `with torch.device("meta"):` and load with `assign=True` to skip the random init."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        base, emb_ch, last = cfg.model_channels, 4 * cfg.model_channels, len(cfg.channel_mult) - 1

        def transformer(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads_at(ch), cfg.depth_at(level), cfg.context_dim,
                                      cfg.use_linear_projection, cfg.upcast_attention)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # Down path. `skips` records the width of every block output, consumed in reverse on the way up.
        self.input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, base, 3, padding=1))])
        ch, skips = base, [base]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, base * mult)]
                ch = base * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepBlock(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                skips.append(ch)

        # SD always attends at the lowest resolution, whatever attention_levels says.
        self.middle_block = TimestepBlock(ResBlock(ch, emb_ch, ch), transformer(ch, last), ResBlock(ch, emb_ch, ch))

        # Up path: one more block per level than on the way down, so every skip is consumed.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_ch, base * mult)]
                ch = base * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                control: Control | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents (and conditioning channels); t: (B,) or scalar timesteps,
        fractional allowed; context: (B, tokens, context_dim); control: ControlNet residuals, one per
        input block output (added to its skip connection) and one for the middle block's output.
        Returns eps or v, shaped like the latents (out_channels)."""
        self._check_inputs(x, t, context)
        if y is not None:
            raise InputError("UNet: got a vector conditioning y, but this U-Net has no label embedding to take it "
                             "(SD 1.x/2.x text-to-image U-Nets are conditioned on the context only)")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        context = context.to(dtype)
        h, skips = x.to(dtype), []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h, skips = self._add_control(control, h, skips)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _add_control(self, control: Control, h: torch.Tensor, skips: list) -> tuple[torch.Tensor, list]:
        """The middle block's output and the skips with ControlNet's residuals added."""
        if len(control.skips) != len(skips):
            raise InputError(f"UNet control: {len(control.skips)} skip residuals for {len(skips)} input blocks; "
                             f"is the ControlNet built for this U-Net?")
        return h + control.middle.to(h.dtype), [s + r.to(s.dtype) for s, r in zip(skips, control.skips)]

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        cfg, factor = self.cfg, 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(f"UNet input x: expected shape (batch, {cfg.in_channels}, height, width), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise InputError(f"UNet input x: latent size {x.shape[2]}x{x.shape[3]} must be divisible by {factor} "
                             f"(image size by {8 * factor} with the usual VAE); pick another width/height")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise InputError(f"UNet context: expected shape ({x.shape[0]}, tokens, {cfg.context_dim}), got "
                             f"{tuple(context.shape)}; is the text encoder the one this U-Net was trained with?")
        if torch.as_tensor(t).numel() not in (1, x.shape[0]):
            raise InputError(f"UNet timestep t: expected a scalar or {x.shape[0]} values (one per batch item), "
                             f"got shape {tuple(torch.as_tensor(t).shape)}")
