"""The Pipeline object on tiny random models: seeds, batches, callbacks, argument checks, the fp32 VAE retry."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import SD1, SD2_V, tiny_model

from latentdiff.errors import GenerationError, InputError
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = dict(steps=3, progress=False)


@pytest.fixture(scope="module")
def pipe(single_thread):
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32)


def gradient(width=64, height=64) -> Image.Image:
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (height, width, 3))))


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_batch_equals_single_runs(pipe):
    """Image i of a batch is the image of a single run with seed + i (its own noise, step noise included)."""
    options = dict(sampler="Euler a", return_latents=True, **FAST)
    batch = pipe.txt2img("a red circle", "blurry", seed=10, batch_size=2, **options)
    singles = [pipe.txt2img("a red circle", "blurry", seed=s, **options) for s in (10, 11)]
    assert batch.seeds == [10, 11]
    for i, single in enumerate(singles):
        # fp32 bound. The latents came out bit-identical on the Intel AMX machines, 1.0e-4 apart on an AMD
        # EPYC whose batched GEMMs block (and so round) differently, on latents up to ~25 after 20 steps:
        # ~4e-6 relative (measured). The batched VAE decode rounds differently in the last bits too, which
        # can move an 8-bit value by one level (measured: 1).
        torch.testing.assert_close(batch.latents[i], single.latents[0], rtol=1e-5, atol=1e-4)
        assert np.abs(pixels(batch)[i].astype(int) - pixels(single)[0].astype(int)).max() <= 1
    assert not np.array_equal(*pixels(batch))


def test_same_seed_same_image_other_seed_other_image(pipe):
    first, again, other = (pipe.txt2img("a cat", sampler="DPM++ 2M", seed=s, **FAST) for s in (5, 5, 6))
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
    assert np.abs(pixels(first)[0].astype(int) - pixels(other)[0].astype(int)).max() > 10


def test_seed_is_chosen_and_reported_when_omitted(pipe):
    result = pipe.txt2img("a cat", **FAST)
    assert np.array_equal(pixels(result)[0], pixels(pipe.txt2img("a cat", seed=result.seeds[0], **FAST))[0])


def test_callback_sees_every_step(pipe):
    steps = []
    pipe.txt2img("a cat", sampler="Euler", seed=1, callback=steps.append, **FAST)
    assert [s["i"] for s in steps] == [0, 1, 2]
    sigmas = [float(s["sigma"]) for s in steps]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0
    for s in steps:
        assert s["x"].shape == s["denoised"].shape == (1, 4, 8, 8)


def test_return_latents_decode_to_the_images(pipe):
    plain = pipe.txt2img("a cat", seed=2, **FAST)
    result = pipe.txt2img("a cat", seed=2, return_latents=True, **FAST)
    assert plain.latents is None and result.latents.shape == (1, 4, 8, 8)
    images, notes = pipe.decode(result.latents)
    assert notes == [] and np.array_equal(np.asarray(images[0]), pixels(result)[0])


def _forbid_work(pipe, monkeypatch):
    """Make any text encoding or model call fail: checks must come before them."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline started work before checking its arguments")
    monkeypatch.setattr(pipe, "encode_prompt", refuse)
    monkeypatch.setattr(pipe.model.unet, "forward", refuse)


@pytest.mark.parametrize("size, flag, words", [
    (dict(width=72), "width 72", "multiple of 16"),  # not a multiple of the tiny model's 16
    (dict(height=40), "height 40", "between 64"),
    (dict(width=48), "width 48", "between 64"),
    (dict(height=4160), "height 4160", "and 4096"),  # a multiple of 16, but too large
    (dict(width=0), "width 0", "between 64"),  # not taken as "the default"
])
def test_bad_size_is_refused_before_any_work(pipe, monkeypatch, size, flag, words):
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(InputError, match=flag) as error:
        pipe.txt2img("a cat", **FAST, **size)
    assert words in str(error.value)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(n_iter=0), "n_iter must be >= 1"),
    (dict(sampler="no such sampler"), "unknown sampler 'no such sampler'"),
    (dict(schedule="sometimes"), "unknown schedule 'sometimes'"),
    (dict(sampler="Euler", eta=0.5), "eta"),  # Euler has no noise to scale
    (dict(eta=-1.0), "eta must be >= 0"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number"),
    (dict(seed=-2), "seed must be >= -1"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(prompt=["a", "b"], batch_size=3), "batch_size 3 differs from the 2 prompts"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompts"),
    (dict(stepz=3), r"unknown parameter\(s\) \['stepz'\]"),
])
def test_bad_arguments_are_refused_before_any_work(pipe, monkeypatch, kwargs, flag):
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(InputError, match=flag):
        pipe.txt2img(**(dict(prompt="a cat") | FAST | kwargs))


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan")])
def test_bad_strength_is_refused(pipe, monkeypatch, strength):
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(InputError, match="strength"):
        pipe.img2img(gradient(), "a cat", strength=strength, **FAST)


def test_bad_clip_skip_names_the_flag(pipe):
    with pytest.raises(InputError, match="clip_skip must be between 1 and 2"):
        pipe.txt2img("a cat", clip_skip=SD1.text.layers + 1, **FAST)
    with pytest.raises(InputError, match="clip_skip must be >= 1"):
        pipe.txt2img("a cat", clip_skip=0, **FAST)


def test_clip_skip_changes_the_conditioning(pipe):
    tokens = pipe.model.tokenizer(["a cat"])
    assert torch.equal(pipe.encode_prompt(["a cat"], clip_skip=2), pipe.model.text_encoder(tokens, layer=-2))
    one, two = (pipe.txt2img("a cat", seed=3, clip_skip=k, **FAST) for k in (1, 2))
    assert not np.array_equal(pixels(one)[0], pixels(two)[0])


def test_a_long_prompts_tail_changes_the_features(pipe, caplog):
    """Nothing is dropped any more: words past 75 tokens land in a second chunk, with no warning."""
    head = " ".join(["red"] * 80)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        zebra, cat = (pipe.encode_prompt([f"{head} {tail}"]) for tail in ("zebra giraffe", "cat dog"))
    assert not caplog.records
    assert zebra.shape == cat.shape == (1, 2 * 77, SD1.text.width)
    assert torch.equal(zebra[:, :77], cat[:, :77])  # the first chunk holds only "red"
    assert (zebra[:, 77:] - cat[:, 77:]).abs().max() > 1e-2


def test_cfg_pads_the_shorter_of_prompt_and_negative(pipe):
    long = " ".join(["red"] * 100)
    for prompt, negative in ((long, "blurry"), ("a cat", long)):
        result = pipe.txt2img(prompt, negative, seed=1, cfg_scale=7.0, **FAST)
        assert result.images[0].size == (64, 64)


def test_img2img_runs_and_keeps_the_size(pipe):
    image = gradient()
    result = pipe.img2img(image, "a cat", strength=0.6, seed=4, **FAST)
    assert result.images[0].size == (64, 64)
    with pytest.raises(InputError, match="runs no step"):  # int(3 * 0.2) == 0 steps
        pipe.img2img(image, "a cat", strength=0.2, **FAST)


@pytest.fixture()
def bf16_pipe(single_thread):
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.bfloat16)


def _nan_in_low_precision(vae, monkeypatch, always=False):
    decode = vae.decode

    def overflowing(z):  # what an fp16 VAE overflow looks like: NaN out, in the low-precision run only
        out = decode(z)
        return torch.full_like(out, float("nan")) if always or z.dtype != torch.float32 else out
    monkeypatch.setattr(vae, "decode", overflowing)


def test_vae_nan_in_low_precision_is_retried_in_fp32(bf16_pipe, monkeypatch):
    _nan_in_low_precision(bf16_pipe.model.vae, monkeypatch)
    result = bf16_pipe.txt2img("a cat", seed=1, **FAST)
    assert len(result.notes) == 1 and "retried in float32" in result.notes[0]
    assert np.asarray(result.images[0]).std() > 5  # a real image, not a black one
    assert next(bf16_pipe.model.vae.parameters()).dtype == torch.bfloat16  # back to bf16 after the retry


def test_vae_nan_even_in_fp32_raises(bf16_pipe, monkeypatch):
    _nan_in_low_precision(bf16_pipe.model.vae, monkeypatch, always=True)
    with pytest.raises(GenerationError, match="NaN"):
        bf16_pipe.txt2img("a cat", seed=1, **FAST)


def test_fp32_pipeline_does_not_retry(pipe, monkeypatch):
    _nan_in_low_precision(pipe.model.vae, monkeypatch, always=True)
    with pytest.raises(GenerationError, match="even in float32"):
        pipe.txt2img("a cat", seed=1, **FAST)


def test_sd2_v_model_runs_and_uses_v_prediction(single_thread):
    v_pipe = Pipeline(tiny_model(SD2_V), device="cpu", dtype=torch.float32)
    as_v = v_pipe.txt2img("a cat", "blurry", seed=1, **FAST)
    assert as_v.images[0].size == (64, 64) and np.asarray(as_v.images[0]).std() > 5
    v_pipe.model.config = dataclasses.replace(SD2_V, prediction="eps")
    as_eps = v_pipe.txt2img("a cat", "blurry", seed=1, **FAST)
    assert not np.array_equal(pixels(as_v)[0], pixels(as_eps)[0])
