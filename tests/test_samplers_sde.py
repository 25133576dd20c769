"""The stochastic samplers against diffusers' schedulers, configured as SD 1.5 ships them.

Both sides run the same tiny deterministic network from the same initial noise with equally seeded
generators; diffusers is driven as its pipelines drive it (init_noise_sigma, scale_model_input,
step(..., generator=g)). The sigmas come from the diffusers scheduler itself and a local wrapper turns
the network into a denoiser, so this file does not depend on schedules.py, nor on denoisers.py apart
from one test that runs the package's denoiser through the same comparisons.

Two spaces: our samplers (and diffusers' Euler-type schedulers) carry x = x0 + sigma * noise; the
VP schedulers (DDPM, LCM, DPM-Solver) carry x * alpha with alpha = 1 / sqrt(sigma^2 + 1) and start from
plain noise, so our start is noise * sqrt(sigma_0^2 + 1). At sigma = 0 both spaces agree.
"""

import copy
import functools
import math
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
)

from latentdiff import sampling_stochastic as ss
from latentdiff.errors import InputError

SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)
# fp32 on both sides, O(1) latents, <= 20 steps: the two sides differ only by rounding order (~1e-6).
TOL = 1e-4
PREDICTIONS = ["epsilon", "v_prediction"]
SHAPE = (2, 4, 8, 8)


def make(cls, prediction, **overrides):
    """A fresh diffusers scheduler with SD 1.5's training schedule (keys a class lacks are ignored by
    from_config). Built once per configuration and copied: some constructors take ~1 s here."""
    return copy.deepcopy(_built(cls, prediction, tuple(sorted(overrides.items()))))


@functools.cache
def _built(cls, prediction, overrides):
    return cls.from_config({**SD15, "prediction_type": prediction, **dict(overrides)})


class TinyNet:
    """A fixed smooth function of (x, t) standing in for the U-Net: a seeded channel mix and a
    neighbour shift through tanh, plus a per-channel timestep bias. One timestep of error moves the
    output by ~1e-3, far above TOL, so a wrong or unrounded timestep shows. Broadcast arithmetic only
    (no conv/BLAS): on this shared 2-core machine threaded kernels cost 20x more than the work."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = (torch.randn(4, 4, generator=g) * 0.4)[None, :, :, None, None]
        self.phase = (torch.rand(4, generator=g) * 2 * math.pi)[None, :, None, None]

    def __call__(self, x, t):
        t = float(t)
        mixed = (self.mix * x[:, None]).sum(2) + 0.3 * torch.roll(x, 1, dims=-1)
        return 0.8 * x + 0.3 * torch.tanh(mixed + 0.5 * torch.sin(t / 40 + self.phase))


class Denoiser:
    """Test-only eps/v network -> sigma-space denoiser: input scaled by 1/sqrt(sigma^2+1); sigma -> timestep
    by linear interpolation of log sigma over the training table (diffusers' _sigma_to_t). `quantize`
    rounds the timestep, as DPMSolverMultistepScheduler does for Karras sigmas."""

    def __init__(self, net, scheduler, quantize=False):
        alphas_cumprod = scheduler.alphas_cumprod.double()
        self.log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().numpy()
        self.net, self.quantize = net, quantize
        self.prediction = scheduler.config.prediction_type

    def timestep(self, sigma):
        t = float(np.interp(math.log(float(sigma)), self.log_sigmas, np.arange(len(self.log_sigmas))))
        return round(t) if self.quantize else t

    def __call__(self, x, sigma):
        sigma = float(sigma)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        out = self.net(x * c_in, self.timestep(sigma))
        if self.prediction == "epsilon":
            return x - sigma * out
        return x * c_in**2 - out * (sigma * c_in)


def initial_noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, net, noise, seed):
    """The pipelines' loop; the scheduler must already have its timesteps set. seed=None: a scheduler
    whose step() takes no generator."""
    step_kwargs = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def sigma_space_sigmas(scheduler):
    """Euler-type schedulers list each sigma twice when a step makes two model calls."""
    return torch.unique_consecutive(scheduler.sigmas.float())


def vp_sigmas(scheduler):
    """DDPM/LCM keep timesteps only: sigma = sqrt((1 - abar) / abar) at each, then 0."""
    abar = scheduler.alphas_cumprod.double()[scheduler.timesteps]
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


def vp_start(sigmas):
    """Our starting scale for a VP scheduler's plain-noise start: 1 / alpha at sigmas[0]."""
    return math.sqrt(float(sigmas[0]) ** 2 + 1)


def run_ours(sampler, denoiser, noise, sigmas, start, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return sampler(denoiser, noise * float(start), sigmas, generator=g, **kwargs)


def max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_a_matches_euler_ancestral(prediction, spacing):
    net, noise = TinyNet(), initial_noise()
    sched = make(EulerAncestralDiscreteScheduler, prediction, timestep_spacing=spacing)
    sched.set_timesteps(15)
    start = sched.init_noise_sigma
    ours = run_ours(ss.sample_euler_a, Denoiser(net, sched), noise, sigma_space_sigmas(sched), start, 7)
    theirs = run_diffusers(sched, net, noise, 7)
    assert max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_a_eta0_is_deterministic_euler(prediction):
    net, noise = TinyNet(), initial_noise()
    sched = make(EulerDiscreteScheduler, prediction)
    sched.set_timesteps(12)
    start = sched.init_noise_sigma
    ours = run_ours(ss.sample_euler_a, Denoiser(net, sched), noise, sigma_space_sigmas(sched), start, 1, eta=0.0)
    assert max_diff(ours, run_diffusers(sched, net, noise, 1)) <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpm2_a_matches_kdpm2_ancestral(prediction, spacing):
    net, noise = TinyNet(), initial_noise()
    sched = make(KDPM2AncestralDiscreteScheduler, prediction, timestep_spacing=spacing)
    sched.set_timesteps(10)
    start = sched.init_noise_sigma
    ours = run_ours(ss.sample_dpm2_a, Denoiser(net, sched), noise, sigma_space_sigmas(sched), start, 3)
    assert max_diff(ours, run_diffusers(sched, net, noise, 3)) <= TOL


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_sde_matches_sde_dpmsolverpp(prediction, karras, solver_type):
    net, noise = TinyNet(), initial_noise()
    sched = make(
        DPMSolverMultistepScheduler,
        prediction,
        algorithm_type="sde-dpmsolver++",
        solver_type=solver_type,
        use_karras_sigmas=karras,
    )
    sched.set_timesteps(15)
    # With Karras sigmas diffusers feeds the U-Net the rounded timestep but solves with the exact sigma.
    denoiser = Denoiser(net, sched, quantize=karras)
    sigmas = sched.sigmas.float()
    ours = run_ours(ss.sample_dpmpp_2m_sde, denoiser, noise, sigmas, vp_start(sigmas), 11, solver_type=solver_type)
    assert max_diff(ours, run_diffusers(sched, net, noise, 11)) <= TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2m_sde_eta0_is_deterministic_dpmpp_2m(prediction):
    net, noise = TinyNet(), initial_noise()
    sched = make(DPMSolverMultistepScheduler, prediction, algorithm_type="dpmsolver++")
    sched.set_timesteps(12)
    sigmas = sched.sigmas.float()
    ours = run_ours(ss.sample_dpmpp_2m_sde, Denoiser(net, sched), noise, sigmas, vp_start(sigmas), 0, eta=0.0)
    assert max_diff(ours, run_diffusers(sched, net, noise, 0)) <= TOL


def test_dpmpp_2m_sde_schedule_ending_at_sigma_min():
    """final_sigmas_type="sigma_min" stops at the smallest training sigma; with >= 15 steps diffusers keeps
    the second-order update on the last step too, as our loop does. Its output is VP-scaled."""
    net, noise = TinyNet(), initial_noise()
    sched = make(
        DPMSolverMultistepScheduler, "epsilon", algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"
    )
    sched.set_timesteps(16)
    sigmas = sched.sigmas.float()
    assert sigmas[-1] > 0
    ours = run_ours(ss.sample_dpmpp_2m_sde, Denoiser(net, sched), noise, sigmas, vp_start(sigmas), 5)
    ours_vp = ours / math.sqrt(float(sigmas[-1]) ** 2 + 1)
    assert max_diff(ours_vp, run_diffusers(sched, net, noise, 5)) <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_matches_ddpm_scheduler(prediction, spacing):
    """diffusers adds noise with std sqrt(1e-20) on the last step (its variance clamp); ours adds none: 1e-10."""
    net, noise = TinyNet(), initial_noise()
    sched = make(DDPMScheduler, prediction, timestep_spacing=spacing)
    sched.set_timesteps(20)
    sigmas = vp_sigmas(sched)
    ours = run_ours(ss.sample_ddpm, Denoiser(net, sched), noise, sigmas, vp_start(sigmas), 2)
    assert max_diff(ours, run_diffusers(sched, net, noise, 2)) <= TOL


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_lcm_matches_lcm_scheduler(prediction, steps):
    """diffusers' step also applies LCM's boundary scalings (c_skip = 0.25 / ((10 t)^2 + 0.25)), which belong
    to an LCM model's denoiser; at these timesteps (t >= 139) they move the result by < 1e-6 (measured)."""
    net, noise = TinyNet(), initial_noise()
    sched = make(LCMScheduler, prediction)
    sched.set_timesteps(steps)
    sigmas = vp_sigmas(sched)
    ours = run_ours(ss.sample_lcm, Denoiser(net, sched), noise, sigmas, vp_start(sigmas), 4)
    assert max_diff(ours, run_diffusers(sched, net, noise, 4)) <= TOL


@pytest.fixture
def dpmsolver_sde_scheduler(monkeypatch):
    """diffusers' DPMSolverSDEScheduler imports torchsde at module level only for its Brownian tree.
    torchsde is not installed, so an empty stand-in module satisfies the import; every test below
    replaces the tree with our noise sampler before the first step, so the stand-in is never used."""
    try:
        import torchsde  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler

    return DPMSolverSDEScheduler


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_sde_matches_dpmsolver_sde_given_the_same_noise(dpmsolver_sde_scheduler, prediction, karras):
    """The noise source is the one documented difference (torchsde's Brownian tree there, our seeded
    brownian_noise_sampler here), so diffusers gets an equally seeded copy of ours in place of its tree;
    it queries it with the same intervals in the same order, and everything else must match exactly."""
    net, noise = TinyNet(), initial_noise()
    sched = make(dpmsolver_sde_scheduler, prediction, use_karras_sigmas=karras)
    sched.set_timesteps(10)
    sched.noise_sampler = ss.brownian_noise_sampler(noise, torch.Generator().manual_seed(9))
    start = sched.init_noise_sigma
    ours = run_ours(ss.sample_dpmpp_sde, Denoiser(net, sched), noise, sigma_space_sigmas(sched), start, 9)
    theirs = run_diffusers(sched, net, noise, None)
    assert max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_2s_a_eta0_matches_singlestep_dpmsolverpp(prediction):
    """diffusers has no noise-compatible DPM++ 2S ancestral (see the sampler's docstring), so the solver
    core is checked with eta = 0: DPMSolverSinglestep (dpmsolver++, order 2) over a table holding the
    log-midpoint between each pair of our sigmas takes the same steps as our 2S with r = 1/2. The last
    step (onto 0) is first order on both sides. The ancestral split is shared with euler_a and dpm2_a,
    which match diffusers above; the noise level is checked by the Gaussian test below."""
    net, noise = TinyNet(), initial_noise()
    base = make(EulerDiscreteScheduler, prediction)
    base.set_timesteps(8)
    sigmas = sigma_space_sigmas(base)
    denoiser = Denoiser(net, base)

    table = []
    for s, s_next in zip(sigmas[:-2].tolist(), sigmas[1:-1].tolist()):
        table += [s, math.sqrt(s * s_next)]
    table += [sigmas[-2].item(), 0.0]
    sched = make(DPMSolverSinglestepScheduler, prediction, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(len(table) - 1)
    assert sched.order_list == [1, 2] * (len(sigmas) - 2) + [1], "diffusers changed its singlestep order plan"
    sched.sigmas = torch.tensor(table, dtype=torch.float32)
    sched.timesteps = torch.tensor([denoiser.timestep(s) for s in table[:-1]], dtype=torch.float64)

    ours = run_ours(ss.sample_dpmpp_2s_a, denoiser, noise, sigmas, vp_start(sigmas), 0, eta=0.0)
    assert max_diff(ours, run_diffusers(sched, net, noise, 0)) <= TOL


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parity_through_the_package_denoiser(prediction):
    """The same comparisons with latentdiff.denoisers.DiscreteDenoiser in place of the local wrapper: the
    two modules agree on the denoiser interface (one 0-dim sigma per call)."""
    from latentdiff.denoisers import DiscreteDenoiser

    net, noise = TinyNet(), initial_noise()
    short = "eps" if prediction == "epsilon" else "v"

    def model(x, t, context):
        return net(x, t[0])

    sched = make(KDPM2AncestralDiscreteScheduler, prediction)
    sched.set_timesteps(10)
    denoiser = DiscreteDenoiser(model, sched.alphas_cumprod, prediction=short)
    ours = run_ours(ss.sample_dpm2_a, denoiser, noise, sigma_space_sigmas(sched), sched.init_noise_sigma, 3)
    assert max_diff(ours, run_diffusers(sched, net, noise, 3)) <= TOL

    sched = make(DPMSolverMultistepScheduler, prediction, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    sched.set_timesteps(15)
    denoiser = DiscreteDenoiser(model, sched.alphas_cumprod, prediction=short, quantize=True)
    sigmas = sched.sigmas.float()
    ours = run_ours(ss.sample_dpmpp_2m_sde, denoiser, noise, sigmas, vp_start(sigmas), 11)
    assert max_diff(ours, run_diffusers(sched, net, noise, 11)) <= TOL


# ------------------------------------------------------------------------- distribution (exact denoiser)

GAUSS_MEAN, GAUSS_STD = 0.3, 0.5


def gaussian_denoiser(x, sigma):
    """Exact E[x0 | x] for data N(GAUSS_MEAN, GAUSS_STD^2) observed with noise of std sigma."""
    return (GAUSS_STD**2 * x + sigma**2 * GAUSS_MEAN) / (GAUSS_STD**2 + sigma**2)


def gaussian_run(sampler, steps, noise_sampler_for=None, **kwargs):
    """Sample the 1-D Gaussian data (20000 samples) with its exact denoiser, starting from the exact
    marginal at sigma_max, so only the sampler's own error and sampling noise remain."""
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.03), steps)), torch.zeros(1)])
    g = torch.Generator().manual_seed(0)
    x = GAUSS_MEAN + torch.randn(20000, generator=g) * math.sqrt(GAUSS_STD**2 + sigmas[0].item() ** 2)
    if noise_sampler_for is not None:
        kwargs["noise_sampler"] = noise_sampler_for(x, g)
    return sampler(gaussian_denoiser, x, sigmas, generator=g, **kwargs)


@pytest.mark.parametrize(
    "sampler, kwargs, steps, std_tol",
    [
        # first order: the std is ~0.016 low at 100 steps (measured), halving as steps double
        (ss.sample_euler_a, {}, 100, 0.025),
        (ss.sample_ddpm, {}, 100, 0.025),
        # second order: within ~0.004 at 50 steps (measured)
        (ss.sample_dpm2_a, {}, 50, 0.012),
        (ss.sample_dpmpp_2s_a, {}, 50, 0.012),
        (ss.sample_dpmpp_2s_a, {"eta": 0.5}, 50, 0.012),
        (ss.sample_dpmpp_sde, {}, 50, 0.012),
        (ss.sample_dpmpp_2m_sde, {}, 50, 0.012),
        (ss.sample_dpmpp_2m_sde, {"solver_type": "heun"}, 50, 0.012),
    ],
)
def test_samplers_reach_the_data_distribution(sampler, kwargs, steps, std_tol):
    """Covers what has no exact reference (2S ancestral's noise, dpmpp_sde's seeded noise). Data
    N(0.3, 0.5^2), 20000 samples: standard errors 0.0035 (mean) and 0.0025 (std)."""
    out = gaussian_run(sampler, steps, **kwargs)
    assert abs(out.mean().item() - GAUSS_MEAN) < 0.015
    assert abs(out.std().item() - GAUSS_STD) < std_tol


def test_dpmpp_sde_needs_correlated_substep_noise():
    """Why dpmpp_sde defaults to brownian_noise_sampler: with two independent draws per step the samples'
    std comes out ~0.03 low at 50 steps (measured), with the correlated draws within ~0.004."""
    independent = gaussian_run(ss.sample_dpmpp_sde, 50, noise_sampler_for=ss.default_noise_sampler)
    correlated = gaussian_run(ss.sample_dpmpp_sde, 50)
    assert GAUSS_STD - independent.std().item() > 0.015
    assert abs(correlated.std().item() - GAUSS_STD) < 0.01


def test_brownian_noise_sampler_correlates_nested_intervals_only():
    """Unit-variance draws; a step's (sigma -> s) and (sigma -> sigma_next) correlate as
    sqrt((sigma - s) / (sigma - sigma_next)) = sqrt(1/2) here; the next step's draw is independent of both.
    200000 samples: correlation standard error ~0.002."""
    x = torch.zeros(200000)
    draw = ss.brownian_noise_sampler(x, torch.Generator().manual_seed(0))
    first, whole, next_step = draw(4.0, 3.0), draw(4.0, 2.0), draw(2.0, 1.5)
    for noise in (first, whole, next_step):
        assert abs(noise.std().item() - 1) < 0.01
    corr = torch.corrcoef(torch.stack([first, whole, next_step]))
    assert abs(corr[0, 1].item() - math.sqrt(0.5)) < 0.01
    assert abs(corr[0, 2].item()) < 0.01 and abs(corr[1, 2].item()) < 0.01


def test_lcm_spread_follows_its_recursion():
    """With the exact denoiser every LCM step is linear-Gaussian: D shrinks the spread about the mean by
    a = std^2 / (std^2 + sigma^2), re-noising adds sigma_next^2 of variance. So the output keeps the data
    mean and has a computable std (below the data's: LCM returns a posterior mean). 20000 samples."""
    sigmas = [14.6, 2.0, 0.5, 0.0]
    g = torch.Generator().manual_seed(0)
    x = GAUSS_MEAN + torch.randn(20000, generator=g) * math.sqrt(GAUSS_STD**2 + sigmas[0] ** 2)
    out = ss.sample_lcm(gaussian_denoiser, x, torch.tensor(sigmas), generator=g)
    variance = GAUSS_STD**2 + sigmas[0] ** 2
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        variance = (GAUSS_STD**2 / (GAUSS_STD**2 + sigma**2)) ** 2 * variance + sigma_next**2
    assert abs(out.mean().item() - GAUSS_MEAN) < 0.01
    assert abs(out.std().item() - math.sqrt(variance)) < 0.005


# ------------------------------------------------------------------------------ seeds, noise, callback

ALL_SAMPLERS = [
    ss.sample_ddpm,
    ss.sample_euler_a,
    ss.sample_dpm2_a,
    ss.sample_dpmpp_2m_sde,
    ss.sample_dpmpp_2s_a,
    ss.sample_dpmpp_sde,
    ss.sample_lcm,
]
SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0])


def toy_denoiser():
    net = TinyNet()
    return lambda x, sigma: x - sigma * net(x / torch.sqrt(sigma**2 + 1), 999 * sigma / 14.6)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_same_seed_same_result_other_seed_other_result(sampler):
    denoiser, x = toy_denoiser(), initial_noise() * 14.6

    def run(seed):
        return sampler(denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(seed))

    first = run(1)
    assert torch.equal(first, run(1))
    assert max_diff(first, run(2)) > 1e-2


def test_default_noise_sampler_draws_in_call_order_with_x_dtype():
    x = torch.zeros(3, 5, dtype=torch.float64)
    draw = ss.default_noise_sampler(x, torch.Generator().manual_seed(4))
    reference = torch.Generator().manual_seed(4)
    for _ in range(3):
        noise = draw(1.0, 0.5)
        assert noise.dtype == torch.float64 and noise.shape == x.shape
        assert torch.equal(noise, torch.randn(3, 5, generator=reference, dtype=torch.float64))


def test_explicit_noise_sampler_replaces_the_generator():
    denoiser, x = toy_denoiser(), initial_noise() * 14.6
    calls = []

    def zero_noise(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(x)

    a = ss.sample_euler_a(denoiser, x, SIGMAS, noise_sampler=zero_noise, generator=torch.Generator().manual_seed(1))
    b = ss.sample_euler_a(denoiser, x, SIGMAS, noise_sampler=zero_noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # one draw per step that adds noise: every step but the last, which lands on sigma = 0
    assert [c[0] for c in calls] == SIGMAS[:-2].tolist() * 2


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_callback_sees_every_step(sampler):
    seen = []
    g = torch.Generator().manual_seed(0)
    sampler(toy_denoiser(), initial_noise() * 14.6, SIGMAS, generator=g, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(len(SIGMAS) - 1))
    assert [float(s["sigma"]) for s in seen] == SIGMAS[:-1].tolist()
    assert [float(s["sigma_next"]) for s in seen] == SIGMAS[1:].tolist()
    assert all(s["x"].shape == SHAPE and s["denoised"].shape == SHAPE for s in seen)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_samplers_keep_the_latents_dtype(sampler):
    """bfloat16 latents with float32 sigmas stay bfloat16 (noise is drawn in x's dtype)."""
    x = (initial_noise() * 14.6).to(torch.bfloat16)
    out = sampler(gaussian_denoiser, x, SIGMAS, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_extra_args_reach_the_denoiser():
    seen = []

    def denoiser(x, sigma, cond=None):
        seen.append(cond)
        return x * 0

    ss.sample_dpmpp_sde(denoiser, torch.zeros(3), SIGMAS, extra_args={"cond": "prompt"})
    assert seen and set(seen) == {"prompt"}


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "sigmas, fragment",
    [
        (torch.tensor([[1.0, 0.0]]), "1-D tensor"),
        (torch.tensor([1.0]), "at least 2"),
        ([1.0, 0.0], "1-D tensor"),
        (torch.tensor([0.5, 1.0, 0.0]), "strictly decrease"),
        (torch.tensor([1.0, 1.0, 0.0]), "strictly decrease"),
        (torch.tensor([1.0, -0.5]), ">= 0"),
        (torch.tensor([float("nan"), 0.0]), "finite"),
    ],
)
@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_bad_sigmas_raise_input_error(sampler, sigmas, fragment):
    with pytest.raises(InputError, match="sigmas") as info:
        sampler(toy_denoiser(), torch.zeros(SHAPE), sigmas)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "sampler, kwargs, fragment",
    [
        (ss.sample_euler_a, {"eta": -1.0}, "eta"),
        (ss.sample_dpm2_a, {"s_noise": float("nan")}, "s_noise"),
        (ss.sample_dpmpp_2m_sde, {"solver_type": "euler"}, "'midpoint' or 'heun'"),
        (ss.sample_dpmpp_sde, {"r": 1.0}, "r: "),
        (ss.sample_dpmpp_2s_a, {"eta": -0.1}, ">= 0"),
    ],
)
def test_bad_options_raise_input_error(sampler, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        sampler(toy_denoiser(), torch.zeros(SHAPE), SIGMAS, **kwargs)
