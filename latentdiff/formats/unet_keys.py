"""The U-Net in other layouts: the one ldm <-> diffusers key table, diffusers config.json <-> UNetConfig,
and reading a UNetConfig from the tensor shapes of an ldm state dict.

ldm keys here are the U-Net's own (`input_blocks.1.0.in_layers.0.weight`), without the single-file
prefix `model.diffusion_model.`.
"""

import logging
import re

import torch

from ..config import UNetConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..unet import UNet

# ldm ResBlock sub-layers -> diffusers ResnetBlock2D names; the transformer keeps its names in both.
_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _block_prefixes(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """ldm block prefix -> (diffusers prefix, renames of the sub-layer names within that block)."""
    per_level = cfg.num_res_blocks + 1  # ldm blocks per level: the res blocks, then a down/upsampler
    last = len(cfg.channel_mult) - 1
    table = {"time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
             "input_blocks.0.0": ("conv_in", {}), "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {}),
             "middle_block.0": ("mid_block.resnets.0", _RESNET_NAMES),
             "middle_block.1": ("mid_block.attentions.0", {}),
             "middle_block.2": ("mid_block.resnets.1", _RESNET_NAMES)}
    for level in range(last + 1):
        for j in range(cfg.num_res_blocks):
            n = 1 + level * per_level + j
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{j}", _RESNET_NAMES)
            table[f"input_blocks.{n}.1"] = (f"down_blocks.{level}.attentions.{j}", {})
        if level != last:
            table[f"input_blocks.{(level + 1) * per_level}.0"] = (f"down_blocks.{level}.downsamplers.0",
                                                                  {"op": "conv"})
    # diffusers numbers up_blocks from the lowest resolution, as ldm's output_blocks run.
    for up in range(last + 1):
        for j in range(per_level):
            n = up * per_level + j
            table[f"output_blocks.{n}.0"] = (f"up_blocks.{up}.resnets.{j}", _RESNET_NAMES)
            table[f"output_blocks.{n}.1"] = (f"up_blocks.{up}.attentions.{j}", {})
        if up != last:  # the upsampler follows the level's last res block (and its transformer, if any)
            slot = 2 if last - up in cfg.attention_levels else 1
            n = up * per_level + cfg.num_res_blocks
            table[f"output_blocks.{n}.{slot}"] = (f"up_blocks.{up}.upsamplers.0", {})
    return table


def _block_of(ldm_key: str) -> tuple[str, str]:
    """Split an ldm key into its block prefix and the rest: `input_blocks.1.0` + `in_layers.0.weight`."""
    parts = ldm_key.split(".")
    cut = 3 if parts[0] in ("input_blocks", "output_blocks") else 2
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def unet_key_table(cfg: UNetConfig) -> list[tuple[str, str]]:
    """Every U-Net tensor as (ldm key, diffusers key), in module order, generated from the config."""
    with torch.device("meta"):  # the key list only: no memory, no init cost
        ldm_keys = list(UNet(cfg).state_dict())
    blocks, table = _block_prefixes(cfg), []
    for key in ldm_keys:
        block, rest = _block_of(key)
        prefix, renames = blocks[block]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        table.append((key, f"{prefix}.{rest}"))
    return table


def _convert(sd: dict[str, torch.Tensor], mapping: dict[str, str], source: str, target: str) -> dict:
    unmapped = [k for k in sd if k not in mapping]
    if unmapped:
        raise CheckpointError(f"U-Net {source} state dict: key {unmapped[0]!r} has no {target} counterpart "
                              f"({len(unmapped)} such keys); the weights do not fit this U-Net config "
                              f"(another architecture, or a prefix left on the keys)")
    missing = [k for k in mapping if k not in sd]
    if missing:
        raise CheckpointError(f"U-Net {source} state dict: key {missing[0]!r} is missing ({len(missing)} "
                              f"missing in all); the checkpoint is incomplete or of another U-Net config")
    return {mapping[k]: v for k, v in sd.items()}


def unet_from_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers `unet/` state dict -> ldm keys (tensors are shared, not copied)."""
    return _convert(sd, {d: l for l, d in unet_key_table(cfg)}, "diffusers", "ldm")


def unet_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """ldm-keyed U-Net state dict -> diffusers `unet/` keys (tensors are shared, not copied)."""
    return _convert(sd, dict(unet_key_table(cfg)), "ldm", "diffusers")


# --- diffusers config.json ------------------------------------------------------------------------

# UNet2DConditionModel options that SD 1.x/2.x leave at these values; anything else is another model.
_SD_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
_READ = {"in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
         "layers_per_block", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
         "cross_attention_dim", "use_linear_projection", "upcast_attention"}
# Options with no effect on the weights or on inference.
_IGNORED = {"sample_size", "dropout", "addition_embed_type_num_heads"}


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what}: latentdiff implements the SD 1.x/2.x text-to-image U-Net only "
                                 f"(not SDXL, inpainting, depth, upscaler or other variants)")


def _check_channels(in_channels: int, out_channels: int, where: str) -> None:
    """More inputs than outputs are conditioning channels (inpainting, ...); fewer make no U-Net we know."""
    if in_channels < out_channels:
        raise _unsupported(f"{where}: {in_channels} input channels but {out_channels} output channels")


def _uniform(value, key: str):
    """One value for all levels: SD uses a scalar; per-level lists (SDXL) must repeat it."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise _unsupported(f"diffusers config: {key}={list(value)} varies per level")
        return value[0]
    return value


def _per_level(value, levels: int, key: str):
    """A number, or one per level (flat: a list of lists would vary within a level)."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels or not all(isinstance(v, int) for v in value):
            raise _unsupported(f"diffusers config: {key}={list(value)} is not one number per level ({levels})")
        return tuple(value)
    return value


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel config (config.json contents).

    diffusers' `attention_head_dim` is misnamed: it holds the head COUNT. SD 1.x gives one number
    (num_heads=8 everywhere); SD 2.x gives per-level counts ([5, 10, 20, 20] = a 64-wide head on
    every level), which we store as the fixed head width."""
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _unsupported(f"diffusers config: _class_name {d['_class_name']!r} is not UNet2DConditionModel")
    for key, expected in _SD_FIXED.items():
        value = d.get(key, expected)
        if any(v != expected for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise _unsupported(f"diffusers config: {key}={value!r} (SD uses {expected!r})")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _SD_FIXED.keys() | _READ | _IGNORED)
    if unknown:  # a newer diffusers option; harmless at its default, so warn rather than refuse
        logging.getLogger("latentdiff").warning("diffusers U-Net config: ignoring unknown option(s) %s", unknown)

    widths = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    base = widths[0]
    if any(w % base for w in widths):
        raise _unsupported(f"diffusers config: block_out_channels={widths} are not multiples of the first")
    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if len(down) != len(widths) or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise _unsupported(f"diffusers config: down_block_types={down} for block_out_channels={widths}")
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise _unsupported(f"diffusers config: up_block_types={up} do not mirror down_block_types "
                           f"(expected {mirrored})")
    attention_levels = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")

    in_channels, out_channels = d.get("in_channels", 4), d.get("out_channels", 4)
    _check_channels(in_channels, out_channels, "diffusers config")

    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    num_heads = head_dim = None
    if isinstance(heads, int):
        num_heads = heads
    elif len(heads) != len(widths):
        raise _unsupported(f"diffusers config: attention_head_dim={list(heads)} for block_out_channels={widths}")
    else:
        # Only levels that attend matter, plus the last one: the middle block uses its count.
        used = sorted(set(attention_levels) | {len(widths) - 1})
        dims = {widths[i] // heads[i] for i in used}
        if len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in used):
            head_dim = dims.pop()
        elif len({heads[i] for i in used}) == 1:
            num_heads = heads[used[0]]
        else:
            raise _unsupported(f"diffusers config: attention_head_dim={list(heads)} is neither one head count "
                               f"nor one head width over block_out_channels={widths}")

    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=_uniform(d.get("layers_per_block", 2), "layers_per_block"),
        attention_levels=attention_levels, num_heads=num_heads, head_dim=head_dim,
        transformer_depth=_per_level(d.get("transformer_layers_per_block", 1), len(widths),
                                     "transformer_layers_per_block"),
        context_dim=_uniform(d.get("cross_attention_dim", 1280), "cross_attention_dim"),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)))


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict:
    """A config.json dict for diffusers' UNet2DConditionModel (`from_config`) describing the same network.
    `sample_size` (latent side, e.g. 64 for 512 px) is what diffusers pipelines use as default size."""
    levels = range(len(cfg.channel_mult))
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    d = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down, "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        # the misnamed head COUNT (see unet_config_from_diffusers)
        "attention_head_dim": cfg.num_heads if cfg.num_heads is not None else [cfg.heads_at(w) for w in widths],
        "transformer_layers_per_block": (cfg.transformer_depth if isinstance(cfg.transformer_depth, int)
                                         else list(cfg.transformer_depth)),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
        **_SD_FIXED,
    }
    if sample_size is not None:
        d["sample_size"] = sample_size
    return d


# --- config from ldm tensor shapes ----------------------------------------------------------------

def detect_unet_config(sd: dict[str, torch.Tensor]) -> UNetConfig:
    """Read a UNetConfig from the shapes of an ldm U-Net state dict (prefix already stripped).

    The head layout is not in the shapes; the rule follows the two SD generations:
    conv proj_in (SD 1.x) -> num_heads=8; linear proj_in (SD 2.x) -> head_dim=64.
    upcast_attention is not in the shapes either: it is set for SD 2.x (linear projection), as the
    reference SD 2 code computes attention in fp32 by default; SD 2.1-v overflows in fp16 without it.
    """
    if any(k.startswith(("label_emb.", "add_embedding.")) for k in sd):
        raise _unsupported("U-Net state dict has label_emb/add_embedding keys "
                           "(an SDXL or class-conditioned U-Net)")
    if "input_blocks.0.0.weight" not in sd:
        hint = ("it is in diffusers layout: read its config.json and use unet_from_diffusers"
                if "conv_in.weight" in sd else "strip the 'model.diffusion_model.' prefix first")
        raise CheckpointError(f"U-Net state dict has no 'input_blocks.0.0.weight': {hint}")

    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise CheckpointError(f"U-Net state dict: key {key!r} is missing; the checkpoint is incomplete "
                                  f"or not a Stable Diffusion U-Net")
        return sd[key].shape

    base, in_channels = shape("input_blocks.0.0.weight")[:2]
    out_channels = shape("out.2.weight")[0]
    _check_channels(in_channels, out_channels, "U-Net state dict")
    # ldm: conv_in, then per level its res blocks and a downsample (none after the last level)
    n_inputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    n_levels = 1 + sum(1 for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    num_res_blocks = (n_inputs - n_levels) // n_levels
    if n_levels * (num_res_blocks + 1) != n_inputs:
        raise _unsupported(f"U-Net state dict: {n_inputs} input blocks do not split into {n_levels} equal levels")
    per_level = num_res_blocks + 1

    mults, attention_levels = [], []
    for level in range(n_levels):
        first = f"input_blocks.{1 + level * per_level}"
        width = shape(f"{first}.0.out_layers.3.weight")[0]
        if width % base:
            raise _unsupported(f"U-Net state dict: level {level} width {width} is not a multiple of {base}")
        mults.append(width // base)
        if f"{first}.1.norm.weight" in sd:
            attention_levels.append(level)

    blocks_per_transformer: dict[str, set[str]] = {}
    for key in sd:
        if match := re.match(r"(.+)\.transformer_blocks\.(\d+)\.", key):
            blocks_per_transformer.setdefault(match[1], set()).add(match[2])
    depths_per_level: dict[int, set[int]] = {}  # the middle block counts as the last level
    for prefix, blocks in blocks_per_transformer.items():
        kind, n = prefix.split(".")[0], int(prefix.split(".")[1])
        if kind == "input_blocks":
            level = (n - 1) // per_level
        else:  # output blocks run from the last level up; the middle block is its own
            level = n_levels - 1 - n // per_level if kind == "output_blocks" else n_levels - 1
        depths_per_level.setdefault(level, set()).add(len(blocks))
    if varying := {level: sorted(d) for level, d in depths_per_level.items() if len(d) != 1}:
        raise _unsupported(f"U-Net state dict: transformer depth varies within a level {varying}")
    depth = tuple(depths_per_level.get(level, {0}).pop() for level in range(n_levels))

    linear = len(shape("middle_block.1.proj_in.weight")) == 2
    widths = [base * m for m in mults]
    used = [widths[i] for i in sorted(set(attention_levels) | {n_levels - 1})]
    if linear and any(w % 64 for w in used):  # (num_heads=8 always divides: widths are multiples of 32)
        raise UnsupportedModelError(
            f"U-Net state dict: attention widths {used} are not multiples of the SD 2.x head width 64; the "
            f"head layout is not stored in the weights, so load it with an explicit UNetConfig (or a "
            f"diffusers config.json) instead of detection")

    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=base, channel_mult=tuple(mults),
        num_res_blocks=num_res_blocks, attention_levels=tuple(attention_levels),
        num_heads=None if linear else 8, head_dim=64 if linear else None, transformer_depth=depth,
        context_dim=shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_projection=linear, upcast_attention=linear)
