"""End to end against diffusers: the same tiny random weights give the same images.

Our model is written as a diffusers folder and loaded by StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline. Each diffusers scheduler is configured to the convention of our sampler and
its default schedule, starts from our initial latents, and draws its noise from a generator in the state
ours is in at that point, so any difference left is arithmetic.

Tolerances (images in [0, 1], fp32):
- FLOAT_TOL = 1e-4: the suite's fp32 bound. With the same schedule, noise and weights only kernel-order
  rounding remains (measured at most 9e-6, i.e. 0.0022/255).
- DPM++ 2M Karras: diffusers rounds each karras sigma's timestep to an integer before calling the U-Net;
  ours, like k-diffusion, A1111 and ComfyUI, feeds the fractional timestep. That changes the network's input
  by up to half a timestep, so the bound is 2/255 (measured at most 1.33/255). A run with our
  timesteps rounded the same way is held to FLOAT_TOL, which shows the gap is only that convention.
- uint8 images: at most 1 apart, since equal-within-FLOAT_TOL floats can still round to neighbouring
  integers (2 for the DPM++ 2M Karras case, from its float bound).
"""

import functools

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from PIL import Image
from tiny import SD1, SD2_V, tiny_model

import latentdiff.pipeline as pipeline_module
from latentdiff.denoisers import DiscreteDenoiser
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT_TOL = 1e-4
STEPS = 6
CFG = 7.5
# No "!" in prompts: our SD 2.x tokenizer keeps it as text (as OpenCLIP does); diffusers' pads with it.
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry, low contrast"

# sampler name -> (diffusers scheduler, settings that match our sampler + default schedule, state space).
# "sigma": the scheduler keeps x0 + sigma * noise, as ours does; "vp": sqrt(alpha) * (x0 + sigma * noise).
SCHEDULERS = {
    # "normal": timesteps evenly from 999 to 0 (ours interpolates sigma in log space, diffusers linearly:
    # sigmas differ by at most 2e-6 relative at these fractional timesteps)
    "Euler": (EulerDiscreteScheduler, dict(timestep_spacing="linspace"), "sigma"),
    "Euler a": (EulerAncestralDiscreteScheduler, dict(timestep_spacing="linspace"), "sigma"),
    # "ddim_uniform": timesteps 1, 1 + 1000 // steps, ...; our schedule ends at sigma 0 (alpha 1)
    "DDIM": (DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True,
                                 clip_sample=False), "vp"),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                          use_karras_sigmas=True, final_sigmas_type="zero"), "vp"),
}
ROUNDED_TIMESTEPS = {"DPM++ 2M Karras"}


@pytest.fixture(scope="module", params=[SD1, SD2_V], ids=["sd1", "sd2-v"])
def pipes(request, tmp_path_factory, single_thread):
    config = request.param
    model = tiny_model(config)
    folder = save_model(model, tmp_path_factory.mktemp("parity") / config.name)
    ours = Pipeline(model, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                     local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    # the folder's own scheduler config (training betas, prediction type): each test's scheduler starts from
    # it, never from a previous test's settings (a karras flag would carry over into Euler)
    theirs.folder_scheduler_config = img2img.folder_scheduler_config = dict(theirs.scheduler.config)
    return ours, theirs, img2img


def use_scheduler(pipe, sampler):
    cls, settings, _ = SCHEDULERS[sampler]
    pipe.scheduler = cls.from_config(pipe.folder_scheduler_config, **settings)
    return pipe.scheduler


def init_image() -> Image.Image:
    """A smooth colour gradient with a dark square: structure the VAE has to keep."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    rgb = np.stack([x, y, 1 - x * y], axis=-1)
    rgb[20:44, 20:44] *= 0.2
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def our_float_image(ours: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's decode before uint8 rounding, in diffusers' [0, 1] output convention."""
    with torch.no_grad():
        decoded = ours.model.vae.decode(latents / ours.config.latent_scale)
    return (decoded / 2 + 0.5).clamp(0, 1)[0]


def compare(label, ours, result, theirs_pt, float_tol, uint8_tol):
    theirs = theirs_pt[0]
    assert theirs.std() > 0.05, "reference image is nearly flat: the comparison would prove little"
    float_diff = (our_float_image(ours, result.latents) - theirs).abs().max().item()
    ours_u8 = np.asarray(result.images[0]).astype(int)
    theirs_u8 = (theirs.permute(1, 2, 0).numpy() * 255).round().astype(int)
    u8_diff = np.abs(ours_u8 - theirs_u8)
    print(f"{label}: float {float_diff * 255:.4f}/255, uint8 max {u8_diff.max()}, "
          f"{(u8_diff > 0).mean():.2%} of values differ")
    assert float_diff <= float_tol
    assert u8_diff.max() <= uint8_tol


def tolerances(sampler):
    return (2 / 255, 2) if sampler in ROUNDED_TIMESTEPS else (FLOAT_TOL, 1)


def run_txt2img(ours, theirs, sampler, seed, ours_kwargs=None, theirs_kwargs=None):
    """Ours, then diffusers from our first x and with its generator past our initial-noise draw."""
    scheduler = use_scheduler(theirs, sampler)
    steps = []
    result = ours.txt2img(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, cfg_scale=CFG, seed=seed,
                          progress=False, return_latents=True, callback=steps.append, **(ours_kwargs or {}))
    x, sigma = steps[0]["x"], steps[0]["sigma"]
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.randn(x.shape, generator=generator)  # our initial noise came from this draw
    if SCHEDULERS[sampler][2] == "vp":
        x = x / (sigma**2 + 1) ** 0.5
    scheduler.set_timesteps(STEPS)  # init_noise_sigma depends on the schedule
    text = theirs_kwargs or dict(prompt=PROMPT, negative_prompt=NEGATIVE)
    out = theirs(**text, num_inference_steps=STEPS, guidance_scale=CFG, latents=x / scheduler.init_noise_sigma,
                 generator=generator, output_type="pt")
    return result, out.images


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(pipes, sampler):
    ours, theirs, _ = pipes
    result, images = run_txt2img(ours, theirs, sampler, seed=3)
    compare(f"{ours.config.name} txt2img {sampler}", ours, result, images, *tolerances(sampler))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(pipes, sampler, strength):
    ours, _, theirs = pipes
    use_scheduler(theirs, sampler)
    seed = 11
    result = ours.img2img(init_image(), "a green tree", NEGATIVE, strength=strength, steps=STEPS, sampler=sampler,
                          cfg_scale=CFG, seed=seed, progress=False, return_latents=True)
    # diffusers draws the posterior sample, the added noise and the step noise from one generator in that
    # order, as ours does per image
    out = theirs("a green tree", image=init_image(), negative_prompt=NEGATIVE, strength=strength,
                 num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="pt")
    compare(f"{ours.config.name} img2img {strength} {sampler}", ours, result, out.images, *tolerances(sampler))


def test_rounded_timesteps_close_the_dpm_gap(pipes, monkeypatch):
    """With our timesteps rounded as diffusers rounds them, DPM++ 2M Karras agrees to FLOAT_TOL too."""
    ours, theirs, _ = pipes
    monkeypatch.setattr(pipeline_module, "DiscreteDenoiser", functools.partial(DiscreteDenoiser, quantize=True))
    result, images = run_txt2img(ours, theirs, "DPM++ 2M Karras", seed=3)
    compare(f"{ours.config.name} txt2img DPM++ 2M Karras, rounded timesteps", ours, result, images, FLOAT_TOL, 1)


def skipped_clip_features(theirs, prompt, skip):
    """transformers' hidden state `skip` layers before the last, with the final layer norm: A1111's clip skip
    skip + 1, and what diffusers' clip_skip=skip computes. diffusers' own path cannot be used here: under
    transformers 5 it looks for `text_encoder.text_model`, which no longer exists, and it leaves the
    negative prompt unskipped, where ours (as A1111) skips both."""
    tokens = theirs.tokenizer([prompt], padding="max_length", max_length=theirs.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = theirs.text_encoder(tokens, output_hidden_states=True).hidden_states[-(skip + 1)]
        return theirs.text_encoder.final_layer_norm(hidden)


def test_clip_skip_matches_diffusers(pipes):
    """Ours counts clip skip as A1111 (1 = the model's own layer); diffusers' clip_skip=k is our k + 1."""
    ours, theirs, _ = pipes
    embeds = dict(prompt_embeds=skipped_clip_features(theirs, PROMPT, 1),
                  negative_prompt_embeds=skipped_clip_features(theirs, NEGATIVE, 1))
    result, images = run_txt2img(ours, theirs, "Euler", seed=5, ours_kwargs=dict(clip_skip=2), theirs_kwargs=embeds)
    compare(f"{ours.config.name} txt2img Euler clip skip 2", ours, result, images, FLOAT_TOL, 1)


def test_diffusers_reads_prompt_length_from_folder(tmp_path):
    folder = save_model(tiny_model(SD1), tmp_path / "folder")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                     local_files_only=True)
    assert theirs.tokenizer.model_max_length == SD1.text.max_length
