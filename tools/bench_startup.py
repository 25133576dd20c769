"""The CLI's start-up, two checkouts side by side: `latentdiff txt2img` with the bundled demo model and one
sampling step (so the time is start-up: imports, loading, one step, decode, saving), run alternately from
this checkout and from another one (e.g. `git archive <commit> | tar -x -C /tmp/before`), each in a fresh
process. Prints every run's wall time, the medians and their ratio, and whether each side imported
torch._dynamo.

    python tools/bench_startup.py --other /tmp/before --runs 5
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the CLI's main() in a process that then reports whether torch._dynamo was imported
PROBE = ("import sys; from latentdiff.cli import main; code = main(sys.argv[1:]); "
         "print('dynamo imported:', 'torch._dynamo' in sys.modules); sys.exit(code)")


def run_cli(root: Path, out: Path) -> tuple[float, bool]:
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-c", PROBE, "txt2img", "a red circle", "--steps", "1", "--quiet", "--seed", "1",
           "--model", str(ROOT / "weights" / "demo" / "model.safetensors"), "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_startup.py: {root}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return wall, "dynamo imported: True" in done.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="the other checkout's root (the 'before' side)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    sides = {"before (--other)": Path(args.other).resolve(), "this checkout": ROOT}
    times = {s: [] for s in sides}
    print(f"{os.uname().nodename}, {os.cpu_count()} CPUs, load average %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for i, (side, root) in enumerate(sides.items() if r % 2 == 0 else reversed(sides.items())):
                wall, dynamo = run_cli(root, Path(tmp) / f"{r}-{i}")
                times[side].append(wall)
                print(f"  run {r + 1}: {side}: {wall:.2f} s, torch._dynamo imported: {dynamo}", flush=True)
    med = {s: statistics.median(t) for s, t in times.items()}
    print(", ".join(f"{s}: median {v:.2f} s" for s, v in med.items())
          + f"; this / before = {med['this checkout'] / med['before (--other)']:.2f}x; "
          + "load average %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
