"""Networks as denoisers: D(x, sigma) -> the predicted clean x0, the one interface every sampler uses.

A U-Net trained as a DDPM takes the variance-preserving input sqrt(a) (x0 + sigma eps) at an integer
timestep and predicts eps (SD 1.x, SD 2.x-base) or v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x-v). The
wrapper scales the sampler's x by c_in = 1 / sqrt(sigma^2 + 1) = sqrt(a), finds the timestep of sigma by
interpolating in log sigma (fractional between training steps), and turns the prediction into x0.
"""

from dataclasses import replace

import torch

from .conditioning import Cond, as_cond, cat_conds
from .errors import InputError
from .devices import to_device
from .schedules import sigma_to_t, training_sigmas


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (batch,) tensor: samplers pass one sigma for the whole batch. It stays where it is (the
    samplers' sigmas are on the host; DiscreteDenoiser moves what the network needs without a sync)."""
    sigma = torch.as_tensor(sigma)
    sigma = sigma if sigma.is_floating_point() else sigma.float()
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class DiscreteDenoiser:
    """D(x, sigma, cond=None) around `model(x_in, t, context, **parts) -> eps or v` trained on discrete
    timesteps. `cond` is a Cond (or a bare context tensor): its `concat` channels join the scaled latents,
    x_in = cat([c_in * x, concat]), and its other set parts (y, control) reach the model by keyword.

    prediction: "eps" or "v". quantize: feed the nearest integer timestep instead of the fractional one
    (diffusers' DPMSolverMultistep / UniPC do this with karras sigmas). Holds no state between calls.
    """

    def __init__(self, model, alphas_cumprod: torch.Tensor, *, prediction: str = "eps", quantize: bool = False):
        if prediction not in ("eps", "v"):
            raise InputError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.model = model
        self.prediction = prediction
        self.quantize = quantize
        # on the host, like the samplers' sigmas: each step's timestep is found there, with no GPU sync
        self.log_sigmas = training_sigmas(alphas_cumprod.float()).cpu().log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma.to(self.log_sigmas.device), self.log_sigmas, self.quantize)

    def __call__(self, x: torch.Tensor, sigma, cond: Cond | torch.Tensor | None = None) -> torch.Tensor:
        sigma, cond = _per_sample(sigma, x), as_cond(cond)
        t = to_device(self.sigma_to_t(sigma), x.device)
        s = to_device(sigma, x.device).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        x_in = x / (s**2 + 1) ** 0.5
        if cond is None:
            out = self.model(x_in, t, None)
        else:
            if cond.concat is not None:  # conditioning images are not noisy: no c_in on them
                x_in = torch.cat([x_in, cond.concat.to(x_in.dtype)], dim=1)
            out = self.model(x_in, t, cond.context, **cond.network_parts())
        if self.prediction == "eps":
            return x - s * out
        # v: x0 = sqrt(a) * x_vp - sqrt(1 - a) * v, written in sigma space
        return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5


class CFGDenoiser:
    """Classifier-free guidance around a denoiser: D_uncond + cfg_scale * (D_cond - D_uncond).

    Conditional and unconditional halves run as one batched call (uncond first, as diffusers orders them),
    their Cond records joined field by field (a bare tensor is a record's context); cfg_scale 1.0 or
    uncond None skips the unconditional half. Guidance on x0 equals guidance on eps or v for the same x and
    sigma, since x0 is affine in the prediction.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma, *, cond: Cond | torch.Tensor,
                 uncond: Cond | torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
        if cfg_scale == 1.0 or uncond is None:
            return self.denoiser(x, sigma, cond)
        sigma = _per_sample(sigma, x)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             cat_conds([as_cond(uncond), as_cond(cond)]))
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + (d_cond - d_uncond) * cfg_scale


class InstructCFGDenoiser:
    """Three-way guidance around a denoiser whose records carry the image latents in `concat`:

        D = D(u, 0) + cfg_scale * (D(c, I) - D(u, I)) + image_cfg_scale * (D(u, I) - D(u, 0))

    c, u: the prompt's and the negative prompt's features; I: the image latents, 0: zeros in their place.
    One batched call in diffusers' order (c + I, u + I, u + 0). With both scales 1 it is D(c, I), one call.
    Unlike diffusers, which turns all guidance off when cfg_scale <= 1 or image_cfg_scale < 1, any scales
    are taken as given (A1111 does the same). Guidance on x0 equals guidance on eps (x0 is affine in eps).
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma, *, cond: Cond, uncond: Cond | None, cfg_scale: float,
                 image_cfg_scale: float) -> torch.Tensor:
        cond = as_cond(cond)
        if cfg_scale == 1.0 and image_cfg_scale == 1.0 or uncond is None:
            return self.denoiser(x, sigma, cond)
        uncond = as_cond(uncond)
        no_image = replace(uncond, concat=torch.zeros_like(uncond.concat))
        sigma = _per_sample(sigma, x)
        out = self.denoiser(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]),
                            cat_conds([cond, uncond, no_image]))
        d_cond, d_image, d_uncond = out.chunk(3)
        return d_uncond + cfg_scale * (d_cond - d_image) + image_cfg_scale * (d_image - d_uncond)
