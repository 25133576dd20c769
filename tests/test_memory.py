"""Process memory settings: huge pages for PyTorch's big blocks, freed memory kept while sampling."""

import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff import memory, pipeline

FAST = dict(steps=2, progress=False, seed=5, return_latents=True)
pytestmark = pytest.mark.usefixtures("single_thread")


HUGE_PAGES_PROBE = """
import sys, torch
from latentdiff import memory
if sys.argv[1] == "on":
    memory.use_huge_pages()
block = torch.ones(8 * 2**20 // 4)
flags = [line.split()[1:] for line in open("/proc/self/smaps") if line.startswith("VmFlags:")]
print(sum("hg" in f for f in flags))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_huge_pages_for_big_allocations():
    """After use_huge_pages (called before the first allocation, in a fresh process) PyTorch advises the
    kernel to back its 8 MiB block with 2 MiB pages (madvise MADV_HUGEPAGE: "hg" in the mapping's VmFlags);
    without it, nothing in the process asks for huge pages. Whether the kernel then finds free 2 MiB pages
    depends on its memory at that moment, so the page-fault count (measured: ~3k instead of ~450k per SD
    step when it does) is not what this asserts."""
    def advised_mappings(mode):
        # without the switch, whatever this process inherited (in-process CLI tests call use_huge_pages)
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        done = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE, mode], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert advised_mappings("off") == 0
    assert advised_mappings("on") >= 1


KEPT_MEMORY_PROBE = """
import resource, torch
from latentdiff import memory

def faults_to_refill():  # a 64 MiB block filled and freed, then the faults of filling a new 48 MiB one
    torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults_to_refill()
with memory.keep_freed_memory():
    inside = faults_to_refill()
print(outside, inside, faults_to_refill())
"""


@pytest.mark.skipif(memory.glibc() is None,
                    reason="keep_freed_memory changes glibc's malloc; this C library is not glibc")
def test_freed_memory_is_reused_while_kept():
    """Blocks above glibc's largest mmap threshold (32 MiB) are normally mapped afresh, so filling a 48 MiB
    block faults in 12288 new 4 KiB pages; inside keep_freed_memory it reuses the pages of the 64 MiB block
    freed just before (no faults), and after the block glibc maps afresh again. (A block of the very same
    size may not fit the freed one: PyTorch allocates with posix_memalign, which asks glibc for a little
    more.) In a fresh process without huge pages, where a 2 MiB page would count as one fault."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", KEPT_MEMORY_PROBE], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    outside, inside, after = map(int, done.stdout.split()[-3:])
    pages = 48 * 2**20 // resource.getpagesize()
    assert outside >= pages and after >= pages
    assert inside < pages // 100  # a few pages for Python's own objects at most


def test_sampling_runs_with_freed_memory_kept(monkeypatch):
    """The CPU pipeline keeps freed memory during sampling: the U-Net runs inside
    keep_freed_memory, the VAE decode after it; keep_freed_memory=False leaves malloc alone."""
    log = []

    @contextmanager
    def recording():
        log.append("enter")
        yield
        log.append("exit")

    monkeypatch.setattr(pipeline, "keep_freed_memory", recording)
    for keep in (True, False):
        log.clear()
        pipe = pipeline.Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, keep_freed_memory=keep)
        pipe.model.unet.register_forward_pre_hook(lambda *_: log.append("unet"))
        pipe.model.vae.decoder.register_forward_pre_hook(lambda *_: log.append("decode"))
        pipe.txt2img("a red circle", **FAST)
        assert log == (["enter", "unet", "unet", "exit", "decode"] if keep else ["unet", "unet", "decode"])
