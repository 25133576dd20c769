"""How many CPU threads a generation uses, decided when it starts (never at import).

PyTorch's default, one thread per physical core, is right on a quiet machine and badly wrong on a busy
one: an OpenMP parallel region ends at a barrier that waits for its slowest thread, and a thread that
shares its core with another process is descheduled for whole time slices. With one busy-loop process on
a 2-core machine the demo model ran 3x slower on two threads than on one (benchmarks/threads.md). So by
default each generation counts the cores that are idle right now and uses that many threads (at least
one, at most what PyTorch would use), and puts the process's setting back afterwards: a library caller's
torch.set_num_threads is never changed behind its back. An explicit count (`--threads N`, Pipeline(threads=N))
is used as given.

Idle cores come from /proc/stat (Linux): the usable CPUs less the runnable threads of other processes
(its `procs_running` line less this process's own runnable threads, averaged over a few readings: ~2 ms),
or, where the affinity mask leaves some of the machine's CPUs out, the idle time of the usable CPUs over a
50 ms window. Elsewhere the default is PyTorch's.
PyTorch has one setting per process: two generations running at once in one process share it.
"""

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import FieldError

SAMPLES, SAMPLE_GAP_S = 8, 0.0002  # procs_running readings: a busy loop is in every one, a burst in some
WINDOW_S = 0.05  # /proc/stat counts in 10 ms ticks: 5 ticks per CPU tell a busy core from an idle one


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def check_threads(threads: int) -> int:
    available = len(usable_cpus())
    if not 1 <= threads <= available:
        raise FieldError("threads", f"{threads}: must be between 1 and the {available} CPUs this process may use")
    return threads


def set_threads(threads: int | None) -> int:
    """Intra-op threads for the whole process (the CLI, which owns its process); None keeps the current
    setting. Returns the count in effect."""
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    return torch.get_num_threads()


def parse_stat(text: str) -> tuple[dict[int, tuple[int, int]], int | None]:
    """From /proc/stat text: per CPU number, (idle ticks, all ticks) (idle = idle + iowait; time stolen by
    the hypervisor counts as busy: this process could not have it), and the procs_running count (None if
    absent)."""
    cpus, running = {}, None
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            cpus[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        elif name == "procs_running":
            running = int(fields[0])
    return cpus, running


def idle_cores(before: dict, after: dict, cpus: set[int], own_cpu_s: float, elapsed_s: float) -> float | None:
    """How many of `cpus` were free for this process between two parse_stat samples: their idle share plus
    what this process itself used (`own_cpu_s` of CPU time over `elapsed_s` of wall time). None when the
    window was too short to hold a tick."""
    idle = 0.0
    for cpu in cpus & before.keys() & after.keys():
        ticks = after[cpu][1] - before[cpu][1]
        if ticks <= 0:
            return None
        idle += (after[cpu][0] - before[cpu][0]) / ticks
    return idle + own_cpu_s / elapsed_s


def threads_for(idle: float, limit: int) -> int:
    """Threads for `idle` free cores: rounded to the nearest core, 1..limit. (A thread too many costs more
    than one too few: the first waits at every barrier, the second only leaves a core unused.)"""
    return max(1, min(limit, int(idle + 0.5)))


def running_threads_of_this_process() -> int:
    """This process's runnable threads now (state R), the reader included."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass  # the thread ended while being read
    return count


def others_running(stat: Path, samples: int = SAMPLES) -> float:
    """The mean number of runnable threads of other processes over `samples` readings of procs_running
    (a fraction of a millisecond each, SAMPLE_GAP_S apart)."""
    counts = []
    for i in range(samples):
        if i:
            time.sleep(SAMPLE_GAP_S)
        running = parse_stat(stat.read_text())[1]
        if running is None:
            raise OSError(f"{stat}: no procs_running line")
        counts.append(max(0, running - running_threads_of_this_process()))
    return sum(counts) / samples


def idle_threads(limit: int, window_s: float = WINDOW_S, stat: Path = Path("/proc/stat")) -> int:
    """Threads for the cores idle now, at most `limit`; `limit` where /proc is missing. Where this process
    may use every CPU of the machine, idle cores are the usable CPUs less the other processes' runnable
    threads (procs_running, a few readings: ~2 ms); where its affinity mask leaves some CPUs out (a
    container's cpuset), procs_running also counts threads on CPUs it cannot use, so the idle time of its
    own CPUs is measured over a `window_s` window instead."""
    cpus = usable_cpus()
    try:
        if len(cpus) == os.cpu_count():
            return threads_for(len(cpus) - others_running(stat), limit)
        before = parse_stat(stat.read_text())[0]
        wall, own = time.monotonic(), time.process_time()
        time.sleep(window_s)
        after = parse_stat(stat.read_text())[0]
        idle = idle_cores(before, after, cpus, time.process_time() - own, time.monotonic() - wall)
    except OSError:
        return limit
    return limit if idle is None else threads_for(idle, limit)


@contextmanager
def generation_threads(threads: int | None = None):
    """The block runs on `threads` intra-op threads, or (None) on as many as there are idle cores, at most
    the process's current setting (PyTorch's default: one per physical core; OMP_NUM_THREADS and a caller's
    torch.set_num_threads lower it). The process's setting is back when the block ends. Yields the count."""
    current = torch.get_num_threads()
    chosen = check_threads(threads) if threads is not None else idle_threads(current)
    if chosen != current:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() != current:
            torch.set_num_threads(current)
