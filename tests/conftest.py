"""Shared fixtures. Tiny model configs live in tests/tiny.py (plain imports, usable outside pytest too)."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small models on one intra-op thread, then restore the setting.

    The tiny networks gain nothing from a second thread, and on a shared 2-core machine two threads that
    wait on each other under contention made the same U-Net call ~40x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
