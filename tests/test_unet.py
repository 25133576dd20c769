"""The U-Net against diffusers' UNet2DConditionModel (same random weights, same numbers), the ldm <->
diffusers key table against diffusers' own single-file converter, config conversion and detection."""

import dataclasses
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from latentdiff.conditioning import Control
from latentdiff.config import UNetConfig, preset
from latentdiff.errors import CheckpointError, InputError, UnsupportedModelError
from latentdiff.formats.unet_keys import (detect_unet_config, unet_config_from_diffusers, unet_config_to_diffusers,
                                     unet_from_diffusers, unet_key_table, unet_to_diffusers)
from latentdiff.unet import UNet

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# Tiny models written as a user's diffusers config.json would be, with the UNetConfig each must become.
CASES = {
    "sd1_style": (
        dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=(CA_DOWN, DOWN),
             up_block_types=(UP, CA_UP), attention_head_dim=8, cross_attention_dim=32),
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0,),
                   num_heads=8, context_dim=32)),
    "sd2_style": (  # per-level head counts [2, 4] over widths [32, 64]: a 16-wide head everywhere
        dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=(CA_DOWN, DOWN),
             up_block_types=(UP, CA_UP), attention_head_dim=[2, 4], cross_attention_dim=48,
             use_linear_projection=True, upcast_attention=True),
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0,),
                   num_heads=None, head_dim=16, context_dim=48, use_linear_projection=True,
                   upcast_attention=True)),
    "three_levels_depth2": (
        dict(block_out_channels=(32, 64, 64), layers_per_block=1, down_block_types=(CA_DOWN, CA_DOWN, DOWN),
             up_block_types=(UP, CA_UP, CA_UP), attention_head_dim=4, cross_attention_dim=32,
             transformer_layers_per_block=2),
        UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                   num_heads=4, transformer_depth=2, context_dim=32)),
    "four_levels_linear": (  # no attention at full resolution nor at the last level
        dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
             down_block_types=(DOWN, CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP, UP),
             attention_head_dim=[2, 2, 4, 4], cross_attention_dim=32, use_linear_projection=True),
        UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                   num_heads=None, head_dim=16, context_dim=32, use_linear_projection=True)),
    "inpainting_per_level_depth": (  # 9 inputs (latents + mask + masked image), SDXL-style depth per level
        dict(in_channels=9, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
             down_block_types=(DOWN, CA_DOWN, CA_DOWN), up_block_types=(CA_UP, CA_UP, UP), attention_head_dim=4,
             cross_attention_dim=32, transformer_layers_per_block=[1, 2, 3]),
        UNetConfig(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_levels=(1, 2), num_heads=4, transformer_depth=(0, 2, 3), context_dim=32)),
}

# The U-Net config.json files of the real checkpoints (runwayml SD 1.5, stabilityai SD 2.1 768-v).
SD15_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": [CA_DOWN, CA_DOWN, CA_DOWN, DOWN], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": [UP, CA_UP, CA_UP, CA_UP]}
SD21_DIFFUSERS = {
    **SD15_DIFFUSERS, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (norm scales and zero-initialised output convs included), scaled
    by fan-in so activations stay O(1) and the absolute tolerance below stays meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # biases; 1-D weights are norm scales, kept around 1
                p.copy_(0.2 * noise + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def diffusers_unet(kwargs: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**kwargs).eval()
    randomize_(model, seed)
    return model


def meta_state_dict(model_cls, *args) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: full-size models cost nothing
        return model_cls(*args).state_dict()


@pytest.mark.parametrize("name", CASES)
def test_parity_with_diffusers(name, caplog):
    kwargs, expected_cfg = CASES[name]
    ref = diffusers_unet(kwargs)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        cfg = unet_config_from_diffusers(dict(ref.config))
    assert cfg == expected_cfg
    assert not caplog.records, "every option UNet2DConditionModel writes must be known to the converter"

    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)

    height = max(8, 2 ** len(cfg.channel_mult))  # divisible by 2**(levels-1), the lowest level 2 px high
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, height, height * 3 // 2, generator=gen)  # non-square latent
    t = torch.tensor([999.0, 17.37])  # fractional timestep, as k-diffusion samplers produce
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert expected.abs().max() > 0.1, "degenerate reference output: the comparison would prove nothing"
    # fp32, same weights: only summation order differs between the two implementations
    assert (got - expected).abs().max().item() <= 1e-4


def test_scalar_timestep_broadcasts_over_batch():
    cfg = CASES["sd1_style"][1]
    model = UNet(cfg).eval()
    randomize_(model, 2)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, cfg.context_dim)
    with torch.no_grad():
        scalar, per_item = model(x, torch.tensor(500.0), context), model(x, torch.tensor([500.0, 500.0]), context)
        other_t = model(x, torch.tensor(10.0), context)
    assert torch.equal(scalar, per_item)
    assert not torch.allclose(scalar, other_t)  # the timestep does reach the output


@pytest.mark.parametrize("name", CASES)
def test_key_table_matches_diffusers_single_file_converter(name):
    """diffusers' own ldm -> diffusers converter maps our module's (ldm) keys onto diffusers' model keys,
    so our module tree is the original checkpoint's and our table agrees with diffusers'."""
    kwargs, cfg = CASES[name]
    ours = meta_state_dict(UNet, cfg)
    oracle = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ours.items()},
                                         {"layers_per_block": cfg.num_res_blocks})
    assert unet_to_diffusers(ours, cfg) == oracle  # same keys, each holding the very same tensor
    reference = meta_state_dict(lambda: UNet2DConditionModel(**kwargs))
    assert {k: v.shape for k, v in oracle.items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize("name, diffusers_config", [("sd1", SD15_DIFFUSERS), ("sd2-v", SD21_DIFFUSERS)])
def test_full_size_checkpoint_layout(name, diffusers_config):
    """The full SD 1.5 / 2.1 U-Net: our preset's module tree has exactly the tensors (names, shapes) that
    diffusers' converter reads from a real single-file checkpoint, and the config.json maps to the preset."""
    cfg = preset(name).unet
    assert unet_config_from_diffusers(diffusers_config) == cfg
    ours = meta_state_dict(UNet, cfg)
    assert len(ours) == 686  # tensors in model.diffusion_model.* of every SD 1.x / 2.x checkpoint
    oracle = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ours.items()},
                                         {"layers_per_block": cfg.num_res_blocks})
    init_args = {k: v for k, v in diffusers_config.items() if not k.startswith("_")}
    reference = meta_state_dict(lambda: UNet2DConditionModel(**init_args))
    assert {k: v.shape for k, v in oracle.items()} == {k: v.shape for k, v in reference.items()}
    # A real diffusers unet/ folder maps back onto a strict load of our module.
    mapped = unet_from_diffusers(reference, cfg)
    with torch.device("meta"):
        UNet(cfg).load_state_dict(mapped, strict=True, assign=True)
    assert detect_unet_config(ours) == cfg


def test_mapping_round_trip_is_lossless():
    cfg = CASES["four_levels_linear"][1]
    model = UNet(cfg)
    randomize_(model, 3)
    sd = model.state_dict()
    back = unet_from_diffusers(unet_to_diffusers(sd, cfg), cfg)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    table = unet_key_table(cfg)
    assert len({l for l, _ in table}) == len({d for _, d in table}) == len(table) == len(sd)


def test_unmapped_or_missing_key_is_named():
    cfg = CASES["sd1_style"][1]
    diffusers_sd = meta_state_dict(lambda: UNet2DConditionModel(**CASES["sd1_style"][0]))
    with pytest.raises(CheckpointError, match=r"'add_embedding\.linear_1\.weight'.*no ldm counterpart"):
        unet_from_diffusers({**diffusers_sd, "add_embedding.linear_1.weight": torch.zeros(1)}, cfg)
    ldm_sd = meta_state_dict(UNet, cfg)
    del ldm_sd["middle_block.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"'middle_block\.1\.proj_in\.weight' is missing"):
        unet_to_diffusers(ldm_sd, cfg)


@pytest.mark.parametrize("name", CASES)
def test_config_round_trip_through_diffusers_dict(name):
    kwargs, cfg = CASES[name]
    d = unet_config_to_diffusers(cfg, sample_size=32)
    assert unet_config_from_diffusers(d) == cfg
    # diffusers accepts the dict and builds the same network as the hand-written config
    built = meta_state_dict(lambda: UNet2DConditionModel.from_config(d))
    reference = meta_state_dict(lambda: UNet2DConditionModel(**kwargs))
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in reference.items()}
    assert UNet2DConditionModel.from_config(d).config.sample_size == 32


@pytest.mark.parametrize("cfg", [
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0,), context_dim=32),
    UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1,),
               num_heads=None, head_dim=64, transformer_depth=2, context_dim=48, use_linear_projection=True,
               upcast_attention=True),
    UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=3, attention_levels=(0, 2)),
    # extra input channels and a depth per level (the middle block's is the last level's)
    UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
               transformer_depth=(0, 2, 3), context_dim=32),
    UNetConfig(in_channels=8, model_channels=32, channel_mult=(1, 2), attention_levels=(0,), transformer_depth=(2, 1),
               context_dim=32),
])
def test_detect_returns_the_config_it_was_built_from(cfg):
    # Configs that follow the documented head rule (conv -> 8 heads, linear -> 64-wide heads + upcast).
    assert detect_unet_config(meta_state_dict(UNet, cfg)) == cfg


def test_detect_refuses_what_is_not_an_sd_unet():
    base = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0,), context_dim=32)
    sd = meta_state_dict(UNet, base)
    with pytest.raises(UnsupportedModelError, match="label_emb.*SDXL"):
        detect_unet_config({**sd, "label_emb.0.0.weight": torch.zeros(1)})
    with pytest.raises(UnsupportedModelError, match="3 input channels but 4 output channels"):
        detect_unet_config({**sd, "input_blocks.0.0.weight": torch.empty(32, 3, 3, 3, device="meta")})
    deeper = meta_state_dict(UNet, dataclasses.replace(base, transformer_depth=2))
    uneven = {k: v for k, v in deeper.items() if not k.startswith("output_blocks.3.1.transformer_blocks.1.")}
    with pytest.raises(UnsupportedModelError, match=r"depth varies within a level \{0: \[1, 2\]\}"):
        detect_unet_config(uneven)
    linear32 = dataclasses.replace(base, num_heads=None, head_dim=16, use_linear_projection=True)
    with pytest.raises(UnsupportedModelError, match="explicit UNetConfig"):
        detect_unet_config(meta_state_dict(UNet, linear32))
    with pytest.raises(CheckpointError, match="strip the 'model.diffusion_model.' prefix"):
        detect_unet_config({f"model.diffusion_model.{k}": v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="diffusers layout.*unet_from_diffusers"):
        detect_unet_config(unet_to_diffusers(sd, base))
    with pytest.raises(CheckpointError, match=r"'out\.2\.weight' is missing"):
        detect_unet_config({k: v for k, v in sd.items() if not k.startswith("out.2.")})


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),  # SDXL
    ({"transformer_layers_per_block": [[1, 1], [2, 2], [1, 1], [1, 1]]}, "not one number per level"),
    ({"transformer_layers_per_block": [1, 2]}, "not one number per level"),
    ({"in_channels": 3}, "3 input channels but 4 output channels"),
    ({"_class_name": "UNet2DModel"}, "not UNet2DConditionModel"),
    ({"attention_head_dim": [3, 7, 20, 20]}, "neither one head count nor one head width"),
    ({"attention_head_dim": [5, 10]}, r"attention_head_dim=\[5, 10\] for block_out_channels"),
    ({"up_block_types": [UP, UP, CA_UP, CA_UP]}, "do not mirror"),
])
def test_diffusers_config_of_another_model_is_refused(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        unet_config_from_diffusers({**SD15_DIFFUSERS, **change})


def test_unknown_diffusers_option_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        assert unet_config_from_diffusers({**SD15_DIFFUSERS, "new_option": 1}) == preset("sd1").unet
    assert len(caplog.records) == 1 and "new_option" in caplog.records[0].getMessage()


def test_bad_inputs_raise_input_error():
    cfg = CASES["three_levels_depth2"][1]
    model = UNet(cfg)
    t, context = torch.tensor([1.0]), torch.zeros(1, 3, cfg.context_dim)
    with pytest.raises(InputError, match="divisible by 4"):
        model(torch.zeros(1, 4, 8, 10), t, context)
    with pytest.raises(InputError, match=r"context.*\(1, tokens, 32\)"):
        model(torch.zeros(1, 4, 8, 8), t, torch.zeros(1, 3, 768))
    with pytest.raises(InputError, match="expected shape \\(batch, 4"):
        model(torch.zeros(1, 3, 8, 8), t, context)
    with pytest.raises(InputError, match="timestep"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0]), context)


def test_control_residuals_match_diffusers():
    """ControlNet residuals, one per skip connection and one on the middle block's output, enter as
    diffusers' down_block_additional_residuals / mid_block_additional_residual do."""
    kwargs, cfg = CASES["inpainting_per_level_depth"]
    ref = diffusers_unet(kwargs, seed=4)
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, cfg.in_channels, 8, 8, generator=gen), torch.tensor([600.0, 41.5])
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    shapes = []  # of every input block's output and of the middle block's
    hooks = [block.register_forward_hook(lambda m, i, out: shapes.append(out.shape))
             for block in [*ours.input_blocks, ours.middle_block]]
    with torch.no_grad():
        plain = ours(x, t, context)
    for hook in hooks:
        hook.remove()
    residuals = [torch.randn(shape, generator=gen) for shape in shapes]
    control = Control(skips=tuple(residuals[:-1]), middle=residuals[-1])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(residuals[:-1]),
                       mid_block_additional_residual=residuals[-1]).sample
        got = ours(x, t, context, control=control)
    assert (got - plain).abs().max() > 0.1  # the residuals do reach the output
    assert (got - expected).abs().max().item() <= 1e-4  # fp32, same weights: summation order only
    with pytest.raises(InputError, match="3 skip residuals for 6 input blocks"):
        ours(x, t, context, control=Control(skips=control.skips[:3], middle=control.middle))
    with pytest.raises(InputError, match="no label embedding"):
        ours(x, t, context, y=torch.zeros(2, 8))
