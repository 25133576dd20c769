"""Whole sampling loops against diffusers' schedulers (SD 1.5 configuration), the denoiser wrappers, and
the sampler registry.

Both sides drive the same deterministic network (seeded, mixing channels and pixels, smooth in x and t)
from the same initial noise; diffusers the way its pipelines do (init_noise_sigma, scale_model_input,
step). diffusers' DDIM, PNDM, DPMSolver and UniPC keep the variance-preserving sample sqrt(a) (x0 +
sigma eps); our samplers keep x0 + sigma eps, so those comparisons convert with sqrt(sigma^2 + 1).

Tolerance: max abs diff <= 1e-4 on final latents of magnitude ~1 (fp32; the two sides order float
operations differently over up to 50 model calls). Measured: at most 3e-6 for every sampler.
"""

import dataclasses
import functools
import inspect
import warnings

import diffusers
import pytest
import torch

from latentdiff import sampling
from latentdiff.config import preset
from latentdiff.denoisers import CFGDenoiser, DiscreteDenoiser
from latentdiff.errors import InputError
from latentdiff.schedules import alphas_cumprod_for, make_sigmas, training_sigmas

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1)
ACP = alphas_cumprod_for(preset("sd1"))
TOL = 1e-4
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
# (spacing, steps): every step count on SD 1.5's leading spacing, one run on each of the others
RUNS = [("leading", 1), ("leading", 2), ("leading", 10), ("leading", 25), ("trailing", 10), ("linspace", 10)]
# How each diffusers scheduler family lays out timesteps, as make_sigmas options (see test_schedules).
K_STYLE = {"leading": dict(steps_offset=1), "trailing": {}, "linspace": {}}
DDIM_STYLE = {"leading": dict(steps_offset=1), "trailing": {}, "linspace": dict(round_timesteps=True)}
MULTISTEP_STYLE = {"leading": dict(steps_offset=1, skip_lowest=True), "trailing": {},
                   "linspace": dict(skip_lowest=True, round_timesteps=True)}


@functools.cache
def network():
    """A seeded stand-in for a U-Net: mixes channels and neighbouring pixels, smooth in x and t. (No conv:
    a tiny conv2d spends milliseconds in thread hand-offs on a busy 2-core machine.)"""
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t, context=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]).view(-1, 1, 1, 1) / 1000
        mixed = torch.einsum("ij,bjhw->bihw", mix, x) + 0.2 * (x.roll(1, -1) + x.roll(1, -2))
        return torch.tanh(mixed) * 0.3 + x * (0.5 + 0.4 * t) + 0.1 * torch.sin(3 * t + x)
    return model


def initial_noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@functools.cache  # constructing KDPM2 costs ~1 s; set_timesteps resets a scheduler's stepping state
def scheduler(cls, spacing, prediction, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**SD15, timestep_spacing=spacing, prediction_type=PREDICTION[prediction], **kwargs)


def run_diffusers(sched, steps, model=None, **step_kwargs):
    model = model or network()
    sched.set_timesteps(steps)
    x = initial_noise() * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    return x


def run_ours(sampler, sigmas, prediction, *, vp, quantize=False, model=None, **kwargs):
    """Our loop from diffusers' initial sample; vp: diffusers' sample is variance preserving."""
    denoiser = DiscreteDenoiser(model or network(), ACP, prediction=prediction, quantize=quantize)
    scale = (sigmas[0] ** 2 + 1) ** 0.5 if vp else 1.0
    x = sampler(denoiser, initial_noise() * scale, sigmas, **kwargs)
    return x / (sigmas[-1] ** 2 + 1) ** 0.5 if vp else x


def max_diff(a, b):
    return (a - b).abs().max().item()


K_SAMPLERS = {"euler": (sampling.sample_euler, diffusers.EulerDiscreteScheduler),
              "heun": (sampling.sample_heun, diffusers.HeunDiscreteScheduler),
              "lms": (sampling.sample_lms, diffusers.LMSDiscreteScheduler),
              "dpm2": (sampling.sample_dpm2, diffusers.KDPM2DiscreteScheduler)}


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing,steps", RUNS)
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_k_style_samplers(name, spacing, steps, prediction):
    sampler, cls = K_SAMPLERS[name]
    sched = scheduler(cls, spacing, prediction)
    theirs = run_diffusers(sched, steps)
    # Euler-style schedulers start from noise * sqrt(sigma_max^2 + 1) with leading spacing, else
    # noise * sigma_max: take their starting sample as it is (both sides work in sigma space).
    denoiser = DiscreteDenoiser(network(), ACP, prediction=prediction)
    ours = sampler(denoiser, initial_noise() * sched.init_noise_sigma, make_sigmas(spacing, steps, ACP,
                                                                                 **K_STYLE[spacing]))
    assert max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("variant", ["karras", "exponential"])
def test_euler_karras_exponential(variant, prediction):
    sched = scheduler(diffusers.EulerDiscreteScheduler, "leading", prediction, **{f"use_{variant}_sigmas": True})
    theirs = run_diffusers(sched, 10)
    spaced = make_sigmas("leading", 10, ACP, steps_offset=1)  # Euler spans its spacing's sigma range
    sigmas = make_sigmas(variant, 10, ACP, sigma_min=spaced[-2], sigma_max=spaced[0])
    denoiser = DiscreteDenoiser(network(), ACP, prediction=prediction)
    assert max_diff(sampling.sample_euler(denoiser, initial_noise() * sched.init_noise_sigma, sigmas), theirs) <= TOL


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing,steps", [r for r in RUNS if r[0] != "linspace"])
def test_ddim(spacing, steps, prediction):
    sched = scheduler(diffusers.DDIMScheduler, spacing, prediction, clip_sample=False, set_alpha_to_one=False)
    sigmas = make_sigmas(spacing, steps, ACP, final_sigma="min", **DDIM_STYLE[spacing])
    ours = run_ours(sampling.sample_ddim, sigmas, prediction, vp=True)
    assert max_diff(ours, run_diffusers(sched, steps)) <= TOL


@pytest.mark.parametrize("spacing,steps", [r for r in RUNS if r[0] != "linspace"])
def test_plms_eps(spacing, steps):
    sched = scheduler(diffusers.PNDMScheduler, spacing, "eps", skip_prk_steps=True, set_alpha_to_one=False)
    sigmas = make_sigmas(spacing, steps, ACP, final_sigma="min", **DDIM_STYLE[spacing])
    ours = run_ours(sampling.sample_plms, sigmas, "eps", vp=True)
    assert max_diff(ours, run_diffusers(sched, steps)) <= TOL


def eps_equivalent(v_model):
    """The eps network equivalent to a v network: eps = sqrt(a) v + sqrt(1 - a) x_vp (integer t)."""
    def model(x, t, context=None):
        a = ACP[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1)
        return a.sqrt() * v_model(x, t) + (1 - a).sqrt() * x
    return model


@pytest.mark.parametrize("steps", [2, 10, 25])
def test_plms_v(steps):
    """diffusers' PNDM combines raw v predictions across steps and converts the combination to eps with
    the current sample; PLMS is a multistep method on the ODE's slope eps, which is what we combine.
    Exact check: PNDM in eps mode driving the eps network equivalent to the v network. The gap to PNDM
    in v mode is bounded where it is moderate (measured 0.17 at 10 steps, 0.070 at 25); at 2 steps it is
    2.2 (diffusers averages v from t = 501 and t = 1, where v means eps and -x0 respectively)."""
    sigmas = make_sigmas("leading", steps, ACP, final_sigma="min", steps_offset=1)
    ours = run_ours(sampling.sample_plms, sigmas, "v", vp=True)
    pndm = functools.partial(scheduler, diffusers.PNDMScheduler, "leading", skip_prk_steps=True,
                             set_alpha_to_one=False)
    assert max_diff(ours, run_diffusers(pndm("eps"), steps, model=eps_equivalent(network()))) <= TOL
    gap = max_diff(ours, run_diffusers(pndm("v"), steps))
    assert 1e-3 < gap < {2: 3.0, 10: 0.25, 25: 0.1}[steps]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_linspace_gap(steps, prediction):
    """linspace timesteps (999, 888, ...) are not T // steps apart, yet diffusers' DDIM steps from t to
    t - T // steps (999 -> 899) and calls the model at the next timestep (888) as if it were there. No
    sigma list expresses that: we step between consecutive timesteps. Measured gap 0.14-0.21 at 10 steps,
    0.025-0.037 at 50; bounded, and shrinking with steps as both converge to the same ODE solution."""
    sched = scheduler(diffusers.DDIMScheduler, "linspace", prediction, clip_sample=False, set_alpha_to_one=False)
    # the last timestep is 0 and diffusers' step from it to alphas_cumprod[0] is a no-op: end there
    sigmas = make_sigmas("linspace", steps, ACP, round_timesteps=True)[:-1]
    gap = max_diff(run_ours(sampling.sample_ddim, sigmas, prediction, vp=True), run_diffusers(sched, steps))
    assert gap < {10: 0.3, 50: 0.05}[steps]


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_eta(prediction):
    """eta > 0: DDIM's noise std in sigma space is the ancestral sigma_up; with one generator seeded
    alike, both sides draw the same noise in the same order."""
    sched = scheduler(diffusers.DDIMScheduler, "leading", prediction, clip_sample=False, set_alpha_to_one=False)
    sigmas = make_sigmas("leading", 10, ACP, final_sigma="min", steps_offset=1)
    theirs = run_diffusers(sched, 10, eta=0.6, generator=torch.Generator().manual_seed(7))
    ours = run_ours(sampling.sample_ddim, sigmas, prediction, vp=True, eta=0.6,
                    generator=torch.Generator().manual_seed(7))
    assert max_diff(ours, theirs) <= TOL
    deterministic = run_ours(sampling.sample_ddim, sigmas, prediction, vp=True)
    assert max_diff(ours, deterministic) > 0.01  # the noise did something


MULTISTEP = {"dpmpp_2m": (sampling.sample_dpmpp_2m, diffusers.DPMSolverMultistepScheduler),
             "unipc": (sampling.sample_unipc, diffusers.UniPCMultistepScheduler)}


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing,steps", RUNS + [("leading", 3)])
@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep(name, spacing, steps, prediction):
    sampler, cls = MULTISTEP[name]
    sigmas = make_sigmas(spacing, steps, ACP, **MULTISTEP_STYLE[spacing])
    ours = run_ours(sampler, sigmas, prediction, vp=True)
    assert max_diff(ours, run_diffusers(scheduler(cls, spacing, prediction), steps)) <= TOL


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_karras(name, prediction):
    """With karras sigmas these schedulers feed the model the nearest integer timestep: quantize=True."""
    sampler, cls = MULTISTEP[name]
    ours = run_ours(sampler, make_sigmas("karras", 10, ACP), prediction, vp=True, quantize=True)
    theirs = run_diffusers(scheduler(cls, "leading", prediction, use_karras_sigmas=True), 10)
    assert max_diff(ours, theirs) <= TOL


# -- callback, denoisers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "ddim", "plms", "heun", "lms", "dpm2", "dpmpp_2m", "unipc"])
def test_callback_sees_every_step(name):
    sigmas = make_sigmas("karras", 5, ACP)
    denoiser = DiscreteDenoiser(network(), ACP)
    seen = []
    final = getattr(sampling, f"sample_{name}")(denoiser, initial_noise() * sigmas[0], sigmas,
                                                  callback=seen.append)
    assert [info["i"] for info in seen] == list(range(5))
    assert [float(info["sigma"]) for info in seen] == sigmas[:-1].tolist()
    assert [float(info["sigma_next"]) for info in seen] == sigmas[1:].tolist()
    assert torch.equal(seen[0]["x"], initial_noise() * sigmas[0])
    if name not in ("plms", "lms"):  # the others take a first-order step onto sigma 0: x = denoised
        assert torch.allclose(final, seen[-1]["denoised"], atol=1e-6)
    else:  # multistep combinations of earlier slopes
        assert max_diff(final, seen[-1]["denoised"]) > 1e-4


def test_denoiser_formulas():
    """eps: x0 = x - sigma eps; v: x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1), with the model
    fed x / sqrt(sigma^2 + 1) at sigma's timestep."""
    calls = []

    def model(x, t, context):
        calls.append((x, t, context))
        return torch.full_like(x, 0.5)

    x = torch.ones(2, 1, 2, 2)
    sigma = training_sigmas(ACP)[400]
    eps = DiscreteDenoiser(model, ACP, prediction="eps")(x, sigma, cond="c")
    assert torch.allclose(eps, x - sigma * 0.5)
    assert torch.allclose(calls[0][0], x / (sigma**2 + 1) ** 0.5) and calls[0][2] == "c"
    assert calls[0][1].shape == (2,) and torch.allclose(calls[0][1], torch.tensor([400.0, 400.0]))
    v = DiscreteDenoiser(model, ACP, prediction="v")(x, sigma)
    assert torch.allclose(v, x / (sigma**2 + 1) - 0.5 * sigma / (sigma**2 + 1) ** 0.5)
    with pytest.raises(InputError, match="prediction must be 'eps' or 'v'"):
        DiscreteDenoiser(model, ACP, prediction="x0")


def test_sampling_keeps_dtype():
    """Dtype follows x: a float64 run stays float64 and agrees with float32 to float32 precision."""
    def model(x, t, context):
        return torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, 1, 1, 1) / 2000)

    denoiser = DiscreteDenoiser(model, ACP)
    sigmas = make_sigmas("karras", 10, ACP)
    x = initial_noise() * sigmas[0]
    out64 = sampling.sample_dpmpp_2m(denoiser, x.double(), sigmas.double())
    out32 = sampling.sample_dpmpp_2m(denoiser, x, sigmas)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    assert max_diff(out64, out32.double()) < 1e-4


def test_cfg_one_batched_call():
    batches = []

    def model(x, t, context):
        batches.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # depends on the context only

    base = DiscreteDenoiser(model, ACP)
    cfg = CFGDenoiser(base)
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor(2.0)
    cond, uncond = torch.full((3, 77, 8), 1.0), torch.full((3, 77, 8), -1.0)
    guided = cfg(x, sigma, cond=cond, uncond=uncond, cfg_scale=7.5)
    assert batches == [6]  # uncond and cond in one call
    expected = base(x, sigma, cond=uncond) + 7.5 * (base(x, sigma, cond=cond) - base(x, sigma, cond=uncond))
    assert torch.allclose(guided, expected, atol=1e-5)
    batches.clear()
    assert torch.equal(cfg(x, sigma, cond=cond, uncond=uncond, cfg_scale=1.0), base(x, sigma, cond=cond))
    assert batches == [3, 3]  # scale 1: no unconditional half
    with pytest.raises(InputError, match="uncond shape"):
        cfg(x, sigma, cond=cond, uncond=uncond[:1], cfg_scale=7.5)


def test_cfg_in_a_sampler():
    """extra_args reach the denoiser: cond / uncond / cfg_scale as the pipeline passes them."""
    def model(x, t, context):
        return x * 0.5 + context.mean()

    cfg = CFGDenoiser(DiscreteDenoiser(model, ACP))
    sigmas = make_sigmas("karras", 4, ACP)
    x = initial_noise()[:1] * sigmas[0]
    extra = dict(cond=torch.ones(1, 77, 8), uncond=torch.zeros(1, 77, 8), cfg_scale=3.0)
    guided = sampling.sample_euler(cfg, x, sigmas, extra_args=extra)
    plain = sampling.sample_euler(cfg, x, sigmas, extra_args=dict(extra, cfg_scale=1.0))
    assert max_diff(guided, plain) > 0.1


# -- registry --------------------------------------------------------------------------------------

@pytest.mark.parametrize("typed,function,schedule", [
    ("DPM++ 2M Karras", "sample_dpmpp_2m", "karras"),
    ("Euler a", "sample_euler_a", "normal"),
    ("euler_ancestral", "sample_euler_a", "normal"),
    ("k_euler_a", "sample_euler_a", "normal"),
    ("DDIM", "sample_ddim", "ddim_uniform"),
    ("ddim", "sample_ddim", "ddim_uniform"),
    ("UniPC", "sample_unipc", "normal"),
    ("LMS", "sample_lms", "normal"),
    ("k_lms", "sample_lms", "normal"),
    ("Heun", "sample_heun", "normal"),
    ("DPM2", "sample_dpm2", "normal"),
    ("DPM2 a", "sample_dpm2_a", "normal"),
    ("DPM++ SDE", "sample_dpmpp_sde", "normal"),
    ("DPM++ 2M SDE Karras", "sample_dpmpp_2m_sde", "karras"),
    ("DPM++ 2S a", "sample_dpmpp_2s_a", "normal"),
    ("k_dpmpp_2s_ancestral", "sample_dpmpp_2s_a", "normal"),
    ("DDPM", "sample_ddpm", "ddim_uniform"),
    ("LCM", "sample_lcm", "sgm_uniform"),
    ("PLMS", "sample_plms", "ddim_uniform"),
    ("dpmpp-2m exponential", "sample_dpmpp_2m", "exponential"),
    ("Euler SGM Uniform", "sample_euler", "sgm_uniform"),
])
def test_resolve_sampler(typed, function, schedule):
    fn, sched = sampling.resolve_sampler(typed)
    assert (fn.__name__, sched) == (function, schedule)


def test_registry_listing_and_errors():
    names = sampling.sampler_names()
    assert names == [name for name, _ in sampling.sampler_table()]
    for name in names:  # every listed name resolves to its own entry
        spec = sampling.SAMPLERS[name]
        assert sampling.resolve_sampler(name) == (spec.fn, spec.default_schedule)
    with pytest.raises(InputError, match=r"unknown sampler 'Eular'; choose one of .*DPM\+\+ 2M.*karras"):
        sampling.resolve_sampler("Eular")
    with pytest.raises(InputError, match="sigmas"):
        sampling.sample_euler(DiscreteDenoiser(network(), ACP), initial_noise(), torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match="eta must be >= 0"):
        sampling.sample_ddim(DiscreteDenoiser(network(), ACP), initial_noise(), torch.tensor([1.0, 0.0]), eta=-1)


@pytest.mark.parametrize("name", sampling.sampler_names())
def test_sampler_spec_says_what_the_sampler_needs(name):
    """takes_eta is the function's own eta parameter; a sampler whose noise is "none" never draws, and one
    that needs noise draws (DDIM with eta > 0), so the pipeline can go by the metadata alone."""
    spec = sampling.SAMPLERS[name]
    assert spec.takes_eta == ("eta" in inspect.signature(spec.fn).parameters)
    assert spec.noise in ("none", "independent", "brownian")
    draws = []

    def noise_sampler(sigma, sigma_next):
        draws.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(initial_noise())

    sigmas = make_sigmas(spec.default_schedule, 3, ACP)
    spec.fn(DiscreteDenoiser(network(), ACP), initial_noise() * sigmas[0], sigmas, noise_sampler=noise_sampler,
            **({"eta": 0.5} if spec.takes_eta else {}))
    assert bool(draws) == (spec.noise != "none")


@pytest.mark.parametrize("typed,canonical", [
    ("dpmpp_2m_karras", ("DPM++ 2M", "karras")),
    ("DPM++ 2M", ("DPM++ 2M", None)),
    ("k_euler_a", ("Euler a", None)),
    ("euler_ancestral", ("Euler a", None)),
    ("dpmpp_sde_exponential", ("DPM++ SDE", "exponential")),
    ("pndm", ("PLMS", None)),
    ("Euler SGM Uniform", ("Euler", "sgm_uniform")),
])
def test_canonical_sampler_name(typed, canonical):
    assert sampling.canonical_sampler_name(typed) == canonical
    spec, schedule = sampling.sampler_spec(typed)
    assert spec.name == canonical[0] and schedule == (canonical[1] or spec.default_schedule)


def test_canonical_names_are_a1111s_and_unknown_names_are_refused():
    # DDPM is not an A1111 sampler: it keeps the name diffusers and ComfyUI give it
    assert set(sampling.sampler_names()) - {"DDPM"} <= {  # A1111's sampler list (v1.9 and later)
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
        "PLMS", "UniPC", "LCM"}
    with pytest.raises(InputError, match="unknown sampler 'dpmpp_9m'"):
        sampling.canonical_sampler_name("dpmpp_9m")


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ SDE"])
def test_pipeline_draws_the_noise_the_spec_names(name, monkeypatch):
    """The pipeline reads a sampler's needs from its spec: no noise sampler for "none", the per-image
    generators' draws for "independent", those draws as a Brownian path for "brownian"."""
    import latentdiff.pipeline as pipeline_module
    import latentdiff.sampling as sampling_module
    from latentdiff.pipeline import Pipeline
    from tiny import SD1, tiny_model

    seen, brownian = [], []
    resolve, make_brownian = sampling_module.sampler_spec, pipeline_module.brownian_noise_sampler

    def spy(typed):
        spec, schedule = resolve(typed)

        def run(*args, noise_sampler=None, **kwargs):
            seen.append(noise_sampler)
            return spec.fn(*args, noise_sampler=noise_sampler, **kwargs)
        return dataclasses.replace(spec, fn=run), schedule

    def spy_brownian(x, **kwargs):
        brownian.append(make_brownian(x, **kwargs))
        return brownian[-1]

    monkeypatch.setattr(sampling_module, "sampler_spec", spy)
    monkeypatch.setattr(pipeline_module, "brownian_noise_sampler", spy_brownian)
    Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32).txt2img("a", steps=2, sampler=name, seed=1,
                                                                         progress=False)
    noise = sampling.SAMPLERS[name].noise
    assert (seen[0] is None) == (noise == "none")
    assert (seen[0] is not None and seen[0] in brownian) == (noise == "brownian")
