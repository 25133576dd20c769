"""Side-by-side benchmark: latentdiff's Pipeline against diffusers' StableDiffusionPipeline, same weights.

Both load one diffusers folder of seeded random SD 1.5-size weights (written once into --cache-dir; no
hub access), and generate the same prompt with Euler (linspace spacing on both sides, so the images
should agree), the same steps, size, CFG scale and seeds. Each side runs in its own subprocess, so its
peak RSS is its own; sides are interleaved within one invocation (--repeats rounds of every side), so
contention from other work on the machine hits all of them, and each round starts with the next side;
medians over rounds are reported. Warm-up runs (one step) are excluded from the timings.

Printed per side: text-encode time, seconds per U-Net step with CFG (time inside the U-Net's forward,
per step; on CUDA from CUDA events, so the timed run has no added syncs), VAE decode time (inside the
decoder's forward), end-to-end time of the generation call, peak memory (CPU: RSS of the generation
alone, and of the whole process including loading; CUDA: the generation's max_memory_allocated, and its
max_memory_reserved, the allocator's cache included, as the second figure), then every figure as a ratio
to the reference side (the first diffusers side) and each image's max pixel difference and PSNR against
the first side and the reference.

A side is IMPL[:DTYPE][+OPTION...]: IMPL ours | diffusers; DTYPE fp32 | bf16 | fp16 (default --dtype);
options: autocast (fp32 weights, compute in DTYPE under torch.autocast), tile (tiled VAE decode),
slice (sliced attention), channels_last / nchw (U-Net and VAE convs in NHWC / NCHW; ours defaults to
latentdiff.speedups' choice, NHWC for CPU bf16; diffusers to NCHW), small_pages (ours on CPU without
memory.use_huge_pages), unpacked (ours on CPU bf16 without speedups.prepack_convolutions), fused /
unfused (ours with / without speedups.fuse_projections; default: fused on CUDA only), release_memory (ours on
CPU without memory.keep_freed_memory around sampling), keep_memory (diffusers inside
memory.keep_freed_memory for the whole generation: its U-Net steps without page faults whatever its heap
layout, see benchmarks/cpu.md), compile (ours with the U-Net under torch.compile, CUDA graphs on CUDA: give it
--warmup 2, as compiling and recording the graphs take the first calls and the timed run should replay).

    python tools/bench.py --size 512 --steps 4                        # ours:fp32 vs diffusers:fp32
    python tools/bench.py --size 256 --sides ours:fp32 diffusers:fp32 ours:bf16 ours:fp32+autocast
    python tools/bench.py --size 1024 --steps 1 --sides ours:bf16+tile --warmup 0
    python tools/bench.py --tiny                                       # seconds: a smoke test
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
CFG_SCALE = 7.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONS = ("autocast", "tile", "slice", "channels_last", "nchw", "small_pages", "unpacked", "fused", "unfused",
           "release_memory", "keep_memory", "compile")
ATTENTION_CHUNK = 1024  # query tokens per block with +slice
METRICS = [("text", "text encode s"), ("step", "U-Net step (CFG) s"), ("decode", "VAE decode s"),
           ("e2e", "end to end s"), ("step_cpu", "U-Net step CPU s"), ("e2e_cpu", "end to end CPU s"),
           ("step_faults", "page faults per step"),
           ("peak_gen", "peak mem, generation GiB"), ("peak_all", "peak mem, process GiB")]


# -- weights ------------------------------------------------------------------------------------------

def tiny_config():
    from latentdiff.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
    return ModelConfig(
        name="bench-tiny", text=TextEncoderConfig(width=64, layers=2, heads=2, ff_width=128),
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                        num_heads=4, context_dim=64),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1), resolution=64)


def weights_folder(args) -> Path:
    """The diffusers folder both sides load, written on first use (save_model writes atomically, so a
    folder that exists is complete)."""
    from latentdiff.checkpoint import load_strict
    from latentdiff.config import preset
    from latentdiff.loader import save_model
    from latentdiff.model import build_on_meta
    from parity_full import random_state_dict  # tools/, beside this script; imported here, not in the workers

    config = tiny_config() if args.tiny else preset("sd1")
    folder = Path(args.cache_dir) / f"{config.name}-seed{args.weights_seed}"
    if not (folder / "model_index.json").is_file():
        print(f"writing random weights to {folder} ...", flush=True)
        model = build_on_meta(config)
        load_strict(model, random_state_dict(model, args.weights_seed), where="random weights")
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, folder)
    return folder


# -- measuring inside one process ---------------------------------------------------------------------

class ForwardTimer:
    """Wall and process CPU time spent inside a module's forward, via hooks. With one thread the CPU time is
    the work done, whatever else runs on the machine; wall time includes waiting for a core. On CUDA the
    wall time comes from CUDA events recorded on the stream, so timing adds no synchronisation to the run
    it measures (read `walls` after synchronising), and the CPU time is the host's cost of launching."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _clock(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args):
        self._start = self._clock(), time.process_time(), minor_faults()

    def _post(self, module, args, output):
        self.spans.append((self._start[0], self._clock()))
        self.cpus.append(time.process_time() - self._start[1])
        self.faults.append(minor_faults() - self._start[2])

    @property
    def walls(self) -> list[float]:
        if self.cuda:
            return [start.elapsed_time(end) / 1000 for start, end in self.spans]
        return [end - start for start, end in self.spans]

    def reset(self):
        self.spans, self.cpus, self.faults = [], [], []


def minor_faults() -> int:
    """Page faults so far: each is a fresh 4 KiB page the allocator handed out and the kernel zeroed."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    """Peak since reset_peak: CUDA allocator peak, or VmHWM (peak RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def process_peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def parse_side(spec: str, default_dtype: str) -> dict:
    head, *options = spec.split("+")
    impl, _, dtype = head.partition(":")
    dtype = dtype or default_dtype
    bad = [o for o in options if o not in OPTIONS]
    if impl not in ("ours", "diffusers") or dtype not in DTYPES or bad:
        raise SystemExit(f"bench.py: bad side {spec!r}: want IMPL[:DTYPE][+OPTION...] with IMPL ours|diffusers, "
                         f"DTYPE {'|'.join(DTYPES)}, OPTION {'|'.join(OPTIONS)}")
    return {"spec": spec, "impl": impl, "dtype": dtype, "options": options}


def load_side(side: dict, folder: Path, device: torch.device):
    """(generate() -> list of PIL images, U-Net, text encoder, VAE decoder) for one side."""
    compute = DTYPES[side["dtype"]]
    weights = torch.float32 if "autocast" in side["options"] else compute

    if side["impl"] == "ours":
        from latentdiff.speedups import fuse_projections, prepack_convolutions, set_memory_format
        from latentdiff.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(folder, device=device, dtype=weights,
                                        vae_tiling="on" if "tile" in side["options"] else "off",
                                        attention_slice=ATTENTION_CHUNK if "slice" in side["options"] else None,
                                        keep_freed_memory="release_memory" not in side["options"],
                                        compile="compile" in side["options"],
                                        threads=torch.get_num_threads())  # diffusers' count, not the idle-core default
        text, vae = pipe.model.text_encoder, pipe.model.vae
        # compiled: time the compiled module, whose hooks run outside the compiled graph
        unet = pipe._unet.compiled if pipe.compile else pipe.model.unet
        # the pipeline's layout choice (channels_last for CPU bf16) unless a side says otherwise
        for option, channels_last in (("channels_last", True), ("nchw", False)):
            if option in side["options"]:
                set_memory_format(pipe.model, channels_last)
        if "unpacked" in side["options"]:
            prepack_convolutions(pipe.model, False)
        for option, fused in (("fused", True), ("unfused", False)):
            if option in side["options"]:
                fuse_projections(pipe.model, fused)

        def generate(args, seed, steps):
            images = pipe.txt2img(PROMPT, NEGATIVE, width=args.size, height=args.size, steps=steps,
                                  sampler="Euler", schedule="linspace", cfg_scale=CFG_SCALE, seed=seed,
                                  batch_size=args.batch_size, progress=False).images
            if pipe.compile and pipe._unet.fallback_reason:
                raise SystemExit(f"bench.py: {side['spec']}: torch.compile failed, the U-Net ran eagerly: "
                                 f"{pipe._unet.fallback_reason}")
            return images
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        from latentdiff.memory import keep_freed_memory

        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=weights, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        # latentdiff's folders (clip.Tokenizer.save) leave model_max_length unset (1e30), which the fast
        # tokenizer cannot truncate to; CLIP's own limit is its position-embedding count.
        pipe.tokenizer.model_max_length = min(pipe.tokenizer.model_max_length,
                                              pipe.text_encoder.config.max_position_embeddings)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        unet, text, vae = pipe.unet, pipe.text_encoder, pipe.vae
        if "slice" in side["options"]:
            pipe.enable_attention_slicing()
        if "tile" in side["options"]:
            pipe.vae.enable_tiling()

        def generate(args, seed, steps):
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.batch_size)]
            with keep_freed_memory() if "keep_memory" in side["options"] else nullcontext():
                return pipe(PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size,
                            num_inference_steps=steps, guidance_scale=CFG_SCALE, generator=gens,
                            num_images_per_prompt=args.batch_size).images
        if "channels_last" in side["options"]:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
    return generate, unet, text, vae.decoder


def worker(args) -> None:
    """One side in this process: load, warm up, time one generation, write results + images."""
    from latentdiff.memory import use_huge_pages
    from latentdiff.threads import set_threads

    side = parse_side(args.worker, args.dtype)
    device = torch.device(args.device)
    set_threads(args.threads)
    if side["impl"] == "ours" and device.type == "cpu" and "small_pages" not in side["options"]:
        use_huge_pages()  # ours' CPU default (see latentdiff.memory)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    generate, unet, text, decoder = load_side(side, Path(args.folder), device)
    load_s = time.perf_counter() - start
    timers = {name: ForwardTimer(module, device) for name, module in (("unet", unet), ("text", text),
                                                                        ("decode", decoder))}
    amp = (torch.autocast(device.type, dtype=DTYPES[side["dtype"]]) if "autocast" in side["options"]
           else nullcontext())
    with torch.inference_mode(), amp:
        for _ in range(args.warmup):  # one step creates every kernel and buffer the timed run needs
            generate(args, args.seed, steps=1)
        for timer in timers.values():
            timer.reset()
        reset_peak(device)
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        images = generate(args, args.seed, steps=args.steps)
        sync()
        e2e, e2e_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    unet_calls = timers["unet"]
    if len(unet_calls.walls) != args.steps:
        raise SystemExit(f"bench.py: {side['spec']}: {len(unet_calls.walls)} U-Net calls for {args.steps} Euler steps")
    # Euler calls the U-Net once per step; the median step ignores a step that another process slowed
    result = {"side": side["spec"], "load": load_s, "e2e": e2e, "text": sum(timers["text"].walls),
              "step": statistics.median(unet_calls.walls), "step_cpu": statistics.median(unet_calls.cpus),
              "step_walls": unet_calls.walls, "e2e_cpu": e2e_cpu, "decode": sum(timers["decode"].walls),
              "peak_gen": peak_gib(device), "peak_all": process_peak_gib(device),
              "step_faults": statistics.median(unet_calls.faults), "threads": torch.get_num_threads(),
              "images": []}
    if "compile" in side["options"]:  # what was compiled: a graph break or a CUDA-graph skip costs speed
        from torch._dynamo.utils import counters
        result["compiled"] = {"graphs": counters["stats"]["unique_graphs"],
                              "graph_breaks": sum(counters["graph_break"].values()),
                              "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    for i, image in enumerate(images):
        path = Path(args.result).with_suffix(f".{i}.png")
        image.save(path)
        result["images"].append(str(path))
    Path(args.result).write_text(json.dumps(result))


# -- driving the sides ----------------------------------------------------------------------------------

def run_side(args, side: str, folder: Path, workdir: Path, index: int) -> dict:
    result = workdir / f"side{index}.json"
    cmd = [sys.executable, __file__, "--worker", side, "--result", str(result), "--folder", str(folder),
           "--device", args.device, "--dtype", args.dtype, "--size", str(args.size), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench.py: side {side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def pixels(result: dict) -> np.ndarray:
    from PIL import Image
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in result["images"]])


def image_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs pixel difference (0-255) and PSNR in dB of uint8 images."""
    mse = float(((a - b) ** 2).mean())
    return float(np.abs(a - b).max()), (math.inf if mse == 0 else 10 * math.log10(255**2 / mse))


def report(args, sides: list[str], runs: dict[str, list[dict]]) -> dict:
    median = {s: {key: statistics.median(r[key] for r in runs[s]) for key, _ in METRICS + [("load", "")]}
              for s in sides}
    reference = next((s for s in sides if s.startswith("diffusers")), sides[-1])
    width = max(12, *(len(s) + 2 for s in sides))
    print(f"\n{'':32}" + "".join(f"{s:>{width}}" for s in sides))
    for key, label in METRICS:
        print(f"{label:32}" + "".join(f"{median[s][key]:>{width}.3f}" for s in sides))
    print(f"\nratio to {reference} (< 1: faster / smaller)")
    ratios = {s: {} for s in sides}
    for key, label in METRICS:
        for s in sides:
            base = median[reference][key]
            ratios[s][key] = median[s][key] / base if base else math.nan
        print(f"{'ratio ' + label:32}" + "".join(f"{ratios[s][key]:>{width - 1}.2f}x" for s in sides))
    images = {s: pixels(runs[s][0]) for s in sides}
    print("\nimages (uint8): max |pixel diff| and PSNR")
    diffs = {}
    for base in dict.fromkeys([sides[0], reference]):
        for s in sides:
            if s != base and f"{base} vs {s}" not in diffs:
                diff, psnr = image_diff(images[s], images[base])
                diffs[f"{s} vs {base}"] = {"max_pixel_diff": diff, "psnr_db": psnr}
                print(f"  {s} vs {base}: max pixel diff {diff:.0f}/255, PSNR {psnr:.1f} dB")
    return {"median": median, "ratios": ratios, "reference": reference, "images": diffs,
            "runs": runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="default dtype of every side")
    p.add_argument("--size", type=int, help="image side in pixels (default 512; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed 1-step generations before the timed one, per side")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all sides (interleaved); medians reported")
    p.add_argument("--sides", nargs="+", help="default: ours diffusers (at --dtype)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's choice)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model: checks the tool in seconds")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "latentdiff-bench"))
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--images", help="keep the generated images in this folder (default: a temporary one)")
    # internal: one side in a subprocess
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench.py: --device {args.device}, but PyTorch sees no CUDA device here")
    sides = args.sides or [f"ours:{args.dtype}", f"diffusers:{args.dtype}"]
    for s in sides:
        parse_side(s, args.dtype)
    folder = weights_folder(args)
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, device {args.device}, "
          f"{args.size}x{args.size}, {args.steps} Euler steps, batch {args.batch_size}, CFG {CFG_SCALE}, "
          f"warm-up {args.warmup}, repeats {args.repeats}", flush=True)
    runs = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            round_dir = Path(args.images or tmp) / f"round{r}"
            round_dir.mkdir(parents=True, exist_ok=True)
            for i in range(len(sides)):  # each round starts with another side: no side always goes first
                side = sides[(i + r) % len(sides)]
                result = run_side(args, side, folder, round_dir, sides.index(side))
                print(f"  round {r + 1}: {side}: step {result['step']:.3f} s (CPU {result['step_cpu']:.3f} s), "
                      f"e2e {result['e2e']:.2f} s, peak {result['peak_gen']:.2f} GiB",
                      *(f"{k} {v}" for k, v in result.get("compiled", {}).items()), flush=True)
                runs[side].append(result)
        figures = report(args, sides, runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
