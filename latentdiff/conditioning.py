"""The conditioning record: everything besides the noisy latents that one U-Net call is conditioned on.

A `Cond` holds one batch's cross-attention context and the optional parts other model families add:
channels concatenated to the latents (inpainting: mask + masked-image latents; InstructPix2Pix: image
latents), a pooled vector `y` (SDXL's label embedding input) and ControlNet residuals. Classifier-free
guidance batches an uncond and a cond record field by field (`cat_conds`); a part missing from both
stays None. The denoiser joins `concat` to the scaled latents; the other parts go to the network.
"""

from dataclasses import dataclass, fields

import torch

from .errors import InputError


@dataclass(frozen=True)
class Control:
    """ControlNet residuals: `skips` are added to the U-Net's skip connections (one per input block, in
    order), `middle` to the middle block's output."""

    skips: tuple[torch.Tensor, ...]
    middle: torch.Tensor


@dataclass(frozen=True)
class Cond:
    """context: (B, tokens, context_dim); concat: (B, C, h, w) beside the latents, NOT scaled by the
    denoiser's c_in (ldm's "hybrid" conditioning); y: (B, features); control: Control."""

    context: torch.Tensor
    concat: torch.Tensor | None = None
    y: torch.Tensor | None = None
    control: Control | None = None

    def network_parts(self) -> dict:
        """The parts the network takes as keyword arguments (y, control), only those that are set, so a
        network that knows only `model(x, t, context)` keeps working for plain text conditioning."""
        return {name: value for name in ("y", "control") if (value := getattr(self, name)) is not None}


def as_cond(cond) -> Cond | None:
    """A Cond as it is, None as None, anything else (a context tensor) as Cond(context=it)."""
    return cond if cond is None or isinstance(cond, Cond) else Cond(context=cond)


def map_tensors(value, fn):
    """`value` with fn applied to every tensor inside it (Cond, Control, tuples, lists, dicts; None kept)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (Cond, Control)):
        return type(value)(**{f.name: map_tensors(getattr(value, f.name), fn) for f in fields(value)})
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


# what to do when a part's shapes differ between the records guidance batches
_HINTS = {"context": "encode the negative prompt for every image of the batch"}


def _cat(parts: list, where: str):
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise InputError(f"classifier-free guidance: {where} is set in some conditioning records and not in "
                         f"others; give the uncond record the same parts as the cond record")
    if isinstance(parts[0], (tuple, list)):
        if len({len(p) for p in parts}) != 1:
            raise InputError(f"classifier-free guidance: {where} holds {[len(p) for p in parts]} tensors in "
                             f"the uncond and cond records; they must hold as many")
        return tuple(_cat(list(group), f"{where}[{i}]") for i, group in enumerate(zip(*parts)))
    if isinstance(parts[0], Control):
        return Control(**{f.name: _cat([getattr(p, f.name) for p in parts], f"{where}.{f.name}")
                          for f in fields(Control)})
    shapes = [tuple(p.shape) for p in parts]
    if len(set(shapes)) != 1:
        hint = _HINTS.get(where, "build both records for the same batch and image size")
        raise InputError(f"classifier-free guidance: uncond shape {shapes[0]} differs from cond shape "
                         f"{shapes[1]} in {where}; {hint}")
    return torch.cat(parts)


def cat_conds(conds: list[Cond]) -> Cond:
    """One record for the batch of all of `conds`' images, in order, field by field."""
    return Cond(**{f.name: _cat([getattr(c, f.name) for c in conds], f.name) for f in fields(Cond)})


# What the extra input channels of a U-Net with more inputs than outputs hold: the families whose
# conditioning the pipeline must build (channels: in - out).
CONCAT_FAMILIES = {5: "an inpainting U-Net (latents + mask + masked-image latents)",
                   4: "an InstructPix2Pix U-Net (latents + image latents)",
                   3: "an upscaler U-Net (latents + low-resolution image)",
                   1: "a depth-conditioned U-Net (latents + depth map)"}


def concat_family(in_channels: int, out_channels: int) -> str:
    """Which family a U-Net with `in_channels` inputs and `out_channels` outputs belongs to, in words."""
    return CONCAT_FAMILIES.get(in_channels - out_channels,
                               f"a U-Net with {in_channels - out_channels} extra input channels")
