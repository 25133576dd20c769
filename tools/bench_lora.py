"""Merging a rank-128 LoRA into SD 1.5-size weights (random: only the time matters), side by side in one run:
seconds to read and merge the file and to un-merge it, then the U-Net's time per step (CFG batch of 2) without
and with the merge: a plain copy of the U-Net beside the merged one, called in turn (ABBA), so that the load of
a busy machine falls on both sides alike. The LoRA adapts every attention projection (q, k, v, out; self- and
cross-attention), the transformers' proj_in / proj_out and every 3x3 convolution of the U-Net's resnets
(LoCon), plus the text encoder's attention. Prints medians and the ratio of the step times (a merge costs
nothing per step: ~1.00x). Needs memory for two U-Nets (~7 GiB in fp32).

    OMP_NUM_THREADS=2 python tools/bench_lora.py --rounds 3 --steps 8
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentdiff.config import preset
from latentdiff.model import StableDiffusion
from latentdiff.pipeline import Pipeline

RANK = 128
ADAPTED = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".conv1", ".conv2", "self_attn.q_proj",
           "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def write_lora(model: StableDiffusion, path: Path) -> int:
    """A random rank-128 kohya file for the ADAPTED layers; returns how many layers it has."""
    from latentdiff.formats.lora import layer_names
    params = dict(model.named_parameters())
    sd = {}
    for dotted, ours in layer_names(model).items():  # "unet.<module>" / "text_encoder.text_model.<module>"
        part, _, module = dotted.partition(".")
        if part not in ("unet", "text_encoder") or not module.endswith(ADAPTED) or \
                part == "text_encoder" and not module.startswith("text_model."):
            continue
        kohya = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        out, inp, *kernel = params[ours].shape
        sd[f"{kohya}.lora_down.weight"] = torch.randn(RANK, inp, *kernel, dtype=torch.float16) * 0.01
        sd[f"{kohya}.lora_up.weight"] = torch.randn(out, RANK, *(1,) * len(kernel), dtype=torch.float16) * 0.01
        sd[f"{kohya}.alpha"] = torch.tensor(RANK / 2)
    save_file(sd, str(path))
    return len(sd) // 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="merges and un-merges timed")
    p.add_argument("--steps", type=int, default=8, help="U-Net calls of each side")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latent side / 8)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = StableDiffusion(preset("sd1")).eval().requires_grad_(False)
    pipe = Pipeline(model, device="cpu", dtype=args.dtype)
    side = args.size // 8
    x, t = torch.randn(2, 4, side, side).to(pipe.dtype), torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768).to(pipe.dtype)
    times = {"plain step": [], "merged step": [], "read + merge": [], "un-merge": []}

    def step(unet, name):
        start = time.perf_counter()
        unet(x, t, context)
        times[name].append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        lora = Path(tmp) / "rank128.safetensors"
        layers = write_lora(model, lora)
        for _ in range(args.rounds):
            start = time.perf_counter()
            pipe.set_loras([(lora, 1.0)])
            times["read + merge"].append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.set_loras([])
            times["un-merge"].append(time.perf_counter() - start)
        size = lora.stat().st_size
        # the step times: a plain copy of the U-Net beside the merged one, called in turn (ABBA), so that the
        # machine's load, which drifts over minutes here, falls on both alike
        plain = copy.deepcopy(model.unet)
        pipe.set_loras([(lora, 1.0)])
        sides = [(plain, "plain step"), (model.unet, "merged step")]
        for unet, _ in sides:
            unet(x, t, context)  # warm-up
        for i in range(args.steps):
            for unet, name in sides if i % 2 == 0 else sides[::-1]:
                step(unet, name)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, SD 1.5-size U-Net at "
          f"{args.size}x{args.size} (batch 2); LoRA rank {RANK}, {layers} layers, {size / 2**20:.0f} MiB fp16; "
          f"{args.rounds} merges, {args.steps} steps each side")
    for name, median in medians.items():
        print(f"{name:>13}: median {median:.2f} s  (min {min(times[name]):.2f}, max {max(times[name]):.2f}, "
              f"n={len(times[name])})")
    pairs = [m / p for p, m in zip(times["plain step"], times["merged step"])]  # adjacent calls
    print(f"ratio merged / plain step: {medians['merged step'] / medians['plain step']:.2f}x of the medians, "
          f"{statistics.median(pairs):.2f}x the median of the {len(pairs)} adjacent pairs' ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
