"""Whole-model formats both ways: our single files and diffusers folders, read by diffusers and by us.

Tolerance: 1e-4 absolute (fp32) on network outputs, the same bound as the per-network parity tests; the
weights are bit-identical, so any gap is only kernel-order rounding (measured ~1e-6).
"""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentdiff.clip import PACKAGE_TOKENIZER
from latentdiff.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from latentdiff.errors import CheckpointError
from latentdiff.formats.diffusers_folder import read_diffusers_folder, write_diffusers_folder
from latentdiff.formats.single_file import read_single_file, write_single_file
from latentdiff.loader import load_model, save_model
from latentdiff.model import StableDiffusion

TOL = 1e-4
SD1 = ModelConfig(
    name="tiny-sd1",
    text=TextEncoderConfig(width=64, layers=2, heads=1, ff_width=128),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    num_heads=8, context_dim=64),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1), resolution=64)
SD2 = ModelConfig(
    name="tiny-sd2-v", family="sd2",
    text=TextEncoderConfig(width=64, layers=3, heads=1, ff_width=128, activation="gelu", output_layer=-2, pad_id=0),
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    num_heads=None, head_dim=64, context_dim=64, use_linear_projection=True, upcast_attention=True),
    vae=VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1), prediction="v", resolution=64)


def random_model(config: ModelConfig, seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    model = StableDiffusion(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor random, so no zero-init can hide a mapping error
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def inputs(context_dim: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981.0, 13.5])
    context = torch.randn(2, 77, context_dim, generator=g)
    z = torch.randn(1, 4, 16, 16, generator=g)
    return x, t, context, z


def outputs(model: StableDiffusion, tokens):
    """Our networks on fixed inputs: U-Net, text features (the layer the model conditions on), VAE decode."""
    x, t, context, z = inputs(model.config.unet.context_dim)
    with torch.no_grad():
        return model.unet(x, t, context), model.text_encoder(tokens), model.vae.decode(z)


def diffusers_outputs(pipe: StableDiffusionPipeline, tokens):
    x, t, context, z = inputs(pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        return (pipe.unet(x, t, context).sample, pipe.text_encoder(tokens).last_hidden_state,
                pipe.vae.decode(z).sample)


def assert_close(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_single_file_round_trip(tmp_path, config):
    model = random_model(config)
    path = write_single_file(model, tmp_path / "m.safetensors")
    back = read_single_file(path)
    assert back.config == config
    theirs = back.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_sd2_single_file_uses_openclip_layout(tmp_path):
    path = write_single_file(random_model(SD2), tmp_path / "m.safetensors")
    keys = load_file(path).keys()
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight") for k in keys)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_detection_without_metadata(tmp_path, config):
    """A file without our metadata (as other tools write them): the architecture comes from shapes."""
    path = write_single_file(random_model(config), tmp_path / "m.safetensors")
    save_file(load_file(path), tmp_path / "plain.safetensors")
    (tmp_path / "plain.yaml").write_text('model:\n  params:\n    parameterization: "v"\n' if config.prediction == "v"
                                         else "model:\n  params: {}\n")
    detected = read_single_file(tmp_path / "plain.safetensors").config
    assert dataclasses.replace(detected, name=config.name, resolution=config.resolution) == config


@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_diffusers_loads_our_folder(tmp_path, config):
    model = random_model(config)
    folder = write_diffusers_folder(model, tmp_path / "folder")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    tokens = model.tokenizer(["a red circle", ""])
    theirs_tokens = pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids
    assert torch.equal(tokens, theirs_tokens)
    assert_close(outputs(model, tokens), diffusers_outputs(pipe, tokens))
    expected_prediction = {"eps": "epsilon", "v": "v_prediction"}[config.prediction]
    assert pipe.scheduler.config.prediction_type == expected_prediction


def test_we_load_a_folder_diffusers_saved(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=8, cross_attention_dim=64, sample_size=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, vocab_size=49408, hidden_act="quick_gelu"))
    for module in (unet, vae, text):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    tokenizer = CLIPTokenizer.from_pretrained(str(PACKAGE_TOKENIZER), local_files_only=True)
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "saved")
    model = read_diffusers_folder(tmp_path / "saved")
    assert model.config.prediction == "eps" and model.config.resolution == 64
    tokens = model.tokenizer(["a blue square on a red background"])
    assert_close(outputs(model, tokens), diffusers_outputs(pipe, tokens))


def test_single_to_folder_to_single_is_lossless(tmp_path):
    model = random_model(SD1)
    first = write_single_file(model, tmp_path / "a.safetensors")
    folder = write_diffusers_folder(read_single_file(first), tmp_path / "folder")
    second = write_single_file(read_diffusers_folder(folder), tmp_path / "b.safetensors")
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_converters_read_our_single_file(tmp_path):
    """diffusers' own ldm -> diffusers conversion functions, fed our file, build networks equal to ours."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from latentdiff.formats.clip_keys import text_config_to_hf
    from latentdiff.formats.unet_keys import unet_config_to_diffusers
    from latentdiff.formats.vae_keys import vae_config_to_diffusers

    model = random_model(SD1)
    checkpoint = load_file(write_single_file(model, tmp_path / "m.safetensors"))
    unet_config = unet_config_to_diffusers(SD1.unet)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config))
    vae_config = vae_config_to_diffusers(SD1.vae, SD1.latent_scale)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config))
    text = CLIPTextModel(CLIPTextConfig(**text_config_to_hf(SD1.text)))
    # transformers 5 dropped the `text_model.` prefix of CLIPTextModel's own keys; position_ids is a buffer
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    text.load_state_dict({k: v for k, v in converted.items() if k in text.state_dict()}, strict=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), unet=unet, scheduler=PNDMScheduler(),
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tokens = model.tokenizer(["a photo of a cat"])
    assert_close(outputs(model, tokens), diffusers_outputs(pipe, tokens))


def test_loader_dispatch_and_errors(tmp_path):
    model = random_model(SD1)
    single = save_model(model, tmp_path / "m.safetensors")
    folder = save_model(model, tmp_path / "folder")
    for source in (single, folder):
        loaded = load_model(source, dtype=torch.float16)
        assert loaded.dtype == torch.float16 and not loaded.unet.time_embed[0].weight.requires_grad
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(model, folder)
    with pytest.raises(CheckpointError, match="writes only .safetensors"):
        save_model(model, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_model(tmp_path)
    partial = {k: v for k, v in load_file(single).items() if not k.startswith("first_stage_model.")}
    save_file(partial, tmp_path / "unet_and_text.safetensors")
    with pytest.raises(CheckpointError, match="holds the U-Net and text encoder but no VAE"):
        load_model(tmp_path / "unet_and_text.safetensors")
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing unet/config.json"):
        load_model(folder)


def test_failed_folder_write_leaves_nothing(tmp_path, monkeypatch):
    import latentdiff.formats.diffusers_folder as folder_format

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder_format, "_model_index", broken)
    with pytest.raises(OSError):
        write_diffusers_folder(random_model(SD1), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
