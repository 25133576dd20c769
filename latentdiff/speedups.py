"""Speed-ups that change how the networks run, not what they compute: memory layout, pre-packed
convolutions, fused projections, sliced attention, the guarded torch.compile. Each is a switch on a model,
decided at run time; nothing here runs at import.

What is on by default (measured on CPU, see benchmarks/cpu.md): SDPA attention everywhere
(layers.attention), classifier-free guidance as one batched U-Net call (denoisers.CFGDenoiser), bf16
weights with channels_last and pre-packed convolutions on CPUs with native bf16 matmuls (AMX /
AVX512-BF16; the dtype choice is devices.default_dtype), fp16 and fused q/k/v projections on CUDA. Off by
default, for the cases that need them: sliced attention (a backend without fused SDPA kernels), tiled VAE
(latentdiff.tiling; very large images), torch.compile (pays minutes up front). Threads: latentdiff.threads;
memory: latentdiff.memory.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FieldError, LatentDiffError

log = logging.getLogger("latentdiff")


def prefers_channels_last(device: torch.device | str, dtype: torch.dtype) -> bool:
    """NHWC convolutions: measured 10-20% faster U-Net steps and 1.5-2x faster VAE decodes in bf16 on CPU
    (oneDNN's bf16 kernels are NHWC), but ~7% slower in fp32, so only CPU bf16 uses them (with the weights
    pre-packed, prepack_convolutions)."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def set_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convolution weights in channels_last (or back to contiguous). Activations follow the weights: a
    convolution with channels_last weights returns channels_last output. The state dict is unchanged."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def weight_source(w: torch.Tensor) -> tuple:
    """What a derived copy of weight `w` was made from: a new tensor, a dtype change or an in-place update
    changes it, so a cached copy knows when to be redone."""
    return w.data_ptr(), w.dtype, None if w.is_inference() else w._version


class PackedConv2d:
    """A Conv2d's forward with its weight kept in oneDNN's blocked layout. PyTorch's eager convolution
    reorders the weight into that layout on every call: for SD's 1280-channel layers at small latent sizes
    the reorder costs as much as the convolution (a bf16 U-Net step at 256 px: ~30% of its time, measured
    in benchmarks/cpu.md). Same numbers: bit for bit on the AMX machines; on an AMD EPYC fp32 1x1
    convolutions differ in the last bit, as oneDNN picks another algorithm for the eager call. The packed
    copy is redone when the weight changes (new tensor, in-place update, dtype); with gradients on, the
    plain convolution runs."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self.packed_from = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, w = self.conv, self.conv.weight
        if torch.is_grad_enabled():
            return conv._conv_forward(x, w, conv.bias)
        geometry = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups
        if weight_source(w) != self.packed_from:
            self.packed = torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape))
            self.packed_from = weight_source(w)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, conv.bias, *geometry, "none", [], "")


def prepack_convolutions(model: nn.Module, enable: bool) -> int:
    """Keep every zero-padded Conv2d's weight pre-reordered for oneDNN (see PackedConv2d), or undo that.
    Costs one extra copy of the convolution weights in memory. Only where PyTorch's oneDNN ops exist; returns
    how many convolutions are packed."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d and m.padding_mode == "zeros"
             and not isinstance(m.padding, str)]
    enable = enable and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    for conv in convs:
        if enable:
            conv.forward = PackedConv2d(conv)
        else:
            conv.__dict__.pop("forward", None)
    return len(convs) if enable else 0


class FusedLinear:
    """Linear layers that read the same input (the q, k and v projections of a self-attention) as one matmul
    over their concatenated weights, returning one output per layer: one GEMM launch instead of three. The
    layers' own weights are rebound as slices of the concatenation, so there is no second copy; a weight
    that changes (dtype, device, in-place update) is re-concatenated on the next call. Under autograd the
    weights are concatenated per call, so gradients reach each layer's own parameters."""

    def __init__(self, layers: list[nn.Linear]):
        if len({layer.bias is None for layer in layers}) > 1:
            raise LatentDiffError("FusedLinear: the fused layers must all have biases or none")
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.made_from = None

    def _params(self, name: str) -> list[torch.Tensor]:
        return [getattr(layer, name) for layer in self.layers if getattr(layer, name) is not None]

    def _sources(self) -> list[tuple]:
        return [weight_source(t) for t in self._params("weight") + self._params("bias")]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled():
            biases = self._params("bias")
            out = F.linear(x, torch.cat(self._params("weight")), torch.cat(biases) if biases else None)
            return out.split(self.sizes, dim=-1)
        if self._sources() != self.made_from:
            for name in ("weight", "bias"):
                params = self._params(name)
                whole = torch.cat(params) if params else None
                for param, part in zip(params, whole.split(self.sizes) if params else ()):
                    param.data = part  # the layer's weight becomes a view of the concatenation
                setattr(self, name, whole)
            self.made_from = self._sources()  # read again: the rebinding gave the weights new data pointers
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def fuse_projections(model: nn.Module, enable: bool) -> int:
    """Give every attention layer of `model` whose q, k and v projections read inputs of one width (U-Net
    attention, CLIP text layers) a FusedLinear of them as `qkv`, which its forward uses when it attends to
    its input itself; `enable=False` removes them. Weight values and state-dict keys stay as they are.
    On by default on CUDA (three kernel launches become one; its own effect there is not measured), off
    on CPU: in bf16 two benchmark runs disagreed on its sign (7% faster per step in one, 8% slower in the
    other), in fp32 it measured ~5% slower with a higher peak RSS (benchmarks/cpu.md). Returns how many
    layers were fused."""
    fused = 0
    for module in model.modules():
        layers = [getattr(module, name) for name in getattr(module, "qkv_names", ())]
        if layers and len({layer.in_features for layer in layers}) == 1:
            module.qkv = FusedLinear(layers) if enable else None
            fused += enable
    return fused


def set_attention_slicing(model: nn.Module, chunk: int | None) -> int:
    """Sliced attention (query blocks of `chunk` tokens; None: off) in every attention layer of `model` that
    supports it (U-Net and VAE). Returns how many layers were set."""
    if chunk is not None and chunk < 1:
        raise FieldError("attention_slice", f"{chunk}: must be a positive number of query tokens (e.g. 1024)")
    layers = [m for m in model.modules() if hasattr(m, "chunk")]
    for layer in layers:
        layer.chunk = chunk
    return len(layers)


class CompiledOrEager:
    """`torch.compile(module)` that falls back to the plain module when compiling fails (no C++ compiler,
    an unsupported op, no Triton for this GPU): logged once, never fatal. Our own errors (bad input) pass
    through untouched. `mode="reduce-overhead"` adds CUDA-graph capture on CUDA, for fixed shapes."""

    def __init__(self, module: nn.Module, mode: str | None = None):
        self.module = module
        self.compiled = torch.compile(module, mode=mode, dynamic=False)
        self.fallback_reason: str | None = None

    def __call__(self, *args, **kwargs):
        if self.fallback_reason is None:
            try:
                return self.compiled(*args, **kwargs)
            except LatentDiffError:
                raise
            except Exception as e:  # compiler failures have many types (BackendCompilerFailed, OSError, ...)
                self.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("torch.compile failed, running eagerly: %s", self.fallback_reason)
        return self.module(*args, **kwargs)


def compile_unet(unet: nn.Module, device: torch.device | str, mode: str | None = None):
    """The U-Net as called per sampling step, compiled if possible. CUDA defaults to "reduce-overhead"
    (CUDA graphs: one launch per step instead of ~1000 kernels), elsewhere to inductor's default."""
    if mode is None:
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    return CompiledOrEager(unet, mode)
