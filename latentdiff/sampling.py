"""Deterministic samplers over a denoiser D(x, sigma) -> x0, and the registry of names users type.

Every sampler is `sample_NAME(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
noise_sampler=None, ...) -> x`. x lives in sigma space (x0 + sigma * noise; a model's input is
x / sqrt(sigma^2 + 1)); `sigmas` is a descending schedule, normally ending at 0. A schedule ending above
0 (diffusers' DDIM / PNDM with set_alpha_to_one=False) returns x at that sigma, still in sigma space:
x / sqrt(sigmas[-1]^2 + 1) is what those schedulers return. `callback` gets dict(i, sigma, sigma_next, x,
denoised) once per step. All state lives in the loop. The stochastic samplers are in sampling_stochastic.

In sigma space, a DDIM step is the exact solution of the probability-flow ODE with x0 held fixed, so
DDIM (eta 0) and Euler take the same step, and PNDM / PLMS is that step driven by a linear multistep
combination of eps. See each function for the diffusers scheduler it reproduces.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import sampling_stochastic as stochastic
from .errors import FieldError, InputError
from .schedules import schedule_names


def _setup(sigmas, extra_args):
    stochastic.check_sigmas(sigmas)
    return sigmas, extra_args or {}


def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Euler on dx/dsigma = (x - D) / sigma (Karras et al. 2022; diffusers' EulerDiscreteScheduler)."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None,
                eta=0.0):
    """DDIM (Song et al. 2020; diffusers' DDIMScheduler). x_next = x0 + sigma_down * eps + sigma_up * noise:
    eta 0 is deterministic; eta 1 takes the DDPM posterior's noise. In sigma space DDIM's noise std is
    exactly the ancestral sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    if not eta >= 0:
        raise InputError(f"eta must be >= 0, not {eta!r}")
    if eta > 0 and noise_sampler is None:
        noise_sampler = stochastic.default_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        eps = (x - denoised) / sigma
        sigma_up = torch.minimum(sigma_next, eta * sigma_next * (1 - (sigma_next / sigma) ** 2).sqrt())
        x = denoised + eps * (sigma_next**2 - sigma_up**2).sqrt()
        if eta > 0 and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


# Adams-Bashforth weights for eps of the newest step first (PLMS, Liu et al. 2022)
_ADAMS_BASHFORTH = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Pseudo linear multistep (PNDM without Runge-Kutta warm-up: diffusers' PNDMScheduler with
    skip_prk_steps=True, and ldm's PLMS). Each step moves by the DDIM step with eps replaced by an
    Adams-Bashforth combination of up to four past eps. The first of several steps is an improved Euler
    step (one extra model call) whose corrected point's eps starts the history."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    history = []  # eps of the latest steps, newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        eps = (x - denoised) / sigma
        if not history and len(sigmas) > 2:
            x_pred = x + eps * (sigma_next - sigma)
            eps_pred = (x_pred - denoiser(x_pred, sigma_next, **extra_args)) / sigma_next
            step_eps = (eps + eps_pred) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(history) + 1]
            step_eps = sum(w * e for w, e in zip(weights, [eps, *reversed(history)]))
        history = [*history, eps][-3:]
        x = x + step_eps * (sigma_next - sigma)
    return x


def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Heun's method, 2 model calls per step, Euler for the last step onto 0 (Karras et al. 2022, Alg. 1;
    diffusers' HeunDiscreteScheduler)."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - denoiser(x_euler, sigma_next, **extra_args)) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
    return x


def sample_dpm2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """DPM-Solver-2 as in k-diffusion (diffusers' KDPM2DiscreteScheduler): an Euler half step to the
    geometric midpoint of sigma and sigma_next, then the full step with the midpoint's slope. Euler for
    the last step onto 0."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
            x_mid = x + slope * (sigma_mid - sigma)
            slope_mid = (x_mid - denoiser(x_mid, sigma_mid, **extra_args)) / sigma_mid
            x = x + slope_mid * (sigma_next - sigma)
    return x


def _lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of sigma_(i-j) through the
    points sigma_i .. sigma_(i-order+1). Its degree is below 4, so 2-point Gauss-Legendre is exact."""
    def basis(tau):
        return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)
    lo, hi = sigmas[i], sigmas[i + 1]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    node = half / math.sqrt(3)
    return half * (basis(mid - node) + basis(mid + node))


def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None,
               order=4):
    """Linear multistep in sigma (k-diffusion's LMS; diffusers' LMSDiscreteScheduler): the slopes of the
    last `order` steps integrated exactly through their interpolating polynomial."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    if order not in (1, 2, 3, 4):
        raise InputError(f"LMS order must be 1 to 4, not {order!r}")
    sigma_list = sigmas.tolist()
    slopes = []  # newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        slopes = [*slopes, (x - denoised) / sigma][-order:]
        used = len(slopes)
        x = x + sum(_lms_coefficient(sigma_list, i, j, used) * d for j, d in enumerate(reversed(slopes)))
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """DPM-Solver++(2M) (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler, dpmsolver++, order 2,
    midpoint). With h = log(sigma / sigma_next): x_next = (sigma_next / sigma) x - expm1(-h) D', where D'
    extrapolates the denoised estimates of this and the previous step. First order on the first step and
    on the step onto 0."""
    sigmas, extra_args = _setup(sigmas, extra_args)
    previous = None  # (denoised, h) of the previous step
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        d = denoised
        if previous is not None:
            old_denoised, h_last = previous
            d = denoised + (denoised - old_denoised) * (h / h_last / 2)
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        previous = denoised, h
    return x


def sample_unipc(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler runs it for SD: order 2, B(h) =
    expm1(-h) ("bh2"), data prediction, lower order on the first and last steps.

    Each step: call the model at x (the predictor's output), use that denoised estimate to correct x
    (UniC, free: no extra call), then predict the next x from the corrected one (UniP). In sigma space,
    h = log(sigma / sigma_next) and a first-order step is x_next = (sigma_next / sigma) x - expm1(-h) D.
    """
    sigmas, extra_args = _setup(sigmas, extra_args)
    steps = len(sigmas) - 1
    lam = -sigmas.log()  # log-SNR lambda in sigma space; inf at sigma = 0
    denoised_hist = []  # denoised of the previous two steps, newest last
    last_x, last_order = None, 0
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, **extra_args)
        stochastic.report_step(callback, i, sigma, sigma_next, x, denoised)
        if last_x is not None:  # UniC: corrects the step sigmas[i-1] -> sigma using this denoised
            h = lam[i] - lam[i - 1]
            b_h = torch.expm1(-h)
            m0 = denoised_hist[-1]
            x = (sigma / sigmas[i - 1]) * last_x - b_h * m0
            if last_order == 1:
                x = x - b_h * 0.5 * (denoised - m0)
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                b1 = (b_h / -h - 1) / b_h
                b2 = ((b_h / -h - 1) / -h - 0.5) * 2 / b_h
                rho0 = (b1 - b2) / (1 - rk)
                x = x - b_h * (rho0 * (denoised_hist[-2] - m0) / rk + (b1 - rho0) * (denoised - m0))
        order = min(2, steps - i, i + 1)
        h = lam[i + 1] - lam[i]  # inf onto 0, where expm1(-h) = -1
        b_h = torch.expm1(-h)
        x_next = (sigma_next / sigma) * x - b_h * denoised
        if order == 2:  # UniP-2: rho = 1/2 on the slope from the previous denoised
            rk = (lam[i - 1] - lam[i]) / h
            x_next = x_next - b_h * 0.5 * (denoised_hist[-1] - denoised) / rk
        last_x, last_order = x, order
        denoised_hist = [*denoised_hist, denoised][-2:]
        x = x_next
    return x


# -- registry ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as users name it (`name`: A1111's spelling) and what running it needs. `noise`: what its
    noise_sampler must draw: "none" (it draws nothing), "independent" (fresh normal noise per call) or
    "brownian" (increments of one Brownian path: DPM++ SDE's two draws per step must correlate like one,
    sampling_stochastic.brownian_noise_sampler). `takes_eta`: it has an eta (amount of noise) parameter.
    `second_order`: A1111 counts prompt-schedule steps for it against twice the steps (prompt_schedule.py)."""

    name: str
    fn: Callable
    default_schedule: str
    noise: str = "none"
    takes_eta: bool = False
    second_order: bool = False


# Lookups ignore case, spaces and punctuation ("++" reads "pp"), accept "ancestral" for "a", a "k_" prefix
# (k-diffusion / old A1111 names) and a schedule name as suffix ("DPM++ 2M Karras").
SAMPLERS = {spec.name: spec for spec in (
    SamplerSpec("Euler", sample_euler, "normal"),
    SamplerSpec("Euler a", stochastic.sample_euler_a, "normal", "independent", takes_eta=True),
    SamplerSpec("Heun", sample_heun, "normal", second_order=True),
    SamplerSpec("LMS", sample_lms, "normal"),
    SamplerSpec("DPM2", sample_dpm2, "normal", second_order=True),
    SamplerSpec("DPM2 a", stochastic.sample_dpm2_a, "normal", "independent", takes_eta=True, second_order=True),
    SamplerSpec("DPM++ 2M", sample_dpmpp_2m, "normal"),
    SamplerSpec("DPM++ 2M SDE", stochastic.sample_dpmpp_2m_sde, "normal", "independent", takes_eta=True),
    SamplerSpec("DPM++ 2S a", stochastic.sample_dpmpp_2s_a, "normal", "independent", takes_eta=True, second_order=True),
    SamplerSpec("DPM++ SDE", stochastic.sample_dpmpp_sde, "normal", "brownian", takes_eta=True, second_order=True),
    SamplerSpec("UniPC", sample_unipc, "normal"),
    SamplerSpec("DDIM", sample_ddim, "ddim_uniform", "independent", takes_eta=True),  # noise only with eta > 0
    SamplerSpec("PLMS", sample_plms, "ddim_uniform"),
    SamplerSpec("DDPM", stochastic.sample_ddpm, "ddim_uniform", "independent"),
    SamplerSpec("LCM", stochastic.sample_lcm, "sgm_uniform", "independent"),
)}
_ALIASES = {"pndm": "PLMS"}

# The family of diffusers schedulers each sampler reproduces, for how it lays out "leading", "trailing" and
# "linspace" (schedules.LAYOUTS); the others are k-diffusion-style ("k").
_DIFFUSERS_LAYOUT = {sample_ddim: "ddim", sample_plms: "ddim", stochastic.sample_ddpm: "ddpm",
                     sample_dpmpp_2m: "multistep", stochastic.sample_dpmpp_2m_sde: "multistep",
                     sample_unipc: "multistep"}


def diffusers_layout(sample_fn) -> str:
    return _DIFFUSERS_LAYOUT.get(sample_fn, "k")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p")).replace("ancestral", "a")


def _lookup(key: str) -> str | None:
    table = {_key(name): name for name in SAMPLERS} | _ALIASES
    return table.get(key) or (table.get(key[1:]) if key.startswith("k") else None)


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def sampler_table() -> list[tuple[str, str]]:
    """(name, default schedule) of every sampler, for listings."""
    return [(name, spec.default_schedule) for name, spec in SAMPLERS.items()]


def _parse(typed: str) -> tuple[SamplerSpec, str | None]:
    """A name as users type it -> (its spec, the schedule named as its suffix or None)."""
    key = _key(typed)
    found = _lookup(key)
    if found is not None:
        return SAMPLERS[found], None
    for schedule in schedule_names():
        suffix = _key(schedule)
        if key.endswith(suffix) and (found := _lookup(key[: -len(suffix)])) is not None:
            return SAMPLERS[found], schedule
    raise InputError(f"unknown sampler {typed!r}; choose one of {', '.join(SAMPLERS)} (case and punctuation "
                     f"do not matter), optionally followed by a schedule: {', '.join(schedule_names())}")


def sampler_spec(typed: str) -> tuple[SamplerSpec, str]:
    """A name as users type it -> (its spec, the schedule to use: the suffix's, else the sampler's default)."""
    spec, schedule = _parse(typed)
    return spec, schedule or spec.default_schedule


def field_sampler_spec(field: str, typed) -> tuple[SamplerSpec, str]:
    """sampler_spec of a request field's value, with errors as FieldErrors naming the field."""
    if not isinstance(typed, str):
        raise FieldError(field, f"must be a sampler name, not {typed!r}")
    try:
        return sampler_spec(typed)
    except InputError as e:
        raise FieldError(field, str(e)) from None


def resolve_sampler(typed: str) -> tuple[Callable, str]:
    """A name as users type it -> (sampler function, schedule name): "DPM++ 2M Karras" -> (sample_dpmpp_2m,
    "karras"), "k_euler_a" -> (sample_euler_a, "normal")."""
    spec, schedule = sampler_spec(typed)
    return spec.fn, schedule


def canonical_sampler_name(typed: str) -> tuple[str, str | None]:
    """A name as users type it -> (A1111's name of the sampler, the schedule its suffix names or None):
    "dpmpp_2m_karras" -> ("DPM++ 2M", "karras"), "k_euler_a" -> ("Euler a", None)."""
    spec, schedule = _parse(typed)
    return spec.name, schedule
