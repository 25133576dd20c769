"""Primitives shared by the networks: timestep embedding, group norm, attention dispatch."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in ldm and diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 for fp16 activations, whose statistics overflow. bf16 has fp32's exponent
    range and PyTorch's kernels accumulate its statistics in fp32, so it runs natively: the round trip
    through fp32 cost ~25% of a bf16 VAE decode on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) feature map -> (b, h * w, c) tokens: a free view when x is channels_last, a copy otherwise."""
    b, c, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, height * width, c)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b, h * w, c) tokens -> a (b, c, h, w) map shaped and laid out like `like`: channels_last strides
    come free, and an NCHW model gets a contiguous map, since convolutions fed NHWC strides there switch to
    slower kernels."""
    b, c, height, width = like.shape
    x = tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)
    return x.contiguous() if like.is_contiguous() else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, causal: bool = False,
              upcast: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Multi-head attention over (batch, tokens, heads * dim) tensors through SDPA.

    `upcast` computes in fp32 (SD 2.x-v overflows in fp16 otherwise) and casts the result back.
    `chunk` (sliced attention) runs the queries in blocks of that many tokens, each against all keys: the
    same numbers, but a backend that materialises the scores holds (heads, chunk, keys) of them at a time
    instead of (heads, queries, keys). CPU and CUDA's fused SDPA kernels need no slicing; the math
    fallback (16384 tokens at 1024 px: 1 GiB of fp32 scores per head and image) does.
    """
    if chunk is not None and chunk < 1:
        raise InputError(f"attention chunk must be a positive number of query tokens, not {chunk}")
    b, n, inner = q.shape
    dtype = q.dtype
    q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if chunk is None or chunk >= n:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = torch.cat([_query_block(q, k, v, start, chunk, causal) for start in range(0, n, chunk)], dim=2)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def _query_block(q, k, v, start: int, chunk: int, causal: bool) -> torch.Tensor:
    block = q[:, :, start:start + chunk]
    # SDPA's is_causal aligns the mask to the top-left corner, which is wrong for a block that starts at
    # `start`: query start + i may see keys 0 .. start + i.
    mask = None
    if causal:
        mask = torch.ones(block.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(block, k, v, attn_mask=mask)
