"""Stochastic samplers: each step injects fresh noise, so the generator's seed fixes the result.

Conventions (shared with sampling.py, k-diffusion style):

- `denoiser(x, sigma, **extra_args)` returns the denoised estimate of x0 for a sample
  `x = x0 + sigma * noise`; `sigma` is passed as a 0-dim tensor (one noise level for the whole batch).
- `sigmas` is a strictly descending 1-D tensor, usually ending at 0; the first `x` is pure noise at
  `sigmas[0]`. A step that lands on 0 returns the denoised estimate. A schedule ending above 0 runs the
  ordinary update into its last sigma and returns that (still noisy, sigma-space) x.
- `callback`, when given, receives `dict(i, sigma, sigma_next, x, denoised)` once per step, with the
  step's first denoised estimate.
- Noise comes from `noise_sampler(sigma, sigma_next)`; by default `default_noise_sampler(x, generator)`
  (dpmpp_sde: `brownian_noise_sampler`), which draws from `generator` in call order, one draw per noise
  injection. A sampler keeps all of its state in local variables: two calls with equally seeded
  generators give the same result.

Samplers do not switch off autograd; wrap calls in `torch.inference_mode()` as the pipeline does.
"""

import math

import torch

from .errors import InputError


def default_noise_sampler(x, generator=None):
    """Return `f(sigma, sigma_next) -> noise`: standard normal noise with x's shape and dtype.

    Each call draws `torch.randn` on the generator's own device (a CPU generator gives the same numbers on
    every machine) and then moves the noise to x's device, like diffusers' `randn_tensor`. Draws happen in
    call order, so the sequence matches a diffusers scheduler stepped with the same generator. The sigma
    arguments are ignored here; they exist for noise samplers that correlate draws across time (Brownian
    trees)."""
    device = generator.device if generator is not None else x.device

    def sample_noise(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)

    return sample_noise


def brownian_noise_sampler(x, generator=None, draw=None):
    """Return `f(sigma, sigma_next) -> noise` that behaves like the normalised increment
    (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) of one Brownian path W over sigma: the noise
    k-diffusion's Brownian tree gives sample_dpmpp_sde, without torchsde.

    A call whose interval starts where the previous call's started and reaches further reuses that
    increment and draws only the remainder, so the two draws of a dpmpp_sde step (sigma -> s, then
    sigma -> sigma_next) have the path's correlation sqrt((sigma - s) / (sigma - sigma_next)). Any other call
    draws a fresh increment, which is exact for the disjoint intervals of successive steps. Draws come
    from `default_noise_sampler(x, generator)`, one per call; unlike a tree, the path depends on the
    sequence of calls, not on the seed alone. `draw` replaces that source of independent draws (the
    pipeline's per-image generators)."""
    draw = draw or default_noise_sampler(x, generator)
    previous = None  # (start, end, unnormalised increment) of the last call

    def sample_noise(sigma, sigma_next):
        nonlocal previous
        start, end = float(sigma), float(sigma_next)
        length = abs(end - start)
        extends = (
            previous is not None
            and math.isclose(start, previous[0], rel_tol=1e-6)
            and (end - start) * (previous[1] - start) > 0
            and length > abs(previous[1] - start)
        )
        if extends:
            increment = previous[2] + draw(sigma, sigma_next) * math.sqrt(length - abs(previous[1] - start))
        else:
            increment = draw(sigma, sigma_next) * math.sqrt(length)
        previous = start, end, increment
        return increment / math.sqrt(length)

    return sample_noise


def check_sigmas(sigmas) -> None:
    """Every sampler's schedule check. Sigmas are left where they are: kept on the host, the per-step
    branches on them (sigma_next == 0, ...) never wait for a GPU."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or len(sigmas) < 2:
        shape = tuple(sigmas.shape) if torch.is_tensor(sigmas) else type(sigmas).__name__
        raise InputError(
            f"sigmas: expected a 1-D tensor of at least 2 noise levels, got {shape}; "
            "build one with a schedule function (e.g. schedules.make_sigmas)"
        )
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise InputError(f"sigmas: every noise level must be finite and >= 0, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise InputError(
            f"sigmas: noise levels must strictly decrease (high noise first), got {sigmas.tolist()}; "
            "reverse the schedule or remove repeated values"
        )


def _prepare(x, sigmas, extra_args, generator, noise_sampler, **nonnegative):
    """Check the arguments every stochastic sampler shares; return (extra_args, noise_sampler)."""
    check_sigmas(sigmas)
    for name, value in nonnegative.items():
        if not value >= 0:
            raise InputError(f"{name}: must be >= 0, got {value!r}")
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator)
    return extra_args or {}, noise_sampler


def report_step(callback, i, sigma, sigma_next, x, denoised):
    if callback is not None:
        callback(dict(i=i, sigma=sigma, sigma_next=sigma_next, x=x, denoised=denoised))


def _toward(x, denoised, sigma, sigma_to):
    """Move x from sigma to sigma_to with the denoised estimate held fixed.

    This is the exact solution of the probability-flow ODE dx/dsigma = (x - denoised) / sigma for constant
    denoised, and equals one Euler step, one DDIM step and first-order DPM-Solver++ in sigma space."""
    return denoised + (x - denoised) * (sigma_to / sigma)


def _ancestral_step(sigma, sigma_next, eta):
    """Split the step sigma -> sigma_next into a deterministic move down to sigma_down plus fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    eta = 1 takes the DDPM posterior's noise, eta = 0 none (a deterministic step); sigma_up is capped at
    sigma_next so that large eta stays valid."""
    posterior = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    sigma_up = torch.minimum(sigma_next, eta * posterior)
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


def sample_euler_a(
    denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """Euler ancestral: an Euler step down to sigma_down, then noise of std sigma_up (diffusers'
    EulerAncestralDiscreteScheduler for eta = 1). eta = 0 is plain Euler; s_noise scales the noise."""
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler, eta=eta, s_noise=s_noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = _toward(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """DDPM ancestral sampling (Ho et al. 2020, "fixed small" posterior variance; diffusers' DDPMScheduler).

    In sigma space, with r = (sigma_next / sigma)^2, the posterior step is
    x_next = r * x + (1 - r) * denoised + sigma_next * sqrt(1 - r) * noise.
    That is exactly Euler ancestral with eta = 1 (sigma_down = sigma_next^2 / sigma and the same sigma_up),
    so this sampler is that one; it exists under its own name because users ask for "DDPM"."""
    return sample_euler_a(
        denoiser, x, sigmas, extra_args=extra_args, callback=callback, generator=generator, noise_sampler=noise_sampler
    )


def sample_dpm2_a(
    denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver-2 ancestral (diffusers' KDPM2AncestralDiscreteScheduler for eta = 1).

    Each step aims at sigma_down: an Euler half step to the log-midpoint of sigma and sigma_down, a second
    model call there, a full step with the midpoint's slope, then noise of std sigma_up. A step whose
    sigma_down is 0 is a single Euler step (one model call)."""
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler, eta=eta, s_noise=s_noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = (sigma * sigma_down).sqrt()  # geometric mean = midpoint in log sigma
            x_mid = _toward(x, denoised, sigma, sigma_mid)
            slope_mid = (x_mid - denoiser(x_mid, sigma_mid, **extra_args)) / sigma_mid
            x = x + slope_mid * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2s_a(
    denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(2S) ancestral (Lu et al. 2022; k-diffusion's sample_dpmpp_2s_ancestral).

    Each step aims at sigma_down: a first-order step to the log-midpoint of sigma and sigma_down, a second
    model call there, then a first-order step from x all the way to sigma_down using the midpoint's
    denoised estimate (the singlestep solver with r = 1/2), then noise of std sigma_up. eta = 0 is the
    deterministic DPM-Solver++(2S). diffusers has no scheduler with this noise structure: its
    DPMSolverSinglestepScheduler takes the midpoint from the timestep table and its SDE variant adds noise
    at both sub-steps."""
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler, eta=eta, s_noise=s_noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = (sigma * sigma_down).sqrt()
            x_mid = _toward(x, denoised, sigma, sigma_mid)
            x = _toward(x, denoiser(x_mid, sigma_mid, **extra_args), sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def sample_dpmpp_sde(
    denoiser,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    generator=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    r=0.5,
):
    """DPM-Solver++ (stochastic, two stages per step): k-diffusion's sample_dpmpp_sde, which diffusers'
    DPMSolverSDEScheduler reproduces for eta = 1 and r = 1/2.

    Stage one takes an ancestral step from sigma to s = sigma^(1-r) * sigma_next^r (noise drawn for the
    interval sigma -> s) and calls the model there; stage two takes an ancestral step from sigma to
    sigma_next with a blend of both denoised estimates (noise drawn for sigma -> sigma_next).

    Noise: the reference draws both increments of a step from one torchsde Brownian tree, so they are
    correlated (the interval sigma -> s lies inside sigma -> sigma_next); that correlation matters, since
    independent draws leave the samples' variance visibly too small at usual step counts. Without
    torchsde, the default here is `brownian_noise_sampler(x, generator)`, which keeps the correlation
    within each step and draws successive steps independently, as the tree does. What differs is the
    numbers: a seed gives different images than diffusers/k-diffusion, and, unlike a tree, a different
    path for a different number of steps. Pass any `noise_sampler` (a Brownian tree) to replace it.
    """
    if not 0 < r < 1:
        raise InputError(f"r: the intermediate point's fraction of the step (in log sigma) must be in (0, 1), got {r}")
    if noise_sampler is None:
        noise_sampler = brownian_noise_sampler(x, generator)
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler, eta=eta, s_noise=s_noise)
    blend = 1 / (2 * r)  # weight of the intermediate estimate that makes stage two second order
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_s = sigma ** (1 - r) * sigma_next**r
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_s, eta)
        x_s = _toward(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x_s = x_s + noise_sampler(sigma, sigma_s) * (s_noise * sigma_up)
        denoised_s = denoiser(x_s, sigma_s, **extra_args)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = _toward(x, (1 - blend) * denoised + blend * denoised_s, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    generator=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE (diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++"
    for eta = 1; eta = 0 is the deterministic DPM-Solver++(2M)).

    With h = log(sigma / sigma_next), the data-prediction SDE step holding denoised fixed is
    x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) denoised
             + sigma_next sqrt(1 - e^(-2 eta h)) noise;
    from the second step on, a correction built from the previous step's denoised estimate (a linear
    extrapolation in log sigma) makes it second order: solver_type "midpoint" (diffusers' default) or
    "heun". One model call and one noise draw per step; the step onto sigma = 0 returns denoised."""
    if solver_type not in ("midpoint", "heun"):
        raise InputError(f"solver_type: must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler, eta=eta, s_noise=s_noise)
    previous = None  # (denoised, h) of the previous step
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = (sigma / sigma_next).log()
        decay = torch.expm1(-(1 + eta) * h).neg()  # 1 - e^(-(1 + eta) h): weight of denoised
        x = (sigma_next / sigma) * torch.exp(-eta * h) * x + decay * denoised
        if previous is not None:
            old_denoised, h_last = previous
            slope = (denoised - old_denoised) * (h / h_last)  # (1 / r) (D - D_old), r = h_last / h
            if solver_type == "midpoint":
                x = x + 0.5 * decay * slope
            else:
                x = x + (decay / (-(1 + eta) * h) + 1) * slope
        if eta > 0:
            noise_std = sigma_next * torch.expm1(-2 * eta * h).neg().sqrt()
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * noise_std)
        previous = denoised, h
    return x


def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Latent Consistency Model sampling (Luo et al. 2023; diffusers' LCMScheduler): each step takes the
    model's denoised prediction as the new sample and re-noises it to the next sigma with fresh noise.

    The consistency boundary scalings (diffusers' c_skip / c_out, which push the prediction toward x at
    t -> 0) belong to the LCM model's denoiser, not to this loop."""
    extra_args, noise_sampler = _prepare(x, sigmas, extra_args, generator, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        report_step(callback, i, sigma, sigma_next, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
    return x
