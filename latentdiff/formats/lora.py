"""LoRA and LyCORIS files for SD 1.x and 2.x, read into weight deltas that patches.py merges.

Layer names, in the two namings in circulation:
- kohya / A1111 / LyCORIS: the diffusers module path with "." written "_", prefixed `lora_unet_` or
  `lora_te_` (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`,
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj`: transformers' CLIP names, for SD 1.x's CLIP and
  SD 2.x's OpenCLIP tower alike, since kohya trains both through CLIPTextModel); the ldm path written the
  same way (`lora_unet_input_blocks_1_1_proj_in`) is read too, as ComfyUI reads it. The "_" is ambiguous
  (`to_q`, `attn1`), so names are matched against this model's own layer names written the same way.
- diffusers / peft: `unet.<diffusers module>` and `text_encoder.<transformers module>` with peft's
  `.lora_A.weight` / `.lora_B.weight` (and `.lora_magnitude_vector`, peft's DoRA), or the older
  `.lora.down/.up`, `.lora_linear_layer.down/.up` and attention-processor `.processor.to_q_lora.down/.up`.

Each layer's parts make one algorithm (formats/lycoris.py: LoRA, LoCon with Tucker, LoHa, LoKr, full, each
optionally DoRA); its delta is scaled by alpha / rank and the strength, which may differ between the text
encoder and the U-Net (A1111's `<lora:name:te:unet>`). Everything is checked against the model (names,
shapes) before any delta exists; a file that does not fit is refused with one line naming it.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import file_sha256, read_state_dict, safetensors_metadata
from ..errors import CheckpointError
from ..model import StableDiffusion
from . import lycoris
from .unet_keys import unet_key_table

UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer."  # our parameter prefixes
# the parts of a layer as kohya and LyCORIS name them, after "<layer>."
_KOHYA_PARTS = tuple(sorted({p for name, parts in lycoris.ALGORITHMS.items() for p in parts + lycoris.OPTIONAL[name]}
                            | {"alpha", "dora_scale"}, key=len, reverse=True))
# diffusers / peft part suffixes -> the kohya part they are
_DIFFUSERS_PARTS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                    ".lora_magnitude_vector": "magnitude", ".lora.down.weight": "lora_down.weight",
                    ".lora.up.weight": "lora_up.weight", ".lora_linear_layer.down.weight": "lora_down.weight",
                    ".lora_linear_layer.up.weight": "lora_up.weight", "_lora.down.weight": "lora_down.weight",
                    "_lora.up.weight": "lora_up.weight", ".alpha": "alpha"}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")  # the attention-processor format's layer names
# algorithms seen in the wild that this reader does not merge, by a part only they have
_UNSUPPORTED = {"oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT", "oft_R": "BOFT", "a1.weight": "GLoRA",
                "w_norm": "a LyCORIS norm layer", "b_norm": "a LyCORIS norm layer", "on_input": "(IA)^3"}
Strength = float | tuple[float, float]  # one multiplier, or (text encoder, U-Net) as A1111's tags give


@dataclass(frozen=True)
class Layer:
    """One adapted weight: our parameter's name, the algorithm, its parts (tensors as the file holds them)."""

    param: str
    algorithm: str
    parts: dict

    @property
    def in_unet(self) -> bool:
        return self.param.startswith(UNET)


def kohya_names(model: StableDiffusion) -> dict[str, str]:
    """kohya's own name of each layer (the diffusers module path for the U-Net, transformers' for the text
    encoder) -> our weight's parameter name: one name per weight, the names LoRA training writes."""
    names = {}
    for ldm, diffusers in unet_key_table(model.config.unet):
        if diffusers.endswith(".weight"):
            names["lora_unet_" + diffusers[: -len(".weight")].replace(".", "_")] = UNET + ldm
    for name, _ in model.text_encoder.named_parameters():
        if name.startswith("transformer.text_model.") and name.endswith(".weight"):
            module = name[len("transformer."): -len(".weight")]
            names["lora_te_" + module.replace(".", "_")] = "cond_stage_model." + name
    return names


def layer_names(model: StableDiffusion) -> dict[str, str]:
    """Every name a LoRA file may give a layer of `model` -> our weight's parameter name: kohya's, kohya's
    spelling of the ldm path (ComfyUI reads those), diffusers / peft module paths, and text-encoder names
    without `text_model.` (transformers 5 and LyCORIS 4 omit it)."""
    names = kohya_names(model)
    for ldm, diffusers in unet_key_table(model.config.unet):
        if diffusers.endswith(".weight"):
            names["lora_unet_" + ldm[: -len(".weight")].replace(".", "_")] = UNET + ldm
            names["unet." + diffusers[: -len(".weight")]] = UNET + ldm
    for name, _ in model.text_encoder.named_parameters():
        if name.startswith("transformer.text_model.") and name.endswith(".weight"):
            module = name[len("transformer."): -len(".weight")]
            ours = "cond_stage_model." + name
            short = module.removeprefix("text_model.")
            names["lora_te_" + short.replace(".", "_")] = ours
            names["text_encoder." + module] = names["text_encoder." + short] = ours
    return names


def read_lora(path, model: StableDiffusion) -> list[Layer]:
    """The layers of the LoRA / LyCORIS file at `path`, checked against `model` (names, algorithms, shapes).
    CheckpointError with a one-line reason naming the file otherwise."""
    path = Path(path)
    sd = read_state_dict(path)  # safetensors, or a code-free pickle; truncated files are refused there
    layers = _group(path, sd)
    _peft_alphas(path, layers)
    names = layer_names(model)
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} of {len(layers)} LoRA layers match no layer of this "
                              f"{model.config.name} model (first: {', '.join(map(repr, unknown[:3]))}; "
                              f"{len(layers) - len(unknown)} matched); a LoRA for another architecture "
                              "(SD 1.x/2.x kohya or diffusers names expected)")
    params = dict(model.named_parameters())
    found = []
    for layer, parts in layers.items():
        try:
            name = lycoris.algorithm(parts)
            found.append(Layer(names[layer], name, parts))
            _check_fits(found[-1], params)
        except ValueError as e:
            raise CheckpointError(f"{path}: layer {layer!r}: {e}") from None
    return found


def lora_deltas(path, model: StableDiffusion, strength: Strength = 1.0,
                originals: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{our parameter name: fp32 delta} of the file at `path` at `strength` (one number, or (text encoder,
    U-Net)). DoRA layers rescale the original weights: `originals` holds those that differ from the model's
    current values (a merge being replaced)."""
    return layer_deltas(read_lora(path, model), model, strength, originals)


def layer_deltas(layers: list[Layer], model: StableDiffusion, strength: Strength = 1.0,
                 originals: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    te, unet = strength if isinstance(strength, (tuple, list)) else (strength, strength)
    params, originals = dict(model.named_parameters()), originals or {}
    deltas = {}
    for layer in layers:
        s = unet if layer.in_unet else te
        weight = params[layer.param]
        d = lycoris.delta(layer.algorithm, layer.parts).reshape(weight.shape)
        d = d * lycoris.scale(layer.algorithm, layer.parts)
        if _dora(layer):
            w0 = originals.get(layer.param, weight).detach().float().cpu()
            d = lycoris.dora(w0 + d, *_dora(layer)) - w0
        deltas[layer.param] = d * s
        if "diff_b" in layer.parts:
            deltas[_bias(layer.param)] = layer.parts["diff_b"].float() * s
    return deltas


def _group(path: Path, sd: dict) -> dict[str, dict]:
    """{layer name: {part: tensor}}, the parts named as kohya / LyCORIS name them."""
    layers = {}
    for key, value in sd.items():
        diffusers = key.startswith(("unet.", "text_encoder."))
        suffix = next((s for s in _DIFFUSERS_PARTS if key.endswith(s)), None) if diffusers else \
            next((s for s in _KOHYA_PARTS if key.endswith("." + s)), None)
        if suffix is None:
            what = next((f" ({name}, not supported)" for part, name in _UNSUPPORTED.items() if key.endswith(part)), "")
            raise CheckpointError(f"{path}: key {key!r} is not a LoRA/LyCORIS part{what}; LoRA, LoCon, LoHa, LoKr, "
                                  "full and DoRA layers in kohya or diffusers/peft naming are read: is this a LoRA "
                                  "file?")
        if diffusers:
            layer, part = key[: -len(suffix)], _DIFFUSERS_PARTS[suffix]
            layer = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m[1] == "to_out" else m[1]), layer)
        else:
            layer, part = key[: -len(suffix) - 1], suffix
        layers.setdefault(layer, {})[part] = value
    if not layers:
        raise CheckpointError(f"{path}: holds no tensors; not a LoRA file")
    return layers


def _peft_alphas(path: Path, layers: dict[str, dict]) -> None:
    """Give diffusers/peft layers the alpha their file's peft configs hold (diffusers writes them as JSON in the
    safetensors metadata, `lora_adapter_metadata`: `unet.lora_alpha`, `unet.alpha_pattern` by module name);
    without one a peft layer scales by 1 (alpha = rank), as diffusers loads it."""
    raw = safetensors_metadata(path).get("lora_adapter_metadata")
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not JSON; the file is damaged") from None
    for layer, parts in layers.items():
        prefix, _, module = layer.partition(".")
        if "alpha" in parts or not module or f"{prefix}.lora_alpha" not in config:
            continue
        patterns = config.get(f"{prefix}.alpha_pattern") or {}
        alpha = next((a for k, a in patterns.items() if module == k or module.endswith("." + k)),
                     config[f"{prefix}.lora_alpha"])
        parts["alpha"] = torch.tensor(float(alpha))


def _check_fits(layer: Layer, params: dict) -> None:
    """ValueError unless the layer's parts are finite and its delta has the weight's shape (flattened kernels
    aside; the shape is built from the parts' shapes alone, on the meta device)."""
    weight = params[layer.param]
    target = tuple(weight.shape)
    if "alpha" in layer.parts and layer.parts["alpha"].numel() != 1:
        raise ValueError(f"its alpha holds {layer.parts['alpha'].numel()} values, not one")
    bad = [k for k, v in layer.parts.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{', '.join(bad)} hold NaN or Inf values; the file is damaged")
    meta = {k: torch.empty(v.shape, device="meta") for k, v in layer.parts.items()}
    try:
        shape = tuple(lycoris.delta(layer.algorithm, meta).shape)
    except RuntimeError:
        shape = None
    fits = shape is not None and shape[0] == target[0] and (shape == target or len(shape) == 2 and
                                                            shape[1] == weight[0].numel())
    if layer.algorithm == "lora" and fits:  # a (r, in * 9) down must not pass for a (r, in, 3, 3) one
        down = layer.parts["lora_down.weight"]
        fits = down.dim() == 2 or down.shape[1] == target[1]
    if not fits:
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in layer.parts.items() if v.dim())
        raise ValueError(f"{layer.algorithm} parts {sizes} do not fit the model's weight {target}; a LoRA for "
                         "another architecture")
    if _dora(layer):
        magnitude, per_output = _dora(layer)
        lycoris.dora(torch.empty(target, device="meta"), magnitude.to("meta"), per_output)  # ValueError if unfit
    if "diff_b" in layer.parts and tuple(layer.parts["diff_b"].shape) != tuple(params.get(_bias(layer.param),
                                                                                      torch.empty(0)).shape):
        raise ValueError(f"diff_b {tuple(layer.parts['diff_b'].shape)} does not fit the layer's bias")


def _dora(layer: Layer) -> tuple | None:
    """(magnitude, per_output) of a DoRA layer, None for others."""
    if "magnitude" in layer.parts:
        return layer.parts["magnitude"], True
    return (layer.parts["dora_scale"], None) if "dora_scale" in layer.parts else None


def _bias(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


def lora_hash(path) -> str:
    """A1111's short hash of a LoRA file for its `Lora hashes` infotext entry: the first 12 hex digits of the
    sha256 of a safetensors file's tensor data, its header skipped (A1111's "addnet" hash, the one kohya's
    additional-networks extension introduced, so metadata edits keep the hash); a pickle hashes whole."""
    start = 0
    if Path(path).suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
    return file_sha256(path, start=start)[:12]
