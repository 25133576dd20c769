"""Exponential moving average of a module's weights, the copy of the U-Net that ships.

Averaging the last few thousand optimizer steps smooths out the step-to-step noise of the weights,
which diffusion samples show as colour and shape jitter between nearby checkpoints.
"""

import torch
from torch import nn

from ..errors import CheckpointError, InputError


class EMA:
    """shadow <- d * shadow + (1 - d) * param after every optimizer step, with d = decay_at(step).

    The shadow is kept in float32 whatever the training dtype: with d close to 1, a bf16/fp16 shadow
    would round most updates away.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise InputError(f"EMA decay must be in [0, 1), got {decay}; typical values are 0.999 to 0.9999")
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step `step` (0-based): with `warmup`, it ramps up as
        (1 + step) / (10 + step) so the average does not stay anchored to random initial weights for
        thousands of steps; a fine-tune starts from trained weights, which the average may keep."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for name, p in module.named_parameters():
            # lerp_(p, 1 - d) computes shadow + (1 - d) * (p - shadow) = d * shadow + (1 - d) * p
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's parameters with the averaged weights (cast to each parameter's dtype)."""
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
            raise CheckpointError(f"EMA state does not match the model: missing {missing[:3]}, unexpected "
                                  f"{extra[:3]}; the checkpoint was saved for another architecture")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
