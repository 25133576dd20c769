"""The CUDA fast paths on a GPU: fp16 against fp32, a sampling loop that never waits for the GPU, the
compiled U-Net with CUDA graphs against eager. Every test here needs a CUDA device and is reported as
skipped, with that reason, where PyTorch sees none; tools/gpu_check.sh runs them on a lent GPU."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny import SD1, tiny_model

import latentdiff.sampling as sampling_module
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; PyTorch sees none here")

PROMPT = "a red circle on a blue square"
FAST = dict(steps=4, seed=5, sampler="Euler", progress=False)
REDUCED_PRECISION_PSNR = 30.0  # dB: issue 6's bound for a reduced-precision image against fp32


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def cpu_fp32_image():
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32).txt2img(PROMPT, **FAST).images[0]


def test_fp16_on_cuda_is_the_default_and_close_to_fp32(cpu_fp32_image):
    pipe = Pipeline(tiny_model(SD1), device="cuda")
    assert pipe.dtype == torch.float16 and next(pipe.model.unet.parameters()).is_cuda
    result = pipe.txt2img(PROMPT, **FAST)
    assert not result.notes, result.notes  # the fp16 VAE decode needed no fp32 retry
    assert psnr(result.images[0], cpu_fp32_image) >= REDUCED_PRECISION_PSNR


def test_fp32_on_cuda_matches_the_cpu(cpu_fp32_image, monkeypatch):
    # full fp32 (cuDNN's convolutions default to TF32): only summation order differs, so the uint8 images
    # may differ by a rounding step, as in the CPU parity tests against diffusers
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    image = Pipeline(tiny_model(SD1), device="cuda", dtype=torch.float32).txt2img(PROMPT, **FAST).images[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(cpu_fp32_image, dtype=int)).max() <= 1


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M Karras", "DDIM"])
def test_sampling_loop_never_waits_for_the_gpu(sampler, monkeypatch):
    """CUDA's sync debug mode turns every synchronising call (a .item(), a copy from pageable host
    memory, ...) into an error; it is on for the whole sampling loop, per-step noise and timesteps
    included, and off for the prompt encoding before it and the decode after it."""
    resolve = sampling_module.sampler_spec

    def strict(name):
        spec, schedule = resolve(name)

        def sample_without_syncs(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return spec.fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return dataclasses.replace(spec, fn=sample_without_syncs), schedule
    monkeypatch.setattr(sampling_module, "sampler_spec", strict)
    result = Pipeline(tiny_model(SD1), device="cuda").txt2img(PROMPT, **{**FAST, "sampler": sampler})
    assert np.asarray(result.images[0]).std() > 0


def test_compiled_unet_with_cuda_graphs_matches_eager():
    eager = Pipeline(tiny_model(SD1), device="cuda").txt2img(PROMPT, **FAST).images[0]
    pipe = Pipeline(tiny_model(SD1), device="cuda", compile=True)
    compiled = [pipe.txt2img(PROMPT, **FAST).images[0] for _ in range(3)]  # warm-up, recording, replays
    assert pipe._unet.fallback_reason is None, pipe._unet.fallback_reason  # it really ran compiled
    for image in compiled:  # fp16: inductor's fused kernels round differently from eager's
        assert psnr(image, eager) >= REDUCED_PRECISION_PSNR
    assert np.array_equal(np.asarray(compiled[1]), np.asarray(compiled[2]))  # replays are deterministic
