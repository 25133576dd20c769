"""Encoding a 225-token prompt (three chunks) against a 75-token one (one chunk), side by side in one run:
SD 1.5's text encoder size (ViT-L/14 text tower, random weights: only the time matters) through
latentdiff.prompts.encode_prompts, the two prompts alternating. Prints each side's median and the ratio
(issue 22 asks for at most 3x).

    OMP_NUM_THREADS=2 python tools/bench_prompt_length.py --runs 15
"""

import argparse
import statistics
import time

import torch

from latentdiff.clip import TextEncoder, Tokenizer
from latentdiff.config import TextEncoderConfig
from latentdiff.prompts import encode_prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig()).eval().requires_grad_(False).to(dtype)
    tokenizer = Tokenizer()
    prompts = {"75 tokens": " ".join(["red"] * 75), "225 tokens": " ".join(["red"] * 225)}
    for name, prompt in prompts.items():  # check the sizes claimed, and warm up
        assert len(tokenizer.token_ids([prompt])[0]) == int(name.split()[0]), name
        encode_prompts([prompt], tokenizer, encoder)
    times = {name: [] for name in prompts}
    with torch.inference_mode():
        for _ in range(args.runs):
            for name, prompt in prompts.items():
                start = time.perf_counter()
                encode_prompts([prompt], tokenizer, encoder)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.runs} runs each")
    for name, median in medians.items():
        print(f"{name:>10}: median {median * 1000:.1f} ms  (min {min(times[name]) * 1000:.1f} ms)")
    print(f"ratio 225 / 75 tokens: {medians['225 tokens'] / medians['75 tokens']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
