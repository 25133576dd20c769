"""Reversible weight patches: named parameters changed in place (a LoRA merged into its layers' weights)
and put back bit for bit.

A patch is a delta added to the parameter, or a function of the parameter returning its new value. Values
are written into the parameters themselves (`copy_` under no_grad), never by rebinding them, so whatever
holds a parameter or a view of it sees the change: the fused q/k/v projections (speedups.FusedLinear,
whose layers' weights are views into one concatenated tensor) read the written values directly, and the
pre-packed convolutions (speedups.PackedConv2d) repack because the weight's version counter moved
(speedups.weight_source). The originals are kept as copies, so restoring is exact, not a subtraction.
"""

import difflib
from collections.abc import Callable

import torch
from torch import nn

from .errors import InputError, LatentDiffError

Patch = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


class Patched:
    """The handle of applied patches: `restore()` puts the original values back (bit for bit); as a context
    manager it restores on exit. Patch sets on one model stack: restore the newest first (nested `with`)."""

    def __init__(self, params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor]):
        self._params, self._originals = params, originals

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        """The patched parameters' values before the patches (to read, not to change)."""
        return dict(self._originals or {})

    def restore(self) -> None:
        if self._originals is None:
            raise LatentDiffError("these weight patches were already restored")
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self._originals = None

    def __enter__(self) -> "Patched":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _check_shape(name: str, what: str, value, param: torch.Tensor) -> None:
    """Exactly the parameter's shape: a delta that merely broadcasts is a mistake, not a patch."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"weight patch for {name!r}: {what} has shape {shape}, the parameter {tuple(param.shape)}")


def _new_value(name: str, param: torch.Tensor, patch: Patch) -> torch.Tensor:
    if callable(patch):
        new = patch(param.detach())
        _check_shape(name, "the patch function's result", new, param)
    else:  # the sum in at least fp32, rounded once to the parameter's dtype (a LoRA delta on bf16 weights)
        _check_shape(name, "the delta", patch, param)
        acc = torch.promote_types(param.dtype, torch.float32)
        new = param.detach().to(acc) + patch.to(param.device, acc)
    if not torch.isfinite(new).all():
        raise InputError(f"weight patch for {name!r}: the patched values are not finite (NaN/Inf in the patch?)")
    return new.to(param.device, param.dtype)


def apply_patches(model: nn.Module, patches: dict[str, Patch]) -> Patched:
    """Patch `model`'s parameters by name (as `model.named_parameters()` spells them): a tensor is added,
    a function `f(weight) -> new weight` replaces. All patches are checked before any is applied, so a bad
    one leaves the model as it was. Returns the handle that restores them."""
    params = dict(model.named_parameters())
    for name in patches:
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"weight patch for {name!r}: the model has no such parameter{hint}")
        if params[name].is_inference():
            raise LatentDiffError(f"weight patch for {name!r}: the parameter is an inference tensor (made under "
                                  f"torch.inference_mode), whose in-place changes the fast paths cannot see; "
                                  f"load and run the model under torch.no_grad() instead")
    with torch.no_grad():
        new = {name: _new_value(name, params[name], patch) for name, patch in patches.items()}
        originals = {name: params[name].detach().clone() for name in new}
        for name, value in new.items():
            params[name].copy_(value)
    return Patched({name: params[name] for name in new}, originals)
