"""The thread policy: idle cores from /proc/stat samples (fixed texts), the count chosen from them, the
process's setting restored after a generation, explicit counts through the Pipeline and the CLI."""

import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff import pipeline, threads
from latentdiff.errors import InputError

# Two /proc/stat samples 100 ticks (1 s) apart on a 2-CPU machine: cpu0 busy all along (a busy loop:
# user time), cpu1 idle but for 10 ticks of system time and 5 stolen by the hypervisor; a third CPU the
# process may not use, fully idle.
BEFORE = """cpu  300 0 100 700 10 0 0 0 0 0
cpu0 100 0 50 200 5 0 0 0 0 0
cpu1 200 0 50 500 5 0 0 0 0 0
cpu2 0 0 0 900 0 0 0 0 0 0
intr 1 2 3
procs_running 2
procs_blocked 0
"""
AFTER = """cpu  400 0 110 785 10 0 0 5 0 0
cpu0 200 0 50 200 5 0 0 0 0 0
cpu1 200 0 60 585 5 0 0 5 0 0
cpu2 0 0 0 1000 0 0 0 0 0 0
intr 1 2 3
procs_running 3
procs_blocked 0
"""


def test_parse_stat_reads_per_cpu_idle_and_running():
    cpus, running = threads.parse_stat(BEFORE)
    assert cpus == {0: (205, 355), 1: (505, 755), 2: (900, 900)}  # the all-CPU "cpu" line is not a CPU
    assert running == 2
    assert threads.parse_stat("cpu0 1 2 3 4 5 6 7 8 9 10\n") == ({0: (9, 36)}, None)


def test_idle_cores_counts_the_usable_cpus_and_this_process():
    before, after = threads.parse_stat(BEFORE)[0], threads.parse_stat(AFTER)[0]
    # cpu0 0/100 idle, cpu1 85/100 (10 system, 5 stolen); cpu2 is outside the affinity mask
    assert threads.idle_cores(before, after, {0, 1}, own_cpu_s=0.0, elapsed_s=1.0) == pytest.approx(0.85)
    # what this process used itself is free for it: 0.5 s of CPU in 1 s of wall time is half a core
    assert threads.idle_cores(before, after, {0, 1}, own_cpu_s=0.5, elapsed_s=1.0) == pytest.approx(1.35)
    assert threads.idle_cores(before, after, {0, 1, 2}, own_cpu_s=0.0, elapsed_s=1.0) == pytest.approx(1.85)
    assert threads.idle_cores(before, before, {0, 1}, own_cpu_s=0.0, elapsed_s=0.001) is None  # no tick yet


@pytest.mark.parametrize("idle,limit,expected", [
    (0.0, 2, 1), (0.3, 2, 1), (0.85, 2, 1), (1.35, 2, 1), (1.6, 2, 2), (2.0, 2, 2), (7.9, 2, 2), (3.4, 8, 3),
    (2.0, 1, 1)])
def test_threads_for_idle_cores(idle, limit, expected):
    assert threads.threads_for(idle, limit) == expected


def stat_with_running(n: int) -> str:
    return BEFORE.replace("procs_running 2", f"procs_running {n}")


def test_idle_threads_from_the_runnable_count(monkeypatch, tmp_path):
    """Every CPU usable: idle cores are the CPUs less the other processes' runnable threads, averaged over
    the readings (procs_running less this process's own runnable threads)."""
    stat = tmp_path / "stat"
    readings = iter([])
    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "running_threads_of_this_process", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.write_text(stat_with_running(next(readings))))

    def choose(*running):  # procs_running at each reading
        nonlocal readings
        readings = iter(running[1:])
        stat.write_text(stat_with_running(running[0]))
        return threads.idle_threads(limit=2, stat=stat)

    assert choose(*[2] * threads.SAMPLES) == 2  # only this process's two threads: quiet
    assert choose(*[3] * threads.SAMPLES) == 1  # a busy loop in every reading
    assert choose(*([3, 2] * threads.SAMPLES)[:threads.SAMPLES]) == 2  # a burst in half of them: 1.5 idle
    assert choose(*[1] * threads.SAMPLES) == 2  # counts taken at different instants: never below zero
    stat.write_text("cpu0 1 2 3 4 5 6 7 8\n")  # no procs_running line (an old kernel): PyTorch's setting
    assert threads.idle_threads(limit=2, stat=stat) == 2
    assert threads.idle_threads(limit=2, stat=tmp_path / "missing") == 2  # no /proc (macOS, Windows)


def test_idle_threads_over_a_window_in_a_cpuset(monkeypatch, tmp_path):
    """Some of the machine's CPUs outside the affinity mask (procs_running counts them too): the idle time
    of the usable CPUs over a window, which the kernel's counters move through while it sleeps."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 3)
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.write_text(AFTER))
    clock = iter([0.0, 1.0])  # the window: one second, in which this process used no CPU
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads.time, "process_time", lambda: 0.0)
    stat.write_text(BEFORE)
    assert threads.idle_threads(limit=2, stat=stat) == 1  # cpu0 busy, cpu1 85% idle, cpu2 not ours


def test_generation_threads_restores_the_process_setting(monkeypatch):
    current = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "idle_threads", lambda limit: 1)  # a busy machine
        with threads.generation_threads() as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads.generation_threads():
            raise RuntimeError("a failed generation")
        assert torch.get_num_threads() == 2
        with threads.generation_threads(1) as n:  # an explicit count wins over the idle cores
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        limits = []
        monkeypatch.setattr(threads, "idle_threads", lambda limit: limits.append(limit) or limit)
        torch.set_num_threads(1)  # a caller's (or OMP_NUM_THREADS') lower setting is the ceiling
        with threads.generation_threads() as n:
            assert n == 1 and limits == [1]
    finally:
        torch.set_num_threads(current)
    with pytest.raises(InputError, match="threads 0: must be between 1 and"):
        with threads.generation_threads(0):
            pass


def test_set_threads():
    current = torch.get_num_threads()
    assert threads.set_threads(None) == current
    assert threads.set_threads(1) == 1
    threads.set_threads(current)
    with pytest.raises(InputError, match="threads 0"):
        threads.set_threads(0)


def test_pipeline_generates_on_its_threads_and_restores(monkeypatch):
    """During sampling the U-Net sees the generation's count; afterwards the caller's setting is back."""
    current = torch.get_num_threads()
    seen, limits = [], []
    monkeypatch.setattr(threads, "idle_threads", lambda limit: limits.append(limit) or 1)  # a busy machine
    try:
        torch.set_num_threads(2)
        for count in (None, 1):  # the idle-core default, then an explicit count (which samples nothing)
            pipe = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, threads=count)
            pipe.model.unet.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
            pipe.txt2img("a red circle", steps=1, progress=False, seed=1)
            assert torch.get_num_threads() == 2
        assert seen == [1, 1] and limits == [2]
    finally:
        torch.set_num_threads(current)
    with pytest.raises(InputError, match="threads 0"):
        pipeline.Pipeline(tiny_model(SD1), device="cpu", threads=0)
