"""Speed-ups: sliced attention, memory layout, packed convolutions, fused projections, tiled VAE, the
guarded compile, no host syncs in the sampling loop, the speed flags through the Pipeline and the CLI, the
side-by-side benchmark's smoke run and the CPU ceiling tool."""

import json
import logging
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersVAE
from PIL import Image
from tiny import SD1, tiny_model
from torch.overrides import TorchFunctionMode

from latentdiff import pipeline, sampling, speedups
from latentdiff.cli import main
from latentdiff.config import UNetConfig, VAEConfig, preset
from latentdiff.denoisers import CFGDenoiser, DiscreteDenoiser
from latentdiff.errors import InputError
from latentdiff.formats.vae_keys import vae_config_to_diffusers, vae_to_diffusers
from latentdiff.layers import GroupNorm32, attention
from latentdiff.loader import save_model
from latentdiff.schedules import alphas_cumprod_for, make_sigmas
from latentdiff.tiling import run_tiled, tile_starts, tiled_decode, tiled_encode, wants_tiling
from latentdiff.unet import UNet
from latentdiff.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
# Slicing splits the queries into blocks; each query row's softmax is computed exactly as unsliced, so only
# SDPA's internal blocking can differ: fp32 rounding, far below the 1e-4 activation tolerance.
SLICE_TOL = 1e-5
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=4, context_dim=16)
ONE_LEVEL_UNET = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                            num_heads=4, context_dim=16)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one thread is faster, and on a busy CPU two OpenMP threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY_VAE).eval().requires_grad_(False)
    for p in vae.parameters():  # every tensor random (no zero-init output conv), O(1) activations
        p.copy_(torch.randn_like(p) * 0.2)
    return vae


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2), after clamping as the pipeline does."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().item()
    return 10 * math.log10(peak**2 / mse)


# -- sliced attention -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 32, 70, 500])
def test_sliced_attention_equals_unsliced(chunk, causal):
    q, k, v = randn(2, 70, 32, seed=1), randn(2, 70, 32, seed=2), randn(2, 70, 32, seed=3)
    full = attention(q, k, v, heads=4, causal=causal)
    sliced = attention(q, k, v, heads=4, causal=causal, chunk=chunk)
    assert (sliced - full).abs().max().item() <= SLICE_TOL


def test_sliced_cross_attention_with_upcast():
    q, kv = randn(1, 64, 16, seed=1).half(), randn(1, 77, 16, seed=2).half()  # queries attend to 77 tokens
    full = attention(q, kv, kv, heads=2, upcast=True)
    sliced = attention(q, kv, kv, heads=2, upcast=True, chunk=10)
    assert sliced.dtype == torch.float16
    assert (sliced.float() - full.float()).abs().max().item() <= 1e-3  # fp16 output rounding: 2^-11 relative


def test_attention_slicing_in_the_networks():
    torch.manual_seed(0)
    unet, vae = UNet(TINY_UNET).eval(), random_vae()
    x, t, ctx, z = randn(2, 4, 16, 16), torch.tensor([999.0, 10.5]), randn(2, 77, 16, seed=1), randn(1, 4, 8, 8)
    with torch.no_grad():
        before = unet(x, t, ctx), vae.decode(z)
        # 7 transformers (2 down, 1 middle, 4 up) of 2 attentions each; the VAE's encoder and decoder 1 each
        assert speedups.set_attention_slicing(unet, 16) == 14
        assert speedups.set_attention_slicing(vae, 16) == 2
        after = unet(x, t, ctx), vae.decode(z)
    for a, b in zip(before, after):
        assert (a - b).abs().max().item() <= SLICE_TOL * max(1.0, b.abs().max().item())
    assert speedups.set_attention_slicing(unet, None) == 14 and all(
        m.chunk is None for m in unet.modules() if hasattr(m, "chunk"))
    with pytest.raises(InputError, match="attention_slice 0"):
        speedups.set_attention_slicing(unet, 0)
    with pytest.raises(InputError, match="positive number of query tokens"):
        attention(x.flatten(2), x.flatten(2), x.flatten(2), heads=1, chunk=-4)


# -- memory layout and norms in low precision ------------------------------------------------------------

def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    unet, vae = UNet(TINY_UNET).eval(), random_vae()
    keys = list(unet.state_dict())
    x, t, ctx, z = randn(2, 4, 16, 16), torch.tensor([999.0, 10.5]), randn(2, 77, 16, seed=1), randn(1, 4, 8, 8)
    with torch.no_grad():
        before = unet(x, t, ctx), vae.decode(z)
        speedups.set_memory_format(unet, True)
        speedups.set_memory_format(vae, True)
        assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        after = unet(x, t, ctx), vae.decode(z)
    for a, b in zip(before, after):  # fp32, other convolution kernels: rounding only (1e-4 activation rule)
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    assert list(unet.state_dict()) == keys
    speedups.set_memory_format(unet, False)
    assert unet.input_blocks[0][0].weight.is_contiguous()
    assert speedups.prefers_channels_last("cpu", torch.bfloat16)
    assert not speedups.prefers_channels_last("cpu", torch.float32)
    assert not speedups.prefers_channels_last("cuda", torch.bfloat16)


def test_prepacked_convolutions_match_and_follow_weight_changes():
    """The packed path runs the same oneDNN kernel on a pre-reordered weight: bit-identical to the eager
    convolution, for every input size, after in-place weight updates and dtype changes."""
    torch.manual_seed(0)
    convs = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)).eval()
    convs.to(torch.bfloat16, memory_format=torch.channels_last)
    x = randn(2, 8, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = convs(x), convs(x[:1, :, :5, :7])
        assert speedups.prepack_convolutions(convs, True) == 3
        assert all(isinstance(m.__dict__["forward"], speedups.PackedConv2d) for m in convs)
        assert torch.equal(convs(x), eager[0]) and torch.equal(convs(x[:1, :, :5, :7]), eager[1])
        convs[0].weight.mul_(-1)  # stale packs would now give the wrong sign
        flipped = convs(x)
        speedups.prepack_convolutions(convs, False)
        assert "forward" not in convs[0].__dict__ and torch.equal(flipped, convs(x))
        speedups.prepack_convolutions(convs, True)
        convs.float()  # new fp32 weight tensors: repacked on the next call
        packed32 = convs(x.float())
        speedups.prepack_convolutions(convs, False)
        # fp32 on one thread: an AMD EPYC (avx512, no AMX) runs the eager 1x1 convolution through another
        # oneDNN algorithm than the packed one, same sums rounded in another order: 2.4e-7 apart on outputs
        # up to ~0.7 (measured). Intel's AMX machines give identical bits. A stale fp16/bf16 pack would be ~1e-2 off.
        torch.testing.assert_close(packed32, convs(x.float()), rtol=0, atol=1e-6)
    speedups.prepack_convolutions(convs, True)
    convs(x.float().requires_grad_()).sum().backward()  # autograd on: the plain convolution, which has a backward
    assert convs[0].weight.grad is not None


def test_fused_qkv_projections_match_the_separate_layers():
    """One matmul over the concatenated q/k/v weights gives the three projections (fp32: the same sums in
    another blocking, ~1e-6); the layers' weights become slices of the concatenation (no second copy) with
    the same state dict; a changed weight is picked up; autograd reaches each layer."""
    from latentdiff.unet import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(dim=32, context_dim=32, heads=2, upcast=False).eval()
    cross_only = CrossAttention(dim=32, context_dim=16, heads=2, upcast=False)
    x, context = randn(2, 10, 32), randn(2, 5, 32)
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    with torch.no_grad():
        separate, separate_cross = attn(x), attn(x, context)
        assert speedups.fuse_projections(torch.nn.ModuleList([attn, cross_only]), True) == 1
        assert cross_only.qkv is None  # k and v read a 16-wide context: nothing to fuse
        assert torch.allclose(attn(x), separate, atol=1e-5, rtol=0)
        assert torch.equal(attn(x, context), separate_cross)  # cross-attention keeps the separate layers
        storages = {attn.to_q.weight.untyped_storage().data_ptr(), attn.to_v.weight.untyped_storage().data_ptr()}
        assert len(storages) == 1
        assert all(torch.equal(state[k], v) for k, v in attn.state_dict().items())
        attn.to_v.weight.mul_(-1)  # a stale concatenation would ignore this
        changed = attn(x)
        attn.to(torch.float64)  # new tensors: concatenated again
        assert torch.allclose(attn(x.double()).float(), changed, atol=1e-5, rtol=0)
        speedups.fuse_projections(attn, False)
        assert attn.qkv is None and torch.allclose(attn(x.double()).float(), changed, atol=1e-5, rtol=0)
    attn.float()
    speedups.fuse_projections(attn, True)
    attn(x).sum().backward()
    assert all(layer.weight.grad is not None for layer in (attn.to_q, attn.to_k, attn.to_v))


def test_group_norm_in_low_precision():
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(64, seed=1))
        norm.bias.copy_(0.1 * randn(64, seed=2))
    x = randn(2, 64, 8, 8) * 300 + 100  # x^2 ~ 1e5 overflows fp16 (max 65504)
    reference = norm(x)
    # bf16 runs natively: its statistics accumulate in fp32 inside the kernel, so the error is the rounding
    # of the bf16 input and output: a few bf16 ulps (2^-8 relative) of the normalised values
    native = norm.to(torch.bfloat16)(x.bfloat16())
    assert native.dtype == torch.bfloat16
    assert (native.float() - reference).abs().max().item() <= 4 * 2**-8 * reference.abs().max().item()
    half = norm.to(torch.float16)(x.half())  # fp16 goes through fp32 and stays finite
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    # input, weights and output each rounded to fp16's 11 bits: a few ulps of the output scale
    assert (half.float() - reference).abs().max().item() <= 8 * 2**-11 * reference.abs().max().item()


# -- tiled VAE --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,tile,overlap", [(20, 8, 2), (20, 8, 5), (17, 6, 3), (8, 8, 0), (5, 8, 3)])
def test_tile_layout_covers_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    assert starts[0] == 0 and starts[-1] + length == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap


@pytest.mark.parametrize("tile,overlap", [(4, 1), (6, 3), (5, 0), (16, 4)])
def test_blending_is_exact_for_a_pointwise_decoder(tile, overlap):
    """Every output pixel is a normalised weighted mean of the tiles covering it: for a decoder without
    spatial context (nearest 4x upsampling, then a pointwise nonlinearity) tiling changes nothing."""
    def decode(z):
        return torch.tanh(F.interpolate(z, scale_factor=4, mode="nearest") * 1.5)

    z = randn(2, 4, 13, 11)
    tiled = run_tiled(decode, z, tile=tile, overlap=overlap, in_scale=1, out_scale=4)
    assert tiled.shape == (2, 4, 52, 44)
    assert (tiled - decode(z)).abs().max().item() <= 1e-6


def test_one_tile_is_the_plain_decode():
    vae, z = random_vae(), randn(1, 4, 12, 12)
    with torch.no_grad():
        assert (tiled_decode(vae, z, tile=12, overlap=4) - vae.decode(z)).abs().max().item() <= 1e-6


def diffusers_tiling_vae(vae: AutoencoderKL, tile: int) -> DiffusersVAE:
    """diffusers' AutoencoderKL with the same weights, tiling latents of `tile` pixels (its overlap: 1/4)."""
    f = vae.cfg.downsample_factor
    theirs = DiffusersVAE(**(vae_config_to_diffusers(vae.cfg, 0.18215) | {"sample_size": tile * f})).eval()
    theirs.load_state_dict(vae_to_diffusers(vae.state_dict(), vae.cfg))
    theirs.enable_tiling()
    return theirs


@pytest.mark.parametrize("tile", [16, 32])
def test_tiled_decode_close_to_untiled(tile):
    """Tiled decoding cannot be exact (GroupNorm statistics, attention and conv context stop at tile edges).
    Bounds, on a 48x48 latent of iid noise (decorrelated, the hardest case for per-tile statistics):
    (1) at least as close to the untiled image as diffusers' own tiled decode with the same tile size
    (measured: ours 31.2 / 42.0 dB, diffusers 28.1 / 37.6 dB for tiles 16 / 32); (2) tile 32 (two tiles a
    side) >= 35 dB PSNR, the level at which differences are not visible side by side."""
    vae, z = random_vae(), randn(1, 4, 48, 48, seed=1)
    with torch.no_grad():
        full = vae.decode(z)
        ours = tiled_decode(vae, z, tile=tile, overlap=tile // 2)
        theirs = diffusers_tiling_vae(vae, tile).decode(z).sample
    assert ours.shape == full.shape
    assert psnr(ours, full) >= psnr(theirs, full)
    if tile == 32:
        assert psnr(ours, full) >= 35.0


def test_tiled_encode_close_to_untiled():
    """Posterior means of a smooth 192x192 image, tiles of 32 latents (256 px) overlapping by 16: closer to
    the untiled encoder than diffusers' tiled encode (measured SNR 35.2 vs 30.0 dB), and >= 30 dB SNR."""
    vae = random_vae()
    x = F.interpolate(torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1,
                      size=(192, 192), mode="bilinear")
    with torch.no_grad():
        full = vae.encode(x).mean
        ours = tiled_encode(vae, x, tile=32, overlap=16)
        theirs = diffusers_tiling_vae(vae, 32).encode(x).latent_dist.mean

    def snr(a):
        return 10 * math.log10((full**2).mean().item() / ((a - full) ** 2).mean().item())

    assert ours.mean.shape == full.shape and ours.logvar.shape == full.shape
    assert snr(ours.mean) >= snr(theirs) and snr(ours.mean) >= 30.0


def test_tiling_modes():
    assert not wants_tiling("auto", 1024, 1024) and wants_tiling("auto", 1088, 1024)
    assert wants_tiling("on", 64, 64) and not wants_tiling("off", 4096, 4096)
    with pytest.raises(InputError, match="vae_tiling .yes."):
        wants_tiling("yes", 512, 512)


def test_tiling_rejects_bad_arguments():
    vae = random_vae()
    with pytest.raises(InputError, match=r"overlap \(8\) in 0..tile-1"):
        tiled_decode(vae, randn(1, 4, 16, 16), tile=8, overlap=8)
    with pytest.raises(InputError, match="multiples of 4"):
        tiled_encode(vae, randn(1, 3, 30, 32))


# -- compile --------------------------------------------------------------------------------------------

def compile_raising(error: Exception):
    """A stand-in for torch.compile whose compiled module raises `error` when called."""
    def fake_compile(module, **kwargs):
        def run(*args):
            raise error
        return run
    return fake_compile


def test_compile_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", compile_raising(RuntimeError("no working C++ compiler found\nmore lines")))
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    fast = speedups.compile_unet(unet, "cpu")
    x, t, ctx = randn(1, 4, 8, 8), torch.tensor([500.0]), randn(1, 77, 16)
    with torch.no_grad():
        assert torch.equal(fast(x, t, ctx), unet(x, t, ctx))
    assert fast.fallback_reason == "RuntimeError: no working C++ compiler found"
    with pytest.raises(InputError, match="context"):  # our own errors still reach the caller
        fast(x, t, randn(1, 77, 8))


def test_compile_passes_our_errors_through(monkeypatch):
    monkeypatch.setattr(torch, "compile", compile_raising(InputError("bad width")))
    fast = speedups.compile_unet(torch.nn.Identity(), "cuda")
    with pytest.raises(InputError, match="bad width"):
        fast(torch.zeros(1))
    assert fast.fallback_reason is None


def test_unet_traces_as_one_graph():
    """CUDA graphs and inductor need the U-Net step without graph breaks (no data-dependent Python)."""
    torch.manual_seed(0)
    unet = UNet(ONE_LEVEL_UNET).eval()
    x, t, ctx = randn(2, 4, 8, 8), torch.tensor([999.0, 3.5]), randn(2, 77, 16)
    traced = torch.compile(unet, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert (traced(x, t, ctx) - unet(x, t, ctx)).abs().max().item() <= 1e-6


# -- no host-device sync in the sampling loop -------------------------------------------------------------

HOST_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class CountHostReads(TorchFunctionMode):
    """Counts tensor -> Python reads: on a GPU each one waits for all queued kernels (a sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))


# Each reads one sigma per step (`if sigma_next == 0` / `if sigma_up > 0`); see the fast-paths report.
PER_STEP_READS = {"Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S a", "DPM++ SDE",
                  "DDPM", "LCM"}


@pytest.mark.parametrize("name", [n for n in sampling.sampler_names() if n not in PER_STEP_READS])
def test_sampling_loop_reads_nothing_back_per_step(name):
    """The pipeline's setting (sigmas on the host, CFG + discrete denoiser around a U-Net): the
    number of host reads must not grow with the number of steps (validation before the loop may read)."""
    sample, schedule = sampling.resolve_sampler(name)
    acp = alphas_cumprod_for(preset("sd1"))
    torch.manual_seed(0)
    unet = UNet(ONE_LEVEL_UNET).eval()
    denoiser = CFGDenoiser(DiscreteDenoiser(unet, acp))
    x, ctx = randn(1, 4, 8, 8), randn(1, 77, 16)
    extra = dict(cond=ctx, uncond=randn(1, 77, 16, seed=1), cfg_scale=7.0)
    reads = []
    for steps in (2, 4):
        with torch.no_grad(), CountHostReads() as counter:
            sample(denoiser, x, make_sigmas(schedule, steps, acp), extra_args=extra,
                   noise_sampler=lambda sigma, sigma_next: torch.zeros_like(x))
        reads.append(counter.count)
    assert reads[0] == reads[1], f"{name}: {reads[0]} host reads at 2 steps, {reads[1]} at 4"


def test_guidance_is_one_batched_call_per_step():
    calls = []

    def network(x, t, context):
        calls.append((x.shape[0], context[:, 0, 0].tolist()))
        return x * 0.1

    acp = alphas_cumprod_for(preset("sd1"))
    cond, uncond = torch.ones(1, 77, 16), torch.zeros(1, 77, 16)
    sampling.sample_euler(CFGDenoiser(DiscreteDenoiser(network, acp)), randn(1, 4, 8, 8), make_sigmas("normal", 3, acp),
                          extra_args=dict(cond=cond, uncond=uncond, cfg_scale=7.5))
    assert calls == [(2, [0.0, 1.0])] * 3  # uncond and cond halves in one call, each step


# -- the switches through the Pipeline and the CLI --------------------------------------------------------

FAST = dict(steps=2, progress=False, seed=5, return_latents=True)


def counting(monkeypatch, module, name) -> list:
    calls, original = [], getattr(module, name)

    def counted(x):
        calls.append(tuple(x.shape))
        return original(x)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_vae_tiling_through_the_pipeline(monkeypatch):
    """192 px images are 24x24 latents: with tiles of 16 overlapping by 8 that is two tiles a side, the layout
    for which test_tiled_decode_close_to_untiled bounds the tiled decode at >= 35 dB PSNR (default tiles are
    64 latents, too large for a tiny test, hence the smaller tile here)."""
    monkeypatch.setattr(pipeline, "tiled_decode", lambda vae, z: tiled_decode(vae, z, tile=16, overlap=8))
    monkeypatch.setattr(pipeline, "tiled_encode", lambda vae, x: tiled_encode(vae, x, tile=16, overlap=8))
    pipe = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, vae_tiling="off")
    decodes = counting(monkeypatch, pipe.model.vae, "decode")
    encodes = counting(monkeypatch, pipe.model.vae, "encode")
    untiled = pipe.txt2img("a red circle", width=192, height=192, **FAST)
    pipe.vae_tiling = "on"
    tiled = pipe.txt2img("a red circle", width=192, height=192, **FAST)
    assert decodes == [(1, 4, 24, 24)] + [(1, 4, 16, 16)] * 4
    assert torch.equal(tiled.latents, untiled.latents)  # tiling touches only the VAE
    a, b = (torch.from_numpy(np.array(r.images[0])).float() / 127.5 - 1 for r in (tiled, untiled))
    assert psnr(a, b) >= 35.0
    pipe.img2img(Image.fromarray(np.asarray(untiled.images[0])), "a cat", strength=0.5, **FAST)
    assert encodes == [(1, 3, 16 * 8, 16 * 8)] * 4  # the encoder ran on tiles too
    with pytest.raises(InputError, match="vae_tiling .yes."):
        pipeline.Pipeline(tiny_model(SD1), device="cpu", vae_tiling="yes")


def test_attention_slicing_through_the_pipeline():
    """Sliced attention changes only the blocking of each softmax (<= 1e-5 per activation, see SLICE_TOL);
    over two sampling steps the latents (magnitude ~40: sigma-scaled) stay within the 1e-4 activation rule,
    relative to their size, and the uint8 images within one level of rounding."""
    full = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32)
    sliced = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, attention_slice=7)
    chunks = {m.chunk for m in sliced.model.modules() if hasattr(m, "chunk")}
    assert chunks == {7}
    a, b = full.txt2img("a red circle", **FAST), sliced.txt2img("a red circle", **FAST)
    assert (a.latents - b.latents).abs().max().item() <= 1e-4 * a.latents.abs().max().item()
    assert np.abs(np.asarray(a.images[0], dtype=int) - np.asarray(b.images[0], dtype=int)).max() <= 1
    with pytest.raises(InputError, match="attention_slice 0"):
        pipeline.Pipeline(tiny_model(SD1), device="cpu", attention_slice=0)


def test_compile_failure_in_the_pipeline_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    eager = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32).txt2img("a cat", **FAST)
    monkeypatch.setattr(torch, "compile", broken_compile)
    pipe = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, compile=True)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        compiled = pipe.txt2img("a cat", **FAST)
    assert torch.equal(compiled.latents, eager.latents)
    assert "torch.compile failed, running eagerly: RuntimeError: inductor: no C++ compiler" in caplog.text
    assert caplog.text.count("torch.compile failed") == 1  # once, not per step


def test_offload_is_refused_without_cuda():
    with pytest.raises(InputError, match=r"offload keeps .* CUDA GPU; this pipeline runs on cpu"):
        pipeline.Pipeline(tiny_model(SD1), device="cpu", offload=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves modules to a CUDA GPU; none here")
def test_offload_parks_text_encoder_and_vae_on_the_cpu():
    plain = pipeline.Pipeline(tiny_model(SD1), device="cuda", dtype=torch.float32).txt2img("a cat", **FAST)
    pipe = pipeline.Pipeline(tiny_model(SD1), device="cuda", dtype=torch.float32, offload=True)
    result = pipe.txt2img("a cat", **FAST)
    assert next(pipe.model.text_encoder.parameters()).is_cpu and next(pipe.model.vae.parameters()).is_cpu
    assert next(pipe.model.unet.parameters()).is_cuda
    assert torch.equal(result.latents, plain.latents)
    # fused q/k/v are the CUDA default; the text encoder's are re-concatenated after each trip to the GPU
    assert any(getattr(m, "qkv", None) is not None for m in pipe.model.text_encoder.modules())


@pytest.fixture()
def cli_env(monkeypatch, tmp_path):
    """main() in this process: it sets PyTorch's huge-page switch, the thread count and the root logger;
    undo all three afterwards."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    handlers, threads = logging.root.handlers[:], torch.get_num_threads()
    yield save_model(tiny_model(SD1), tmp_path / "tiny.safetensors")
    logging.root.handlers[:] = handlers
    torch.set_num_threads(threads)


@pytest.mark.parametrize("flags,message", [
    (["--vae-tiling", "yes"], "--vae-tiling 'yes': choose one of auto, on, off"),
    (["--attention-slice", "0"], "--attention-slice 0: must be a positive number"),
    (["--threads", "0"], "--threads 0: must be between 1 and"),
    (["--offload"], "--offload keeps the text encoder and VAE in CPU memory"),
])
def test_cli_rejects_bad_speed_flags(cli_env, tmp_path, capsys, flags, message):
    code = main(["txt2img", "a cat", "--model", str(cli_env), "-o", str(tmp_path / "out"), "--steps", "1",
                 "--quiet", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("latentdiff: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_speed_flags_reach_the_pipeline(cli_env, tmp_path, monkeypatch, capsys):
    seen = {}
    original = pipeline.Pipeline.__init__

    def recording(self, model, **kwargs):
        seen.update(kwargs)
        original(self, model, **kwargs)
    monkeypatch.setattr(pipeline.Pipeline, "__init__", recording)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # inductor takes minutes on CPU
    code = main(["txt2img", "a cat", "--model", str(cli_env), "-o", str(tmp_path / "out"), "--steps", "1", "--quiet",
                 "--seed", "3", "--dtype", "fp32", "--threads", "1", "--vae-tiling", "on", "--attention-slice", "16",
                 "--compile"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "3.png").is_file() and torch.get_num_threads() == 1
    assert {k: seen[k] for k in ("vae_tiling", "attention_slice", "compile", "offload", "dtype", "threads")} == dict(
        vae_tiling="on", attention_slice=16, compile=True, offload=False, dtype=torch.float32, threads=1)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"  # main() asked for huge pages first thing


# -- the benchmark tool -----------------------------------------------------------------------------------

def test_bench_tiny_prints_ratios(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--steps", "2", "--warmup", "0",
           "--threads", "1", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "figures.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for label in ("text encode", "U-Net step", "VAE decode", "end to end", "peak mem, generation"):
        assert re.search(rf"^ratio {label}.*\d+\.\d\dx\s+1\.00x\s*$", out, re.M), f"no ratio row for {label}:\n{out}"
    found = re.search(r"(?:ours:fp32 vs diffusers:fp32|diffusers:fp32 vs ours:fp32): max pixel diff (\d+)/255", out)
    assert found, out
    # same weights, sampler, schedule and seeds: the images agree to the pipelines' fp32 parity (<= 2/255)
    assert int(found.group(1)) <= 2


def test_bench_refuses_a_missing_cuda_device(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--device", "cuda", "--steps", "1",
           "--warmup", "0", "--threads", "1", "--cache-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():  # a GPU machine runs the fp32 comparison on it
        assert done.returncode == 0 and "ratio U-Net step" in done.stdout, done.stderr[-2000:]
    else:
        assert done.returncode == 1 and "--device cuda, but PyTorch sees no CUDA device" in done.stderr


# -- the CPU ceiling tool ---------------------------------------------------------------------------------

def test_ceiling_counts_on_meta_what_a_real_step_computes():
    """tools/cpu_ceiling.py counts a step's FLOPs on the meta device; a real forward (attention through the
    math backend, so its two matrix products are visible to the counter) must count the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    step_flops = runpy.run_path(str(ROOT / "tools" / "cpu_ceiling.py"))["step_flops"]
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(randn(2, 4, 8, 8), torch.full((2,), 500.0), randn(2, 77, 16))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts.get("aten.bmm", 0) > 0 and counts.get("aten.convolution", 0) > 0  # attention and convs seen
    assert step_flops(TINY_UNET, 64) == counter.get_total_flops()


def test_ceiling_reads_bench_figures(tmp_path):
    figures = {"reference": "diffusers:fp32",
               "median": {"diffusers:fp32": {"step": 3.0}, "ours:bf16": {"step": 1.0}}}
    (tmp_path / "bench.json").write_text(json.dumps(figures))
    cmd = [sys.executable, str(ROOT / "tools" / "cpu_ceiling.py"), "--size", "64", "--threads", "1",
           "--bench", str(tmp_path / "bench.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    flops = float(re.search(r"U-Net CFG step ([\d.]+) GFLOP", done.stdout).group(1))
    bf16_bound = float(re.search(r"bf16: best throughput \d+ GFLOP/s \(GEMM \d+, conv \d+\) -> a step takes >= ([\d.]+) s", done.stdout).group(1))
    assert re.search(rf"ours:bf16: step 1.000 s = {flops:.0f} GFLOP/s", done.stdout), done.stdout
    best = float(re.search(r"would be ([\d.]+)x faster than diffusers:fp32", done.stdout).group(1))
    assert best == pytest.approx(3.0 / bf16_bound, rel=0.02)


# -- start-up ---------------------------------------------------------------------------------------------

META_BUILD_PROBE = """
import sys, torch
from latentdiff.config import preset
from latentdiff.model import build_on_meta
model = build_on_meta(preset("sd1"))
after = torch.nn.Linear(4, 4)  # outside the build: initialised as ever
print({t.device.type for t in model.state_dict().values()}, "torch._dynamo" in sys.modules, bool(after.weight.any()))
"""


def test_meta_build_skips_initialisers_and_dynamo():
    """Building the SD 1.5 tree on the meta device imports no torch._dynamo (a meta normal_ would: ~1.8 s
    of the CLI's start-up, benchmarks/startup.md), leaves every tensor on meta for the strict load to
    replace, and initialisation works as usual once the build is done."""
    done = subprocess.run([sys.executable, "-c", META_BUILD_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "{'meta'} False True"
