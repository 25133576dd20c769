"""Noise schedules: the training betas, and the descending sigmas a sampler walks down.

A model trained as a DDPM sees x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at timestep t (a = alphas_cumprod).
Divided by sqrt(a_t) that is x0 + sigma_t eps with sigma_t = sqrt((1 - a_t) / a_t): the samplers work in
this sigma space (k-diffusion's convention), where a schedule is just a list of sigmas.

Every schedule returns steps + 1 sigmas, descending, ending at 0 (pass final_sigma="min" to end at the
smallest training sigma instead, as diffusers' DDIM and PNDM do with set_alpha_to_one=False). Tensors are
computed in float64 and returned as float32 on the CPU, like diffusers' numpy code, so that equal inputs
give bit-equal sigmas.

Schedules by name (make_sigmas):
  normal       steps timesteps evenly from 999 to 0, sigma interpolated in log space (k-diffusion, ComfyUI)
  sgm_uniform  as normal, but steps + 1 timesteps with the last (t = 0) left out (ComfyUI)
  simple       every (1000 / steps)-th training sigma counted down from the top (ComfyUI)
  ddim_uniform timesteps 1, 1 + 1000 // steps, ... (ldm's DDIM; equal to leading with steps_offset=1)
  karras       Karras et al. 2022, rho = 7, between sigma_min and sigma_max (default: the training range)
  exponential  evenly spaced in log sigma between sigma_min and sigma_max
  leading, trailing, linspace
               diffusers' timestep_spacing. Its schedulers disagree on details, hence the options:
               steps_offset (leading only: diffusers' trailing and linspace ignore it; SD ships 1);
               skip_lowest=True lays out steps + 1 timesteps and drops the lowest (DPMSolverMultistep,
               UniPC); round_timesteps=True rounds linspace timesteps to integers (DDIM, PNDM, DDPM,
               DPMSolverMultistep, UniPC) where the k-diffusion-style schedulers (Euler, Heun, LMS, KDPM2)
               keep them fractional and interpolate sigma linearly. spacing_options picks them by layout.
  leading_karras, trailing_karras
               karras between the sigmas of that spacing's first and last timesteps (diffusers' Euler, Heun,
               LMS, KDPM2 with use_karras_sigmas; their linspace case is plain karras)
  lcm          diffusers' LCMScheduler: `steps` of the 50 distillation timesteps 19, 39, ..., 999, evenly
               by index from the top
"""

import inspect
import math

import torch

from .errors import InputError


# -- training schedule -------------------------------------------------------------------------------

def training_betas(schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """DDPM betas in float32 (computed as diffusers does, so alphas_cumprod agree bit for bit)."""
    if schedule == "scaled_linear":  # SD: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    raise InputError(f"unknown beta schedule {schedule!r}; choose 'scaled_linear' or 'linear'")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_for(config) -> torch.Tensor:
    """The training alphas_cumprod of a ModelConfig (beta_schedule, beta_start, beta_end, timesteps)."""
    betas = training_betas(config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps)
    return alphas_cumprod(betas)


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t for t = 0 .. T-1 (ascending), same dtype as alphas_cumprod."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# -- sigma <-> timestep ------------------------------------------------------------------------------

def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """The (fractional) timestep of each sigma: linear interpolation in log sigma between training steps.

    `quantize` rounds to the nearest step, as diffusers' DPMSolverMultistep, UniPC and KDPM2 do for
    karras sigmas. Sigmas outside the training range clamp to t = 0 or T-1.
    """
    log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    t = low + w
    return t.round() if quantize else t


def t_to_sigma(t: torch.Tensor, train_sigmas: torch.Tensor, log_space: bool = True) -> torch.Tensor:
    """Sigma at fractional timesteps: interpolated in log sigma (k-diffusion) or linearly (diffusers)."""
    low = t.floor().long().clamp(0, len(train_sigmas) - 2)
    w = t - low
    table = train_sigmas.log() if log_space else train_sigmas
    value = table[low] + w * (table[low + 1] - table[low])
    return value.exp() if log_space else value


# -- timestep spacings (diffusers' `timestep_spacing`) -----------------------------------------------

def _linspace(start: float, stop: float, num: int) -> list[float]:
    # numpy's arithmetic (start + i * step, exact endpoint) so that .5 cases round the same way
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int = 1000, *, steps_offset: int = 0,
                     skip_lowest: bool = False, round_timesteps: bool = False) -> torch.Tensor:
    """Descending float64 timesteps as diffusers' schedulers lay them out (see the module docstring)."""
    T = num_train_timesteps
    n = steps + 1 if skip_lowest else steps
    if spacing == "leading":
        ts = torch.tensor([i * (T // n) + steps_offset for i in range(n)], dtype=torch.float64)
    elif spacing == "trailing":
        # numpy's float arange steps by (start + step) - start; the same arithmetic rounds the same way.
        # (numpy can also return one element too many, a timestep of -1; we keep exactly `steps`.)
        delta = (T - T / n) - T
        ts = torch.tensor([round(T + i * delta) - 1 for i in range(n)][::-1], dtype=torch.float64)
    elif spacing == "linspace":
        ts = torch.tensor(_linspace(0.0, T - 1.0, n), dtype=torch.float64)
        # rounded to integers, or kept fractional at float32 precision (diffusers' dtype=np.float32)
        ts = ts.round() if round_timesteps else ts.float().double()
    else:
        raise InputError(f"unknown timestep spacing {spacing!r}; choose one of leading, trailing, linspace")
    ts = ts.flip(0)
    return ts[:-1] if skip_lowest else ts


def _spaced_sigmas(spacing, steps, train_sigmas, **opts):
    ts = spaced_timesteps(spacing, steps, len(train_sigmas), **opts)
    return _append_zero(t_to_sigma(ts, train_sigmas, log_space=False))  # linear: diffusers' np.interp


def leading(steps: int, train_sigmas: torch.Tensor, *, steps_offset: int = 0, skip_lowest: bool = False):
    """Timesteps i * (T // steps) + steps_offset (DDIM, PNDM, Euler ... with SD 1.x's steps_offset=1)."""
    return _spaced_sigmas("leading", steps, train_sigmas, steps_offset=steps_offset, skip_lowest=skip_lowest)


def trailing(steps: int, train_sigmas: torch.Tensor):
    """Timesteps counted down from T - 1 in strides of T / steps (rounded)."""
    return _spaced_sigmas("trailing", steps, train_sigmas)


def linspace(steps: int, train_sigmas: torch.Tensor, *, skip_lowest: bool = False, round_timesteps: bool = False):
    """Timesteps evenly from T - 1 to 0; with fractional timesteps sigma is interpolated linearly."""
    return _spaced_sigmas("linspace", steps, train_sigmas, skip_lowest=skip_lowest, round_timesteps=round_timesteps)


# How each family of diffusers schedulers lays out a spacing, as the options above. Which family a sampler
# reproduces is the sampler registry's to say (sampling.diffusers_layout).
LAYOUTS = {
    "k": {},  # Euler, Euler a, Heun, LMS, KDPM2 (a): fractional timesteps, the defaults above
    "ddim": {"linspace": dict(round_timesteps=True)},  # DDIM, PNDM: integer timesteps; final sigma below
    "ddpm": {"linspace": dict(round_timesteps=True)},  # DDPM: as DDIM, always ending at sigma 0
    "multistep": {"leading": dict(skip_lowest=True),  # DPMSolverMultistep, UniPC
                  "linspace": dict(skip_lowest=True, round_timesteps=True)},
}


def spacing_options(schedule: str, layout: str, config) -> dict:
    """The make_sigmas options that lay out a diffusers spacing (leading, trailing, linspace) as the
    schedulers of `layout` do for a ModelConfig: its steps_offset (leading only, as in diffusers), and for
    DDIM / PNDM the last step ending at the smallest training sigma unless config.set_alpha_to_one (diffusers
    then returns the latents there times 1 / sqrt(1 + sigma^2), the samplers them unscaled). No options
    for the other schedules."""
    name = _schedule_key(schedule)
    if name == "leading_karras":
        return {"steps_offset": config.steps_offset}
    if name not in ("leading", "trailing", "linspace"):
        return {}
    options = dict(LAYOUTS[layout].get(name, {}))
    if name == "leading":
        options["steps_offset"] = config.steps_offset
    # (where the lowest timestep is 0, diffusers' last step goes from the smallest sigma to itself, which
    # no strictly descending schedule expresses: those end at 0)
    lowest_is_zero = name == "linspace" or (name == "leading" and config.steps_offset == 0)
    if layout == "ddim" and not config.set_alpha_to_one and not lowest_is_zero:
        options["final_sigma"] = "min"
    return options


# -- sampling schedules ------------------------------------------------------------------------------

def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def normal(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(_linspace(len(train_sigmas) - 1.0, 0.0, steps), dtype=torch.float64)
    return _append_zero(t_to_sigma(t, train_sigmas))


def sgm_uniform(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(_linspace(len(train_sigmas) - 1.0, 0.0, steps + 1)[:-1], dtype=torch.float64)
    return _append_zero(t_to_sigma(t, train_sigmas))


def simple(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    stride = len(train_sigmas) / steps
    return _append_zero(train_sigmas[[len(train_sigmas) - 1 - int(i * stride) for i in range(steps)]])


def ddim_uniform(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    """ldm's DDIM timesteps 1, 1 + c, 1 + 2c, ... with c = T // steps. (ComfyUI and A1111 keep going up to
    T - 1 and so may run more than `steps` steps; we run exactly `steps`.)"""
    return leading(steps, train_sigmas, steps_offset=1)


def lcm(steps: int, train_sigmas: torch.Tensor, *, original_steps: int = 50):
    """diffusers' LCMScheduler timesteps: of the distillation schedule k - 1, 2k - 1, ..., T - 1
    (k = T // original_steps), counted down from the top, the ones at indices floor(i * original_steps /
    steps) (numpy's linspace without endpoint)."""
    if not 1 <= steps <= original_steps:
        raise InputError(f"the lcm schedule takes at most {original_steps} steps (its distillation schedule's "
                         f"length), not {steps}")
    k = len(train_sigmas) // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    step = original_steps / steps
    return _append_zero(train_sigmas[[origin[math.floor(i * step)] for i in range(steps)]])


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.tensor(_linspace(0.0, 1.0, steps), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    log_sigmas = torch.tensor(_linspace(math.log(sigma_max), math.log(sigma_min), steps), dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def _sigma_range(train_sigmas, sigma_min, sigma_max, name):
    lo = float(train_sigmas[0]) if sigma_min is None else float(sigma_min)
    hi = float(train_sigmas[-1]) if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise InputError(f"{name} schedule: need 0 < sigma_min < sigma_max, got {lo} and {hi}")
    return lo, hi


def _karras(steps, train_sigmas, *, sigma_min=None, sigma_max=None, rho=7.0):
    return karras(steps, *_sigma_range(train_sigmas, sigma_min, sigma_max, "karras"), rho)


def leading_karras(steps: int, train_sigmas: torch.Tensor, *, steps_offset: int = 0) -> torch.Tensor:
    """karras between the sigmas of leading's lowest and highest timesteps: diffusers' Euler, Heun, LMS and
    KDPM2 (a) with use_karras_sigmas under leading spacing (under linspace they span the training range:
    plain karras)."""
    spaced = leading(steps, train_sigmas, steps_offset=steps_offset)
    return karras(steps, float(spaced[-2]), float(spaced[0]))


def trailing_karras(steps: int, train_sigmas: torch.Tensor) -> torch.Tensor:
    """karras between the sigmas of trailing's lowest and highest timesteps (as leading_karras)."""
    spaced = trailing(steps, train_sigmas)
    return karras(steps, float(spaced[-2]), float(spaced[0]))


def _exponential(steps, train_sigmas, *, sigma_min=None, sigma_max=None):
    return exponential(steps, *_sigma_range(train_sigmas, sigma_min, sigma_max, "exponential"))


SCHEDULES = {
    "normal": normal,
    "karras": _karras,  # sigma range defaults to the training one
    "exponential": _exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "leading": leading,
    "trailing": trailing,
    "linspace": linspace,
    "lcm": lcm,
    "leading_karras": leading_karras,
    "trailing_karras": trailing_karras,
}


def _schedule_key(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def schedule_names() -> list[str]:
    return list(SCHEDULES)


def make_sigmas(schedule: str, steps: int, alphas_cumprod: torch.Tensor, *, final_sigma: str = "zero",
                **opts) -> torch.Tensor:
    """steps + 1 descending float32 sigmas (CPU) for a schedule name and its options (module docstring).

    final_sigma: "zero" (default) ends at 0, "min" at the smallest training sigma.
    """
    fn = SCHEDULES.get(_schedule_key(schedule))
    if fn is None:
        raise InputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(alphas_cumprod):
        raise InputError(f"steps must be an integer from 1 to {len(alphas_cumprod)}, not {steps!r}")
    if final_sigma not in ("zero", "min"):
        raise InputError(f"final_sigma must be 'zero' or 'min', not {final_sigma!r}")
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("steps", "train_sigmas")]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise InputError(f"schedule {schedule!r} does not take option(s) {unknown}; it takes {accepted or 'none'}")
    train_sigmas = training_sigmas(alphas_cumprod.detach().cpu().float()).double()
    sigmas = fn(steps, train_sigmas, **opts)
    if final_sigma == "min":
        sigmas[-1] = train_sigmas[0]
    return sigmas.float()


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a schedule that img2img denoises. As diffusers: of `steps` steps the last
    int(steps * strength) run (truncated, not rounded), starting from noise at that point's sigma."""
    steps = len(sigmas) - 1
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1], not {strength}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise InputError(f"strength {strength} with {steps} steps runs no step (int(steps * strength) == 0); "
                         f"raise --steps or --strength")
    return sigmas[steps - run:]
