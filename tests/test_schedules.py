"""Timesteps and sigmas against diffusers' schedulers configured as SD 1.5 ships them."""

import dataclasses
import functools
import warnings

import diffusers
import pytest
import torch

from latentdiff.config import preset
from latentdiff.errors import InputError
from latentdiff.schedules import (alphas_cumprod_for, img2img_sigmas, make_sigmas, schedule_names, sigma_to_t,
                                  spaced_timesteps, spacing_options, training_sigmas)

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1)
STEPS = (1, 10, 20, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
ACP = alphas_cumprod_for(preset("sd1"))
TABLE = training_sigmas(ACP)

# How each diffusers scheduler family lays out timesteps, as make_sigmas options: what the pipeline passes.
SD = preset("sd1")  # steps_offset 1, set_alpha_to_one False, as SD ships them
K_STYLE = {sp: spacing_options(sp, "k", SD) for sp in SPACINGS}  # Euler, Heun, LMS, KDPM2
DDIM_STYLE = {sp: spacing_options(sp, "ddim", SD) for sp in SPACINGS}  # DDIM, PNDM
DDIM_TIMESTEPS = {sp: {k: v for k, v in opts.items() if k != "final_sigma"} for sp, opts in DDIM_STYLE.items()}
MULTISTEP_STYLE = {sp: spacing_options(sp, "multistep", SD) for sp in SPACINGS}  # DPMSolver, UniPC


def test_spacing_options():
    """steps_offset goes to leading only (diffusers' trailing and linspace ignore it); the rest by family."""
    assert MULTISTEP_STYLE == {"leading": dict(steps_offset=1, skip_lowest=True), "trailing": {},
                               "linspace": dict(skip_lowest=True, round_timesteps=True)}
    assert DDIM_STYLE == {"leading": dict(steps_offset=1, final_sigma="min"), "trailing": dict(final_sigma="min"),
                          "linspace": dict(round_timesteps=True)}  # its lowest timestep is 0: no step below
    assert K_STYLE == {"leading": dict(steps_offset=1), "trailing": {}, "linspace": {}}
    other = dataclasses.replace(SD, steps_offset=0, set_alpha_to_one=True)
    assert spacing_options("Leading", "k", other) == dict(steps_offset=0)
    assert spacing_options("leading", "ddim", dataclasses.replace(SD, steps_offset=0)) == dict(steps_offset=0)
    assert spacing_options("trailing", "ddim", other) == {} == spacing_options("trailing", "ddpm", SD)
    assert spacing_options("leading-karras", "k", SD) == dict(steps_offset=1)
    assert spacing_options("karras", "multistep", SD) == {} == spacing_options("normal", "ddim", SD)


@functools.cache  # constructing KDPM2 costs ~1 s; every test calls set_timesteps before reading one
def scheduler(cls, spacing, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**SD15, timestep_spacing=spacing, **kwargs)


def test_alphas_cumprod_equal_diffusers():
    assert torch.equal(ACP, scheduler(diffusers.DDIMScheduler, "leading").alphas_cumprod)
    assert torch.equal(TABLE, scheduler(diffusers.EulerDiscreteScheduler, "leading").sigmas[:-1].flip(0))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_and_pndm(spacing, steps):
    ddim = scheduler(diffusers.DDIMScheduler, spacing, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(steps)
    ours = spaced_timesteps(spacing, steps, **DDIM_TIMESTEPS[spacing])
    assert torch.equal(ddim.timesteps, ours.long())

    pndm = scheduler(diffusers.PNDMScheduler, spacing, skip_prk_steps=True, set_alpha_to_one=False)
    pndm.set_timesteps(steps)
    # PLMS calls the model twice at the second timestep (its warm-up step); the distinct timesteps match
    assert torch.equal(pndm.timesteps.unique_consecutive(), ours.long())

    # DDIM steps from t to t - T // steps (to alphas_cumprod[0] below 0, set_alpha_to_one=False). For
    # leading and trailing with these step counts that is the next timestep, and our sigmas are those
    # of DDIM's steps. linspace timesteps are not T // steps apart: diffusers' DDIM then lands between
    # timesteps, which no sigma list expresses (test_samplers_ode bounds that gap).
    if spacing != "linspace":
        prev = ddim.timesteps - 1000 // steps
        alpha_prev = torch.where(prev >= 0, ACP[prev.clamp(min=0)], ddim.final_alpha_cumprod)
        sigmas = make_sigmas(spacing, steps, ACP, **DDIM_STYLE[spacing])  # ending at the smallest sigma
        assert torch.equal(sigmas[:-1], TABLE[ddim.timesteps])
        assert torch.equal(sigmas[1:], ((1 - alpha_prev) / alpha_prev) ** 0.5)


def distinct(sigmas, cls):
    """Heun and KDPM2 store each sigma twice (two model calls per step); keep one of each."""
    if cls is diffusers.HeunDiscreteScheduler:
        return torch.cat([sigmas[:1], sigmas[1::2]])
    if cls is diffusers.KDPM2DiscreteScheduler:
        return torch.cat([sigmas[:1], sigmas[1:-1:2]])
    return sigmas


K_SCHEDULERS = [diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler, diffusers.LMSDiscreteScheduler,
                diffusers.KDPM2DiscreteScheduler]


@pytest.mark.parametrize("cls", K_SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_k_style_schedulers(cls, spacing, steps):
    sched = scheduler(cls, spacing)
    sched.set_timesteps(steps)
    ours = make_sigmas(spacing, steps, ACP, **K_STYLE[spacing])
    assert torch.equal(distinct(sched.sigmas, cls), ours)
    timesteps = spaced_timesteps(spacing, steps, **K_STYLE[spacing]).float()
    assert torch.equal(sched.timesteps[:: 1 if cls in K_SCHEDULERS[::2] else 2], timesteps)


@pytest.mark.parametrize("variant", ["karras", "exponential"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS[1:])  # diffusers' karras ramp divides by steps - 1
def test_euler_karras_exponential(variant, spacing, steps):
    sched = scheduler(diffusers.EulerDiscreteScheduler, spacing, **{f"use_{variant}_sigmas": True})
    sched.set_timesteps(steps)
    # Euler-style schedulers span the spacing's own sigma range, not the training range
    spaced = make_sigmas(spacing, steps, ACP, **K_STYLE[spacing])
    ours = make_sigmas(variant, steps, ACP, sigma_min=spaced[-2], sigma_max=spaced[0])
    assert torch.equal(sched.sigmas, ours)
    # Their timesteps come from float64 numpy; ours from float32: 1e-3 of a step is float32 round-off
    # at t ~ 1000 amplified by the log-sigma slope, far below what moves a timestep embedding.
    t = sigma_to_t(ours[:-1], TABLE.log())
    assert (sched.timesteps - t).abs().max() < 1e-3


@pytest.mark.parametrize("cls", K_SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", STEPS[1:])
def test_spaced_karras(cls, spacing, steps):
    """k-style schedulers with use_karras_sigmas span the spacing's sigma range: leading_karras,
    trailing_karras (linspace's range is the training one: plain karras, test_euler_karras_exponential)."""
    sched = scheduler(cls, spacing, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    ours = make_sigmas(f"{spacing}_karras", steps, ACP, **spacing_options(f"{spacing}_karras", "k", SD))
    assert torch.equal(distinct(sched.sigmas, cls), ours)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 13, 50])
def test_lcm_schedule(steps):
    sched = scheduler(diffusers.LCMScheduler, "leading")
    sched.set_timesteps(steps)
    assert torch.equal(make_sigmas("lcm", steps, ACP)[:-1], TABLE[sched.timesteps])


@pytest.mark.parametrize("cls", [diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_multistep_schedulers(cls, spacing, steps):
    sched = scheduler(cls, spacing)
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, spaced_timesteps(spacing, steps, **MULTISTEP_STYLE[spacing]).long())
    assert torch.equal(sched.sigmas, make_sigmas(spacing, steps, ACP, **MULTISTEP_STYLE[spacing]))


@pytest.mark.parametrize("cls", [diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", STEPS[1:])
def test_multistep_karras(cls, steps):
    sched = scheduler(cls, "leading", use_karras_sigmas=True)
    sched.set_timesteps(steps)
    ours = make_sigmas("karras", steps, ACP)  # these span the training range
    assert torch.equal(sched.sigmas, ours)
    # ... and feed the model the nearest integer timestep: quantize=True
    assert torch.equal(sched.timesteps, sigma_to_t(ours[:-1], TABLE.log(), quantize=True).long())


def test_normal_and_friends_shape():
    for name in schedule_names():
        for steps in STEPS:
            sigmas = make_sigmas(name, steps, ACP)
            assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
            assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all()), (name, steps)


def test_normal_sgm_simple_values():
    def close(a, b):  # float64 log/exp round trips: a few float32 ulps
        return torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0)

    def geometric_mean(t):  # sigma at t + 1/2 interpolated in log space
        return (TABLE[t].double() * TABLE[t + 1].double()).sqrt()

    # normal: t = 999, 666, 333, 0, sigma interpolated in log space
    assert close(make_sigmas("normal", 4, ACP)[:-1], TABLE[[999, 666, 333, 0]])
    assert close(make_sigmas("normal", 3, ACP)[1], geometric_mean(499))  # t = 499.5
    # sgm_uniform: 5 timesteps evenly from 999 to 0, the one at 0 left out (999, 749.25, 499.5, 249.75)
    assert close(make_sigmas("sgm_uniform", 4, ACP)[2], geometric_mean(499))
    assert close(make_sigmas("sgm_uniform", 4, ACP)[0], TABLE[999])
    # simple: every 250th training sigma from the top; ddim_uniform: 1 + 250 i
    assert torch.equal(make_sigmas("simple", 4, ACP)[:-1], TABLE[[999, 749, 499, 249]])
    assert torch.equal(make_sigmas("ddim_uniform", 4, ACP)[:-1], TABLE[[751, 501, 251, 1]])


def test_karras_formula_and_range():
    sigmas = make_sigmas("karras", 3, ACP, sigma_min=0.1, sigma_max=10.0, rho=7.0).double()
    mid = ((10 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    assert torch.allclose(sigmas, torch.tensor([10.0, mid, 0.1, 0.0], dtype=torch.float64), rtol=1e-6)
    exp = make_sigmas("exponential", 3, ACP, sigma_min=0.1, sigma_max=10.0).double()
    assert torch.allclose(exp, torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64), rtol=1e-6)


def test_final_sigma_min():
    sigmas = make_sigmas("karras", 5, ACP, final_sigma="min")
    assert sigmas[-1] == TABLE[0] and torch.equal(sigmas[:-1], make_sigmas("karras", 5, ACP)[:-1])


@pytest.mark.parametrize("steps,strength,run", [(20, 0.75, 15), (10, 0.29, 2), (50, 1.0, 50), (4, 0.3, 1)])
def test_img2img_sigmas(steps, strength, run):
    sigmas = make_sigmas("karras", steps, ACP)
    tail = img2img_sigmas(sigmas, strength)
    # diffusers runs the last int(steps * strength) steps: int(10 * 0.29) = int(2.9) = 2
    assert len(tail) == run + 1 and torch.equal(tail, sigmas[-run - 1:])


def test_sigma_to_t_matches_diffusers():
    euler = scheduler(diffusers.EulerDiscreteScheduler, "leading")
    log_sigmas = TABLE.log().numpy()
    probe = torch.tensor([14.6, 10.0, 3.3, 1.0, 0.5, 0.1, 0.03, 0.001, 20.0])
    theirs = torch.tensor([float(euler._sigma_to_t(s, log_sigmas)) for s in probe.double().numpy()])
    assert (sigma_to_t(probe, TABLE.log()).double() - theirs.double()).abs().max() < 1e-3  # float32 vs float64
    assert torch.equal(sigma_to_t(TABLE[[5, 500, 999]], TABLE.log()), torch.tensor([5.0, 500.0, 999.0]))


def test_errors():
    with pytest.raises(InputError, match="unknown schedule 'karas'.*karras"):
        make_sigmas("karas", 10, ACP)
    with pytest.raises(InputError, match="steps must be an integer from 1 to 1000"):
        make_sigmas("normal", 0, ACP)
    with pytest.raises(InputError, match="does not take option.*steps_offset"):
        make_sigmas("karras", 10, ACP, steps_offset=1)
    with pytest.raises(InputError, match="lcm schedule takes at most 50 steps"):
        make_sigmas("lcm", 51, ACP)
    with pytest.raises(InputError, match="final_sigma"):
        make_sigmas("normal", 10, ACP, final_sigma="one")
    with pytest.raises(InputError, match="sigma_min < sigma_max"):
        make_sigmas("karras", 10, ACP, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(InputError, match=r"strength must be in \(0, 1\]"):
        img2img_sigmas(make_sigmas("normal", 10, ACP), 1.5)
    with pytest.raises(InputError, match="runs no step.*raise --steps or --strength"):
        img2img_sigmas(make_sigmas("normal", 10, ACP), 0.05)
