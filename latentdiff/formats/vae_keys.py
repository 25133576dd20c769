"""The VAE in diffusers' layout: the one ldm <-> diffusers key table, config.json, and shape detection.

Our module tree is the ldm layout, so only diffusers folders need translating. The table is generated
from the config, one row per module, and read in both directions; the only tensor change is the mid-block
attention, whose q/k/v/out projections are 1x1 convs in ldm and Linear layers in diffusers.
"""

import re

import torch

from ..config import VAEConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..vae import resnet_channels

# Older diffusers folders name the mid-block attention projections differently; accepted on read.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
ATTENTION_PROJECTION = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")

# diffusers' AutoencoderKL constructor defaults, which a config.json may leave out.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
}
# Keys that do not change the weights: the tile size, the pipeline's latent scale (the caller reads
# `scaling_factor` into ModelConfig.latent_scale), and an fp16 hint.
DIFFUSERS_IGNORED = {"sample_size", "scaling_factor", "force_upcast"}


def _module_table(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(ldm module, diffusers module) pairs; each module has exactly a weight and a bias."""
    rows = [("encoder.conv_in", "encoder.conv_in"), ("decoder.conv_in", "decoder.conv_in"),
            ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.norm_out", f"{part}.conv_norm_out"), (f"{part}.conv_out", f"{part}.conv_out")]
        rows += _resnet_rows(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", shortcut=False)
        rows += _resnet_rows(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", shortcut=False)
        rows += [(f"{part}.mid.attn_1.{ldm}", f"{part}.mid_block.attentions.0.{ours}") for ldm, ours in
                 (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))]

    levels = resnet_channels(cfg, "encoder")
    for i, blocks in enumerate(levels):
        for j, (c_in, c_out) in enumerate(blocks):
            rows += _resnet_rows(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in != c_out)
        if i < len(levels) - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))

    # diffusers numbers the decoder's blocks in the order they run (lowest resolution first); ldm by level.
    levels = resnet_channels(cfg, "decoder")
    for i, blocks in enumerate(levels):
        k = len(levels) - 1 - i
        for j, (c_in, c_out) in enumerate(blocks):
            rows += _resnet_rows(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", c_in != c_out)
        if i > 0:
            rows.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    return rows


def _resnet_rows(ldm: str, diffusers: str, shortcut: bool) -> list[tuple[str, str]]:
    names = ["norm1", "conv1", "norm2", "conv2"]
    rows = [(f"{ldm}.{n}", f"{diffusers}.{n}") for n in names]
    return (rows + [(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")]) if shortcut else rows


def vae_key_table(cfg: VAEConfig) -> dict[str, str]:
    """Every parameter of the VAE: ldm key (our module tree) -> diffusers key."""
    return {f"{ldm}.{p}": f"{diffusers}.{p}" for ldm, diffusers in _module_table(cfg) for p in ("weight", "bias")}


def _modern_name(key: str) -> str:
    for old, new in OLD_ATTENTION_NAMES.items():
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return key


def _refuse_missing(missing: list[str], where: str):
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} VAE weight(s) missing, e.g. {missing[:3]}; the file is "
                              f"incomplete or its config describes a different architecture")


def vae_from_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig,
                       where: str = "vae/diffusion_pytorch_model") -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict (current or old attention names) -> our (ldm) keys."""
    table = vae_key_table(cfg)
    to_ldm = {diffusers: ldm for ldm, diffusers in table.items()}
    out, source = {}, {}
    for key, tensor in sd.items():
        ldm = to_ldm.get(_modern_name(key))
        if ldm is None:
            raise CheckpointError(f"{where}: key {key!r} is not a weight of an AutoencoderKL with {cfg}; "
                                  f"check that vae/config.json matches the weights")
        if ldm in out:
            raise CheckpointError(f"{where}: keys {source[ldm]!r} and {key!r} are the same weight under its old "
                                  f"and new diffusers names; keep only one")
        if ATTENTION_PROJECTION.fullmatch(ldm) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear -> 1x1 conv
        out[ldm], source[ldm] = tensor, key
    _refuse_missing([diffusers for ldm, diffusers in table.items() if ldm not in out], where)
    return out


def vae_to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig, where: str = "VAE") -> dict[str, torch.Tensor]:
    """Our (ldm) VAE state dict -> diffusers AutoencoderKL keys (current names)."""
    table = vae_key_table(cfg)
    out = {}
    for key, tensor in sd.items():
        if key not in table:
            raise CheckpointError(f"{where}: key {key!r} is not a weight of an AutoencoderKL with {cfg}")
        if ATTENTION_PROJECTION.fullmatch(key) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[:2])  # 1x1 conv -> Linear
        out[table[key]] = tensor
    _refuse_missing([ldm for ldm in table if ldm not in sd], where)
    return out


def vae_config_from_diffusers(d: dict, where: str = "vae/config.json") -> VAEConfig:
    """diffusers' AutoencoderKL config.json -> VAEConfig. Architectures this VAE cannot build are refused."""
    unknown = sorted(k for k in d if k not in DIFFUSERS_DEFAULTS and k not in DIFFUSERS_IGNORED
                     and not k.startswith("_"))
    if unknown:
        raise UnsupportedModelError(f"{where}: unknown AutoencoderKL option(s) {unknown}; latentdiff implements "
                                    f"the Stable Diffusion 1.x/2.x VAE only")
    c = DIFFUSERS_DEFAULTS | {k: v for k, v in d.items() if k in DIFFUSERS_DEFAULTS}
    widths = list(c["block_out_channels"])
    expected = {
        "out_channels": c["in_channels"], "act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True,
        "use_post_quant_conv": True, "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
        "latents_std": None, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
    }
    for key, want in expected.items():
        got = list(c[key]) if isinstance(c[key], (list, tuple)) else c[key]
        if got != want:
            raise UnsupportedModelError(f"{where}: {key} = {c[key]!r} is not supported (the Stable Diffusion "
                                        f"1.x/2.x VAE has {want!r})")
    if any(w % widths[0] for w in widths):
        raise UnsupportedModelError(f"{where}: block_out_channels {widths} are not multiples of the first one")
    return VAEConfig(in_channels=c["in_channels"], latent_channels=c["latent_channels"], base_channels=widths[0],
                     channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c["layers_per_block"])


def vae_config_to_diffusers(cfg: VAEConfig, latent_scale: float) -> dict:
    """VAEConfig -> the keyword arguments of diffusers' AutoencoderKL (the body of vae/config.json)."""
    if cfg.channel_mult[0] != 1:
        # diffusers' encoder widens to block_out_channels[0] in conv_in; ldm's conv_in gives base_channels.
        raise UnsupportedModelError(f"diffusers' AutoencoderKL cannot express channel_mult {cfg.channel_mult}: "
                                    f"its first entry must be 1; save this model as a single file instead")
    levels = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.latent_channels,
        "norm_num_groups": 32, "scaling_factor": latent_scale,
    }


def detect_vae_config(sd: dict[str, torch.Tensor], where: str = "VAE weights") -> VAEConfig:
    """The VAEConfig of an ldm-layout VAE state dict (prefix `first_stage_model.` already stripped)."""

    def shape(key: str) -> torch.Size:
        if key not in sd:
            hint = (" (this looks like diffusers' layout: convert it with vae_from_diffusers)"
                    if any(".down_blocks." in k for k in sd) else "")
            raise CheckpointError(f"{where}: no {key!r}; not a Stable Diffusion KL autoencoder{hint}")
        return sd[key].shape

    base, in_channels = shape("encoder.conv_in.weight")[:2]
    latent_channels = shape("post_quant_conv.weight")[0]
    levels = 1
    while f"encoder.down.{levels}.block.0.conv2.weight" in sd:
        levels += 1
    widths = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    blocks = 1
    while f"encoder.down.0.block.{blocks}.conv2.weight" in sd:
        blocks += 1
    if any(w % base for w in widths):
        raise UnsupportedModelError(f"{where}: level widths {widths} are not multiples of conv_in's {base}")
    if shape("encoder.conv_out.weight")[0] != 2 * latent_channels:
        raise UnsupportedModelError(f"{where}: encoder.conv_out has {shape('encoder.conv_out.weight')[0]} channels, "
                                    f"expected 2 x {latent_channels} latent channels (mean and logvar)")
    return VAEConfig(in_channels=in_channels, latent_channels=latent_channels, base_channels=base,
                     channel_mult=tuple(w // base for w in widths), num_res_blocks=blocks)
