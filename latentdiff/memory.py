"""Process memory settings for fast CPU sampling: huge pages for PyTorch's big blocks, freed memory kept
for reuse while sampling. Both are process-wide (one allocator per process): use_huge_pages is for the
process's owner (the CLI) to call first thing and is never called by the library; keep_freed_memory
restores glibc's settings when its block ends."""

import ctypes
import functools
import os
from contextlib import contextmanager


def use_huge_pages() -> None:
    """Back PyTorch's CPU allocations of 2 MiB and more with transparent huge pages (PyTorch's own
    THP_MEM_ALLOC_ENABLE switch). PyTorch reads the switch at the process's first tensor allocation:
    call this before creating any tensor (the CLI does it first thing); later it changes nothing.

    Activations are allocated afresh at every sampling step, and the kernel hands them out as zeroed
    4 KiB pages: ~450k page faults per SD 1.5 U-Net step at 256 px. With 2 MiB pages that is ~3k, and
    the step is ~5% faster (benchmarks/cpu.md). Peak memory is unchanged. Linux only; where huge pages
    are disabled ("never") the request is ignored."""
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc's malloc.h)
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults (malloc/malloc.c)


@functools.cache
def glibc():
    """The C library as a ctypes handle if it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has
    except (OSError, TypeError):  # TypeError: Windows wants a library name
        return None
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


@contextmanager
def keep_freed_memory():
    """While the block runs, freed memory stays in the process for the next allocation instead of going
    back to the kernel; on exit it is returned (malloc_trim) and glibc's default settings are back (though,
    as after any mallopt call, glibc no longer adapts its mmap threshold).

    Why: PyTorch's CPU convolution reorders its fp32 weight into oneDNN's blocked layout in a fresh buffer
    on every call (56-112 MiB for SD's 1280-channel layers). glibc maps blocks that large afresh and unmaps
    them when freed, so each sampling step faults in ~1.8 GB of new pages that the kernel zeroes first
    (464k faults per SD 1.5 step at 256 px with 4 KiB pages); the step was 10-20% slower for it. With
    mmap off (M_MMAP_MAX 0) and no trimming, those blocks are reused from the heap: no faults. Only around
    sampling: kept over the VAE decode as well, the peak RSS rose by ~0.25 GiB for no speed
    (benchmarks/cpu.md). The setting is the whole process's while the block runs (glibc has one). Without
    glibc (macOS, musl) nothing changes."""
    libc = glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
