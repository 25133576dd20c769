"""The hires fix against diffusers on the same tiny random weights: StableDiffusionPipeline returning latents,
the same upscale, then StableDiffusionImg2ImgPipeline from those latents.

diffusers' txt2img starts from our initial latents with its generator past our initial draw (as in
test_pipeline_parity.py). Its img2img gets a fresh generator seeded with the image's seed, so its added noise
is that generator's first draw, as ours (and A1111's) is. It runs the last int(steps * strength) steps of its
schedule where A1111 runs exactly `hr_second_pass_steps or steps` of a schedule of int(steps / min(strength,
0.999)); it is given that schedule length and a strength whose truncation is that step count.

Tolerances (images in [0, 1], fp32):
- latent upscalers: FLOAT_TOL = 1e-4, the suite's fp32 bound (same weights, noise and schedule: only
  kernel-order rounding remains).
- image upscalers: the first pass is rounded to uint8 before the resize, on each side; equal-within-1e-4
  floats can round to neighbouring integers, and that 1/255 step in an intermediate pixel goes through the
  encoder and the second pass. Bound 2/255 (the issue's), with the measured gap printed.
- uint8 images: at most 1 apart (2 for the image upscalers, from their float bound).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)
from PIL import Image
from tiny import SD1, SD2_V, tiny_model

from latentdiff.hires import LATENT_UPSCALERS
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT_TOL = 1e-4
CFG = 7.5
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry, low contrast"
SCHEDULERS = {"Euler": EulerDiscreteScheduler, "Euler a": EulerAncestralDiscreteScheduler}


@pytest.fixture(scope="module")
def pipes(request, tmp_path_factory, single_thread):
    model = tiny_model(request.param)
    folder = save_model(model, tmp_path_factory.mktemp("hires") / request.param.name)
    txt2img = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                      local_files_only=True)
    txt2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return Pipeline(model, device="cpu", dtype=torch.float32), txt2img, img2img, dict(txt2img.scheduler.config)


def use_scheduler(pipe, sampler, config):
    # "linspace": timesteps evenly from 999 to 0, our "normal" schedule (as test_pipeline_parity.py)
    pipe.scheduler = SCHEDULERS[sampler].from_config(config, timestep_spacing="linspace")
    return pipe.scheduler


def their_upscale(txt2img, latents, upscaler, size):
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        return F.interpolate(latents, size=(size // 8, size // 8), mode=mode, antialias=antialias)
    scale = txt2img.vae.config.scaling_factor
    with torch.no_grad():
        image = txt2img.image_processor.postprocess(txt2img.vae.decode(latents / scale).sample, output_type="pil")[0]
        pixels = txt2img.image_processor.preprocess(image.resize((size, size), Image.LANCZOS))
        return txt2img.vae.encode(pixels).latent_dist.mode() * scale


# (model, sampler, upscaler, steps, hires steps, strength); SD 2.x v-prediction on two of them, for time
@pytest.mark.parametrize("pipes, sampler, upscaler, steps, hr_steps, strength", [
    (SD1, "Euler", "Latent", 4, 0, 0.5),
    (SD1, "Euler a", "Latent (bicubic antialiased)", 3, 4, 0.7),  # diffusers' own count: int(5 * 0.7) = 3
    (SD1, "Euler", "Latent (nearest-exact)", 3, 2, 1.0),
    (SD1, "Euler a", "Lanczos", 3, 3, 0.6),
    (SD2_V, "Euler a", "Latent (bicubic antialiased)", 3, 4, 0.7),
    (SD2_V, "Euler", "Lanczos", 3, 2, 0.6),
], indirect=["pipes"], ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_hires_matches_diffusers(pipes, sampler, upscaler, steps, hr_steps, strength):
    ours, txt2img, img2img, config = pipes
    seed, starts = 13, []
    result = ours.txt2img(PROMPT, NEGATIVE, steps=steps, sampler=sampler, cfg_scale=CFG, seed=seed, enable_hr=True,
                          hr_upscaler=upscaler, hr_second_pass_steps=hr_steps, strength=strength, progress=False,
                          return_latents=True, callback=starts.append)
    assert result.images[0].size == (128, 128)

    x = starts[0]["x"]
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.randn(x.shape, generator=generator)  # our initial noise came from this draw
    scheduler = use_scheduler(txt2img, sampler, config)
    scheduler.set_timesteps(steps)
    low = txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                  latents=x / scheduler.init_noise_sigma, generator=generator, output_type="latent").images

    run = hr_steps or steps
    total = int(run / min(strength, 0.999))
    use_scheduler(img2img, sampler, config)
    their_steps = []
    out = img2img(PROMPT, image=their_upscale(txt2img, low, upscaler, 128), negative_prompt=NEGATIVE,
                  strength=min(1.0, (run + 0.5) / total), num_inference_steps=total, guidance_scale=CFG,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                  callback_on_step_end=lambda pipe, i, t, tensors: their_steps.append(i) or tensors).images[0]

    assert out.std() > 0.05, "reference image is nearly flat: the comparison would prove little"
    with torch.no_grad():
        decoded = ours.model.vae.decode(result.latents / ours.config.latent_scale)
    float_diff = ((decoded / 2 + 0.5).clamp(0, 1)[0] - out).abs().max().item()
    u8_diff = np.abs(np.asarray(result.images[0]).astype(int) - (out.permute(1, 2, 0).numpy() * 255).round())
    print(f"{ours.config.name} hires {sampler} {upscaler}: float {float_diff * 255:.4f}/255, uint8 max "
          f"{u8_diff.max():.0f}")
    image_upscaler = upscaler not in LATENT_UPSCALERS
    assert float_diff <= (2 / 255 if image_upscaler else FLOAT_TOL)
    assert u8_diff.max() <= (2 if image_upscaler else 1)
    assert len(starts) == steps + run and len(their_steps) == run  # the same second-pass steps on each side
