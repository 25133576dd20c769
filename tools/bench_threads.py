"""Thread settings side by side, quiet and under load: the default (latentdiff.threads: as many threads as
there are idle cores when a generation starts) against 1 thread and against all cores (PyTorch's default).

One process loads each model once and generates with the three settings interleaved (each round starts
with the next setting), in three conditions: quiet, with a busy-loop process pinned to the last CPU, and
with one the scheduler may move. Printed: every timing (raw), then per model and condition the median
seconds per generation of each setting, the default's thread count, and the default's time as a ratio to
the better of the other two (the target: <= 1.10), with the load average beside each block. The models:
the bundled demo model at its native 64 px (20 Euler a steps, as the CLI) and seeded random SD 1.5-size
weights (tools/bench.py's cache, ~4.3 GB written on first use) at 256 px, 4 steps. CPU only.

    python tools/bench_threads.py --repeats 5 --json benchmarks/threads.json | tee benchmarks/threads.txt
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "demo" / "model.safetensors"
BUSY_LOOP = "while True: pass"
LOADS = ("quiet", "busy pinned", "busy unpinned")


def start_load(load: str, cpus: list[int]):
    """A busy-loop process (None when quiet); pinned to the last CPU this process may use."""
    if load == "quiet":
        return None
    pin = (lambda: os.sched_setaffinity(0, {cpus[-1]})) if load == "busy pinned" else None
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=pin)
    time.sleep(1.0)  # running at full speed before the first timing
    return proc


def load_text() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("demo", "sd15"), default=["demo", "sd15"])
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three settings per condition")
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "latentdiff-bench"))
    p.add_argument("--json", help="also write every timing to this file")
    args = p.parse_args(argv)

    from latentdiff.memory import use_huge_pages
    use_huge_pages()  # as the CLI does, before the first tensor
    import torch

    from latentdiff.pipeline import Pipeline
    from latentdiff.threads import usable_cpus

    sys.path.insert(0, str(ROOT / "tools"))
    from bench import weights_folder

    cpus = sorted(usable_cpus())
    all_cores = torch.get_num_threads()  # PyTorch's default: one per physical core
    settings = {"default": None, "1 thread": 1, f"all cores ({all_cores})": all_cores}
    print(f"torch {torch.__version__}, {len(cpus)} usable CPUs, PyTorch default {all_cores} threads; "
          f"{os.uname().nodename}; {load_text()}", flush=True)
    jobs = {"demo": (DEMO, dict(steps=20, sampler="Euler a")),
            "sd15": (None, dict(width=256, height=256, steps=4, sampler="Euler"))}
    figures = []
    for name in args.models:
        source, gen = jobs[name]
        if source is None:
            source = weights_folder(SimpleNamespace(tiny=False, cache_dir=args.cache_dir, weights_seed=0))
        pipe = Pipeline.from_pretrained(source)
        chosen = []
        pipe.model.unet.register_forward_pre_hook(lambda *_: chosen.append(torch.get_num_threads()))
        pipe.txt2img("a red circle", progress=False, seed=0, **(gen | {"steps": 1}))  # warm-up
        print(f"\n{name}: {source}, {pipe.dtype}, {gen}", flush=True)
        for load in args.loads:
            proc = start_load(load, cpus)
            try:
                before = load_text()
                times = {s: [] for s in settings}
                threads_seen = []
                for r in range(args.repeats):
                    order = list(settings)[r % 3:] + list(settings)[:r % 3]
                    for setting in order:
                        chosen.clear()
                        start = time.perf_counter()
                        pipe.threads = settings[setting]
                        pipe.txt2img("a red circle", progress=False, seed=r, **gen)
                        times[setting].append(time.perf_counter() - start)
                        if setting == "default":
                            threads_seen.append(chosen[0])
                        print(f"  {name} | {load} | round {r + 1} | {setting}: {times[setting][-1]:.3f} s, "
                              f"{chosen[0]} threads", flush=True)
                after = load_text()
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            med = {s: statistics.median(t) for s, t in times.items()}
            best = min(v for s, v in med.items() if s != "default")
            print(f"{name} | {load} ({before} -> {after}): "
                  + ", ".join(f"{s} {v:.3f} s" for s, v in med.items())
                  + f"; default used {threads_seen} threads; default / best other = {med['default'] / best:.2f}x",
                  flush=True)
            figures.append(dict(model=name, load=load, median_s=med, times_s=times, default_threads=threads_seen,
                                ratio_default_to_best=med["default"] / best, load_before=before, load_after=after))
        del pipe
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
