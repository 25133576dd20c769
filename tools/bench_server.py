"""Load test of `latentdiff serve` on the demo model: 8 concurrent clients x 10 requests, against one client
and against the Python API on the same request, in one run.

    python tools/bench_server.py [--clients 8] [--requests 10] [--steps 20] [--threads 1] [--json out.json]

The server runs as its own process (`python -m latentdiff.cli serve`, a free loopback port); its RSS is
sampled every 50 ms. Every request carries its own seed: the run checks that each is answered once with
its seed (none lost or duplicated). Phases, in order: the Python API (in this process, the server idle)
and one HTTP client alternated request by request (the server's cost per image), one client alone, N
concurrent clients, one client again. Prints latencies, throughputs, RSS and ratios.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    def __init__(self, pid: int):
        self.process, self.samples, self._stop = psutil.Process(pid), [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.process.memory_info().rss))

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def stop(self):
        self._stop.set()
        self._thread.join()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="generation threads, server and Python API alike")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    body = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": 64, "height": 64,
            "sampler_name": "Euler a", "cfg_scale": 7}

    load_before = os.getloadavg()
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "serve", "--port", str(port), "--threads",
                               str(args.threads), "--queue-size", str(2 * args.clients)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/options", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{server.stdout.read()}")
                time.sleep(0.2)
        rss = RssSampler(server.pid)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        from latentdiff.pipeline import Pipeline
        pipe = Pipeline.from_pretrained(threads=args.threads)
        results = {}

        def python_api(seed):
            start = time.perf_counter()
            pipe.txt2img(body["prompt"], steps=args.steps, seed=seed, sampler="Euler a", cfg_scale=7, progress=False)
            return time.perf_counter() - start

        def one_request(client, seed, session=httpx):
            start = time.perf_counter()
            response = session.post(f"{url}/txt2img", json=body | {"seed": seed}, timeout=600)
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            return seed, json.loads(response.json()["info"])["all_seeds"], len(response.json()["images"]), elapsed

        def clients(name, count):
            sent = [(c, 1_000 * (c + 1) + k) for c in range(count) for k in range(args.requests)]
            start = time.monotonic()
            def client(c):  # one connection per client, as webuiapi's requests.Session keeps
                with httpx.Client() as session:
                    return [one_request(c, s, session) for cc, s in sent if cc == c]
            with ThreadPoolExecutor(count) as pool:
                per_client = [pool.submit(client, c) for c in range(count)]
                answers = [a for f in per_client for a in f.result()]
            end = time.monotonic()
            latencies = [a[3] for a in answers]
            seeds_back = sorted(s for a in answers for s in a[1])
            results[name] = dict(requests=len(sent), answered=len(answers),
                                 seeds_ok=seeds_back == sorted(s for _, s in sent) and all(a[1] == [a[0]] and
                                                                                      a[2] == 1 for a in answers),
                                 wall_s=end - start, images_per_s=len(answers) / (end - start),
                                 p50_s=percentile(latencies, 0.5), p95_s=percentile(latencies, 0.95),
                                 mean_s=statistics.mean(latencies), peak_rss_mib=rss.peak_between(start, end) / 2**20,
                                 rss_mib_at_0_25_50_75_100_percent=[rss.peak_between(
                                     start + q * (end - start) - 0.1, start + q * (end - start)) / 2**20
                                     for q in (0, 0.25, 0.5, 0.75, 1)])

        one_request(0, 1), python_api(1)  # warm-up (first-request costs on both sides)
        # the same request through the Python API and one HTTP client, alternated so that the busy machine's
        # drift falls on both sides alike
        pairs = [(python_api(seed), one_request(0, seed)[3]) for seed in range(10_000, 10_000 + args.requests)]
        results["paired"] = dict(python_api_median_s=statistics.median(p for p, _ in pairs),
                                 server_median_s=statistics.median(h for _, h in pairs),
                                 server_over_python_api_median=statistics.median(h / p for p, h in pairs))
        clients("one_client", 1)
        clients(f"{args.clients}_clients", args.clients)
        clients("one_client_after", 1)  # the busy machine's drift: one client before and after
        rss.stop()
        conc = results[f"{args.clients}_clients"]
        results["ratios"] = dict(
            server_over_python_api=results["paired"]["server_over_python_api_median"],
            throughput_concurrent_over_one=conc["images_per_s"] / statistics.mean(
                results[name]["images_per_s"] for name in ("one_client", "one_client_after")),
            peak_rss_concurrent_minus_one_client_mib=conc["peak_rss_mib"] - results["one_client"]["peak_rss_mib"])
        results["machine"] = dict(cpu=platform.processor() or _cpu_name(), cores=os.cpu_count(),
                                  load_before=load_before, load_after=os.getloadavg())
        results["settings"] = vars(args) | {"request": body}
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0 if conc["answered"] == conc["requests"] and conc["seeds_ok"] else 1
    finally:
        server.terminate()
        server.wait(30)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
