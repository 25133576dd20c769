"""How fast could one U-Net step go on this CPU? The arithmetic of an SD 1.5 CFG step over the best
throughput PyTorch reaches here, per dtype; with a tools/bench.py --json file, how close each side came.

FLOPs are counted on the meta device (torch.utils.flop_counter: convolutions, linear layers, and attention
as the two matrix products it is), so nothing is computed. The best throughput per dtype is the fastest of
a large square GEMM and the U-Net's most common 3x3 convolution at this size (bf16 in the NHWC layout with
oneDNN pre-packed weights, as the pipeline runs it; fp32 in NCHW), best of several calls. A step can take
no less than FLOPs / that throughput, so a bf16 side can be at most (reference step) / (bf16 bound) times
faster than the reference: benchmarks/cpu.md uses this for issue 6's "bf16 >= 3x diffusers fp32" target.

    python tools/cpu_ceiling.py --size 256 --bench benchmarks/cpu-256-threads2-amd-keep2.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from latentdiff import speedups
from latentdiff.config import UNetConfig, preset
from latentdiff.unet import UNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_flops(cfg: UNetConfig, size: int) -> int:
    """FLOPs of one U-Net call on a CFG batch (2 latents of size/8) with 77 context tokens."""
    with torch.device("meta"):
        unet = UNet(cfg).eval()
        x, t = torch.empty(2, cfg.in_channels, size // 8, size // 8), torch.full((2,), 500.0)
        context = torch.empty(2, 77, cfg.context_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, context)
    return counter.get_total_flops()


def best_rate(fn, flops: int, calls: int = 10) -> float:
    """Highest FLOP/s over `calls` timed calls, after two untimed ones."""
    fn(), fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best


def peak_rates(dtype: torch.dtype, size: int) -> dict[str, float]:
    """FLOP/s of a square GEMM and of the U-Net's 320-channel 3x3 convolution at this size."""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    gemm = best_rate(lambda: a @ b, 2 * n**3)
    side, channels = size // 8, 320
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
    x = torch.randn(2, channels, side, side, dtype=dtype)
    if speedups.prefers_channels_last("cpu", dtype):
        speedups.set_memory_format(conv, True)
        x = x.contiguous(memory_format=torch.channels_last)
    speedups.prepack_convolutions(conv, dtype == torch.bfloat16)
    with torch.no_grad():
        conv_rate = best_rate(lambda: conv(x), 2 * 2 * channels * channels * 9 * side * side)
    return {"GEMM": gemm, "conv": conv_rate}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's choice)")
    p.add_argument("--bench", help="a tools/bench.py --json file measured at the same size and threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flops = step_flops(preset("sd1").unet, args.size)
    rates = {name: peak_rates(dtype, args.size) for name, dtype in DTYPES.items()}
    peaks = {name: max(kernels.values()) for name, kernels in rates.items()}
    bound = {name: flops / rate for name, rate in peaks.items()}
    print(f"{args.size}x{args.size}, {torch.get_num_threads()} threads: U-Net CFG step {flops / 1e9:.1f} GFLOP")
    for name, kernels in rates.items():
        each = ", ".join(f"{kernel} {rate / 1e9:.0f}" for kernel, rate in kernels.items())
        print(f"  {name}: best throughput {peaks[name] / 1e9:.0f} GFLOP/s ({each}) -> a step takes >= {bound[name]:.3f} s")
    print(f"  bf16 / fp32 best throughput: {peaks['bf16'] / peaks['fp32']:.2f}x")
    if not args.bench:
        return
    from bench import parse_side  # tools/, beside this script

    figures = json.loads(Path(args.bench).read_text())
    reference = figures["reference"]
    default_dtype = figures.get("args", {}).get("dtype", "fp32")
    for side, median in figures["median"].items():
        dtype = parse_side(side, default_dtype)["dtype"]
        share = f", {bound[dtype] / median['step']:.0%} of the {dtype} best" if dtype in bound else ""
        print(f"  {side}: step {median['step']:.3f} s = {flops / median['step'] / 1e9:.0f} GFLOP/s{share}")
    ref_step = figures["median"][reference]["step"]
    print(f"  a bf16 step at the bf16 best would be {ref_step / bound['bf16']:.2f}x faster than {reference}")


if __name__ == "__main__":
    main()
