"""kohya / A1111 LoRA files for SD 1.x and 2.x, as weight deltas merged through patches.py.

A kohya file names each adapted layer by its diffusers module path with "." written "_":
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` and
`lora_te_text_model_encoder_layers_0_self_attn_q_proj` (the transformers CLIP names, for SD 1.x's CLIP and
for SD 2.x's OpenCLIP tower alike: kohya trains both through transformers' CLIPTextModel). Each layer holds
`.lora_down.weight` (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]) and optionally `.alpha`;
its delta is up @ down * alpha / rank * weight. The "_" is ambiguous (`to_q`, `attn1`), so names are
matched against this model's own layer names written the same way, never split.

Read: plain LoRA and LoCon (3x3 convolutions: a 3x3 down and a 1x1 up make a 3x3 delta).
Refused, one line each: LyCORIS' LoHa / LoKr / Tucker (`lora_mid`) / DoRA keys, keys that name no layer of
the model (another architecture, e.g. SDXL's `lora_te1_`), deltas whose shape does not fit the layer.
"""

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import file_sha256, read_state_dict
from ..errors import CheckpointError
from ..model import StableDiffusion
from .unet_keys import unet_key_table

UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer."  # our parameter prefixes
_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
_UNSUPPORTED = {".lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)", ".hada_w1_a": "LoHa",
                ".lokr_w1": "LoKr", ".dora_scale": "DoRA", ".diff": "a full-weight difference (LyCORIS 'full')"}


def kohya_names(model: StableDiffusion) -> dict[str, str]:
    """kohya layer name -> our weight's parameter name, for every weight of the U-Net and text encoder."""
    names = {}
    for ldm, diffusers in unet_key_table(model.config.unet):
        if diffusers.endswith(".weight"):
            names["lora_unet_" + diffusers[: -len(".weight")].replace(".", "_")] = UNET + ldm
    for name, _ in model.text_encoder.named_parameters():
        if name.startswith("transformer.text_model.") and name.endswith(".weight"):
            kohya = "lora_te_" + name[len("transformer."): -len(".weight")].replace(".", "_")
            names[kohya] = "cond_stage_model." + name
    return names


def lora_deltas(path, model: StableDiffusion, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{our parameter name: fp32 delta} of the LoRA file at `path` at strength `weight`, checked against
    `model` (names and shapes) before anything is applied. CheckpointError with a one-line reason otherwise."""
    path = Path(path)
    sd = read_state_dict(path)  # safetensors, or a code-free pickle; truncated files are refused there
    for key in sd:
        for suffix, what in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise CheckpointError(f"{path}: key {key!r} is {what}: not supported yet (plain LoRA and "
                                      "LoCon files are)")
    layers = {}
    for key in sd:
        layer = next((key[: -len(p)] for p in _PARTS if key.endswith(p)), None)
        if layer is None:
            raise CheckpointError(f"{path}: key {key!r} is not a kohya LoRA key (expected '<layer>.lora_down.weight',"
                                  " '.lora_up.weight' or '.alpha'); is this a LoRA file? (diffusers/PEFT-format "
                                  "LoRA files are not supported yet)")
        layers.setdefault(layer, {})[key[len(layer) + 1:]] = sd[key]
    names = kohya_names(model)
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} of {len(layers)} LoRA layers match no layer of this "
                              f"{model.config.name} model (first: {', '.join(map(repr, unknown[:3]))}; "
                              f"{len(layers) - len(unknown)} matched); a LoRA for another architecture "
                              "(SD 1.x/2.x kohya names expected)")
    params = dict(model.named_parameters())
    return {names[layer]: _delta(path, layer, parts, params[names[layer]], weight)
            for layer, parts in layers.items()}


def _delta(path: Path, layer: str, parts: dict, param: nn.Parameter, weight: float) -> torch.Tensor:
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise CheckpointError(f"{path}: layer {layer!r} lacks its lora_down or lora_up weight")
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
    alpha = alpha or rank  # kohya and A1111: no alpha, or alpha 0, scales by 1
    target = tuple(param.shape)
    fits = (up.dim() == down.dim() in (2, 4) and up.shape[1] == rank and up[0, 0].numel() == 1
            and up.shape[0] == target[0] and down.shape[1] == target[1] and down[0].numel() == param[0].numel())
    if not fits:
        raise CheckpointError(f"{path}: layer {layer!r}: lora_up {tuple(up.shape)} @ lora_down {tuple(down.shape)} "
                              f"does not fit the model's weight {target}; a LoRA for another architecture")
    # (out, rank) @ (rank, in * kh * kw): a 1x1 up over a 3x3 down is a 3x3 delta, as kohya merges LoCon
    delta = up.flatten(1) @ down.flatten(1)
    return (delta * (alpha / rank * weight)).reshape(target)


def lora_hash(path) -> str:
    """A1111's short hash of a LoRA file for its `Lora hashes` infotext entry: the first 12 hex digits of the
    sha256 of a safetensors file's tensor data, its header skipped (A1111's "addnet" hash, the one kohya's
    additional-networks extension introduced, so metadata edits keep the hash); a pickle hashes whole."""
    start = 0
    if Path(path).suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
    return file_sha256(path, start=start)[:12]
