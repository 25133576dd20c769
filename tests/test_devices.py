"""Device and dtype choice from the CPU's flags, through the Pipeline."""

import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff import devices, pipeline, speedups

pytestmark = pytest.mark.usefixtures("single_thread")

XEON_AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\nbugs\t\t: avx512_bf16_fake\n"


def channels_last(pipe) -> bool:
    return pipe.model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_detection_from_cpuinfo_flags():
    assert devices.cpu_has_native_bf16(XEON_AMX)
    assert devices.cpu_has_native_bf16(ZEN4)
    assert not devices.cpu_has_native_bf16(SKYLAKE)  # only the flags line counts, whole words only
    assert not devices.cpu_has_native_bf16("")
    assert devices.default_dtype("cpu", XEON_AMX) == torch.bfloat16
    assert devices.default_dtype("cpu", SKYLAKE) == torch.float32
    assert devices.default_dtype("cuda", SKYLAKE) == torch.float16  # no GPU needed to decide
    assert devices.default_dtype("meta", XEON_AMX) == torch.float32


def test_pipeline_dtype_and_layout_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(devices, "read_cpuinfo", lambda: XEON_AMX)
    fast = pipeline.Pipeline(tiny_model(SD1), device="cpu")
    assert fast.dtype == torch.bfloat16 and fast.model.dtype == torch.bfloat16 and channels_last(fast)
    assert isinstance(fast.model.unet.input_blocks[0][0].__dict__.get("forward"), speedups.PackedConv2d)
    assert all(getattr(m, "qkv", None) is None for m in fast.model.modules())  # fused q/k/v: CUDA only
    monkeypatch.setattr(devices, "read_cpuinfo", lambda: SKYLAKE)
    plain = pipeline.Pipeline(tiny_model(SD1), device="cpu")
    assert plain.dtype == torch.float32 and plain.model.dtype == torch.float32 and not channels_last(plain)
    assert "forward" not in plain.model.unet.input_blocks[0][0].__dict__
    assert devices.default_device_dtype("cpu", torch.float16) == (torch.device("cpu"), torch.float16)  # explicit wins
