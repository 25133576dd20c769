"""Resumable training checkpoints without pickles: tensors in a safetensors file, the rest in JSON.

A stage's folder holds two files:

- `state.safetensors`: the trained module's weights (`module.*`), the EMA shadow (`ema.*`) and every
  optimizer state tensor, flattened as `optimizer.<param index>.<name>` (Adam's exp_avg, exp_avg_sq, step);
- `state.json`: the step counter, the optimizer's param groups (hyper-parameters), any non-tensor optimizer
  state, the mixed-precision loss scaler's state, and whatever the stage adds (e.g. wall time).

Both are written to temporary files and renamed, tensors first; both carry the step, and loading refuses a
pair whose steps disagree (a crash between the two renames), so a resume never mixes two checkpoints.
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_state_dict, safetensors_metadata, save_safetensors
from ..errors import CheckpointError
from .ema import EMA

TENSORS, SIDECAR = "state.safetensors", "state.json"


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json_part) holding everything `optimizer.state_dict()` holds."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], json_part: dict) -> dict:
    """The inverse of flatten_optimizer: a dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in json_part["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": json_part["param_groups"]}


def has_state(folder: str | Path) -> bool:
    return (Path(folder) / SIDECAR).is_file()


def save_state(folder: str | Path, *, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
               ema: EMA | None = None, scaler=None, extra: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v.cpu() for k, v in ema.state_dict().items()}
    optimizer_tensors, optimizer_json = flatten_optimizer(optimizer)
    tensors |= optimizer_tensors
    save_safetensors(tensors, folder / TENSORS, metadata={"step": str(step)}, overwrite=True)
    sidecar = {"step": step, "optimizer": optimizer_json,
               "scaler": scaler.state_dict() if scaler is not None else None, **(extra or {})}
    tmp = folder / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(sidecar, indent=1))
    os.replace(tmp, folder / SIDECAR)


def load_state(folder: str | Path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
               ema: EMA | None = None, scaler=None) -> dict:
    """Restore module, optimizer, EMA and scaler in place; returns the JSON sidecar (step, extras)."""
    folder = Path(folder)
    sidecar = json.loads((folder / SIDECAR).read_text())
    tensor_step = safetensors_metadata(folder / TENSORS).get("step")
    if tensor_step != str(sidecar["step"]):
        raise CheckpointError(f"{folder}: {TENSORS} is from step {tensor_step} but {SIDECAR} from step "
                              f"{sidecar['step']} (interrupted while saving); delete the folder to restart "
                              "this stage")
    tensors = read_state_dict(folder / TENSORS)
    parts: dict[str, dict[str, torch.Tensor]] = {"module": {}, "ema": {}, "optimizer": {}}
    for key, value in tensors.items():
        kind, name = key.split(".", 1)
        parts[kind][name if kind != "optimizer" else key] = value
    try:
        module.load_state_dict(parts["module"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder / TENSORS}: the weights do not fit this model ({e}); the training "
                              "config changed since the checkpoint was written: use a new --out folder") from e
    if ema is not None:
        ema.load_state_dict(parts["ema"])
    optimizer.load_state_dict(unflatten_optimizer(parts["optimizer"], sidecar["optimizer"]))
    if scaler is not None and sidecar.get("scaler"):
        scaler.load_state_dict(sidecar["scaler"])
    return sidecar
