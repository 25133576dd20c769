"""LyCORIS files written by the `lycoris-lora` package for a tiny random SD 1.x model: ours merged gives the
U-Net and text-encoder outputs of LyCORIS' own network applied to diffusers' modules (the same random
weights), for LoRA/LoCon, LoCon with Tucker, LoHa (and Tucker), LoKr (and Tucker), full and DoRA; SD 1.x and 2.x.

The reference is LyCORIS' applied network (its forward, as trained), not its merge: lycoris-lora 4.1.3's LoHa
merge (get_merged_weight) scales the delta by (alpha / rank) twice where its forward, and A1111, scale once
(measured: 0.47 apart on a random Linear with alpha 1, rank 4; LoCon's merge agrees with its forward)."""

import logging

import pytest
import torch
from test_lora import outputs
from tiny import SD1, SD2_V, tiny_model

from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="the lycoris-lora package (the `test` extra)")

# LyCORIS' "full" preset less its duplicate time_embedding names (4.1.3 lists them twice for SD U-Nets)
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
CASES = {"lora": dict(algo="lora"), "locon-tucker": dict(algo="locon", use_tucker=True),
         "loha": dict(algo="loha"), "loha-tucker": dict(algo="loha", use_tucker=True),
         "lokr": dict(algo="lokr", factor=4), "lokr-tucker": dict(algo="lokr", factor=4, use_tucker=True,
                                                                  decompose_both=True),
         "full": dict(algo="full"), "dora-out": dict(algo="lora", dora_wd=True),
         "dora-in": dict(algo="loha", dora_wd=True, wd_on_output=False)}


def family(tmp_path_factory, config):
    model = tiny_model(config)
    root = tmp_path_factory.mktemp("lycoris")
    (root / "preset.toml").write_text(PRESET)
    return model, save_model(model, root / "folder"), root


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, single_thread):
    return family(tmp_path_factory, SD1)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory, single_thread):  # linear proj_in/out, OpenCLIP's text tower in transformers' names
    return family(tmp_path_factory, SD2_V)


def lycoris_file(folder, root, name: str, alpha: float = 2.0):
    """(the file LyCORIS writes for its network on diffusers' modules, those modules with it applied)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net = lycoris_kohya.create_network(1.0, 4, alpha, None, text, unet, conv_dim=4, conv_alpha=alpha,
                                       preset=str(root / "preset.toml"), **CASES[name])
    net.apply_to(text, unet, True, True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # LyCORIS starts its adapters at a zero delta: give them random values
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    path = root / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, unet, text


@pytest.mark.parametrize("name", list(CASES))
def test_merge_matches_lycoris_applied(sd1, name):
    check_against_lycoris(*sd1, name)


@pytest.mark.parametrize("name", ["lora", "loha-tucker", "lokr", "dora-out"])
def test_sd2_merge_matches_lycoris_applied(sd2, name):
    check_against_lycoris(*sd2, name)


def check_against_lycoris(model, folder, root, name):
    path, unet, text = lycoris_file(folder, root, name)
    expected = outputs(unet, text, diffusers=True)
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    plain = outputs(model.unet, model.text_encoder, diffusers=False)
    pipe.set_loras([(path, 1.0)])
    merged = outputs(model.unet, model.text_encoder, diffusers=False)
    pipe.set_loras([])
    # fp32 on both sides: the merged weight against LyCORIS' weight-plus-delta forward differ by rounding
    for ours, want, was in zip(merged, expected, plain):
        assert (ours - want).abs().max() <= 1e-4
        assert (want - was).abs().max() > 1e-2  # the file changes the outputs: the comparison means something
