"""Real checkpoint layouts: files with the key names and shapes of published SD 1.5 / 2.1 / SDXL (and other
families') checkpoints are named for what they are, and the SD 1.x / 2.x ones load.

Full-size files are written as header-only safetensors: a real header (names, shapes, dtypes, offsets) over
a sparse file of the size it claims, so the reader's own header path runs at real shapes while the disk holds
a few hundred kB. Numbers are checked where weights matter on tiny models (tests/tiny.py).
"""

import dataclasses
import json
import re
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import SD1, SD2_V, tiny_model

import latentdiff.checkpoint as checkpoint
import latentdiff.loader as loader
from latentdiff.cli import main
from latentdiff.config import config_to_dict, preset
from latentdiff.errors import CheckpointError, UnsupportedModelError
from latentdiff.formats.clip_keys import ours_to_openclip
from latentdiff.formats.families import identify_single_file, text_tower_name
from latentdiff.loader import describe_model, load_model, save_model
from latentdiff.model import build_on_meta

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def meta_checkpoint(name: str, *, text_layout: str = "ours") -> dict[str, torch.Tensor]:
    """The state dict of a published checkpoint of preset `name`, on "meta" (real key names and shapes, fp16),
    plus the extra entries real files carry (EMA, schedule buffers, position ids)."""
    sd = {k: torch.empty_like(v, dtype=torch.float16) for k, v in build_on_meta(preset(name)).state_dict().items()}
    text = {k.removeprefix("cond_stage_model."): sd.pop(k) for k in list(sd) if k.startswith("cond_stage_model.")}
    if text_layout == "openclip":  # SD 2.x: OpenCLIP's fused names under cond_stage_model.model.
        text = {"model." + k: v for k, v in ours_to_openclip(text).items()}
        text |= {"model.text_projection": torch.empty(1024, 1024, device="meta", dtype=torch.float16),
                 "model.logit_scale": torch.empty((), device="meta", dtype=torch.float16)}
    elif text_layout == "flat":  # NAI-derived SD 1.x files: no `text_model.` level
        text = {k.replace("transformer.text_model.", "transformer."): v for k, v in text.items()}
    sd |= {"cond_stage_model." + k: v for k, v in text.items()}
    return sd | {"alphas_cumprod": torch.empty(1000, device="meta"),
                 "model_ema.decay": torch.empty((), device="meta")}


def write_header_only(path, sd: dict[str, torch.Tensor]):
    """A safetensors file with `sd`'s names, shapes and dtypes, and zero-filled (sparse) data."""
    header, offset = {}, 0
    for name, t in sd.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def meta(*shaped: tuple[str, tuple]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shaped}


# tiny SD1 with the head layout detection assumes (64-wide text heads, 8 U-Net heads), so it round-trips
DETECTABLE_SD1 = dataclasses.replace(SD1, text=dataclasses.replace(SD1.text, width=64, heads=1, ff_width=128),
                                     unet=dataclasses.replace(SD1.unet, num_heads=8, context_dim=64))


def architecture(config):
    return config.text, config.unet, config.vae


# --- SD 1.5 and 2.1 at real shapes ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ours", "flat"])
def test_sd15_file_loads_with_either_text_key_layout(tmp_path, layout, caplog):
    path = write_header_only(tmp_path / "sd15.safetensors", meta_checkpoint("sd1", text_layout=layout))
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        model = load_model(path, device="meta")
    assert model.config.family == "sd1" and architecture(model.config) == architecture(preset("sd1"))
    assert model.config.prediction == "eps" and model.config.resolution == 512
    assert not caplog.records  # SD 1.x is eps: nothing to warn about
    assert text_tower_name(model.config.text) == "CLIP ViT-L/14 text (12 layers, 768 wide)"


def test_flat_clip_keys_load_the_same_weights(tmp_path):
    """NAI-style text keys (`cond_stage_model.transformer.encoder...`) load into the same text tower."""
    model = tiny_model(DETECTABLE_SD1)
    flat = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
            for k, v in model.state_dict().items()}
    assert any(k.startswith("cond_stage_model.transformer.encoder.layers.") for k in flat)
    save_file(flat, tmp_path / "nai.safetensors")  # no latentdiff metadata: detection from shapes
    loaded = load_model(tmp_path / "nai.safetensors")
    assert architecture(loaded.config) == architecture(DETECTABLE_SD1)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_sd21_file_without_prediction_warns_once_and_yaml_or_flag_settle_it(tmp_path, caplog):
    path = write_header_only(tmp_path / "sd21.safetensors", meta_checkpoint("sd2-v", text_layout="openclip"))
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        model = load_model(path, device="meta")
    assert model.config.family == "sd2" and architecture(model.config) == architecture(preset("sd2-v"))
    assert (model.config.prediction, model.config.resolution) == ("eps", 512)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "--prediction v" in warnings[0] and "sd21.yaml" in warnings[0], warnings
    assert text_tower_name(model.config.text) == "OpenCLIP ViT-H/14 text (24 layers, 1024 wide)"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        assert load_model(path, prediction="v", device="meta").config.prediction == "v"
        (tmp_path / "sd21.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
        from_yaml = load_model(path, device="meta").config
        (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # ldm's default: eps
        assert load_model(path, device="meta").config.prediction == "eps"
    assert (from_yaml.prediction, from_yaml.resolution) == ("v", 768)
    assert not caplog.records


def test_real_sizes_in_info_and_no_weights_read(tmp_path, monkeypatch, capsys):
    """`info` on a full-size SD 1.5 file: the published parameter counts, from the header alone."""
    sd = meta_checkpoint("sd1")
    sd |= {k: torch.empty_like(v, dtype=torch.float32) for k, v in sd.items() if k.startswith("first_stage_model.")}
    path = write_header_only(tmp_path / "sd15.safetensors", sd)

    def no_data(*args, **kwargs):
        raise AssertionError("info read tensor data")

    monkeypatch.setattr(checkpoint, "_read_safetensors", no_data)
    monkeypatch.setattr(checkpoint, "_read_torch", no_data)
    monkeypatch.setattr(loader, "model_hash", lambda path: "hash")  # sha256 of 2 GB of zeros: tested elsewhere
    assert main(["info", str(path)]) == 0
    shown = capsys.readouterr().out
    # SD 1.5's published sizes: U-Net 859.52M, VAE 83.65M, CLIP ViT-L/14 text 123.06M parameters
    for line in ("family:      SD 1.x, eps-prediction, native 512px",
                 "text:        CLIP ViT-L/14 text (12 layers, 768 wide)", "unet:        859.5M parameters",
                 "vae:         83.7M parameters", "text_encoder:123.1M parameters",
                 "stored as:   mixed: unet float16, vae float32, text_encoder float16"):
        assert line in shown, shown


def test_info_names_the_demo_model_by_its_size(capsys):
    demo = Path(__file__).resolve().parent.parent / "weights" / "demo" / "model.safetensors"
    assert main(["info", str(demo)]) == 0
    shown = capsys.readouterr().out
    assert "text:        CLIP-style text encoder, 4 layers x 128" in shown and "ViT-L" not in shown
    assert "stored as:   float16" in shown  # the file is all F16 (it loads in float32)
    assert set(describe_model(demo).dtypes.values()) == {(torch.float16,)}


# --- what other files are ---------------------------------------------------------------------------

U = "model.diffusion_model."
SDXL = meta(("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", (49408, 768)),
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
            ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (3840, 1280)),
            ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
            (U + "input_blocks.0.0.weight", (320, 4, 3, 3)), (U + "label_emb.0.0.weight", (1280, 2816)),
            (U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
            ("first_stage_model.encoder.conv_in.weight", (128, 3, 3, 3)))


def sd15_with(in_channels: int, **extra) -> dict:
    sd = meta_checkpoint("sd1")
    sd[U + "input_blocks.0.0.weight"] = torch.empty(320, in_channels, 3, 3, device="meta")
    return sd | meta(*extra.items())


OTHERS = {
    "SDXL": (SDXL, UnsupportedModelError, "an SDXL model"),
    "SD 2 depth": (sd15_with(5, **{"depth_model.model.pretrained.act_postprocess1.0.project.0.weight": (256, 1024)}),
                   UnsupportedModelError, "depth-to-image"),
    "x4 upscaler": (sd15_with(7, **{"low_scale_model.betas": (350,)}), UnsupportedModelError, "x4 upscaler"),
    "unCLIP": (meta_checkpoint("sd2-v", text_layout="openclip") | meta(
        ("embedder.model.visual.conv1.weight", (1280, 3, 14, 14)), ("noise_augmentor.betas", (1000,))),
        UnsupportedModelError, "unCLIP"),
    "SD3": (meta((U + "joint_blocks.0.context_block.attn.qkv.weight", (4608, 1536)),
                 ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", (768,))),
            UnsupportedModelError, "an SD3 model"),
    "Flux": (meta(("double_blocks.0.img_attn.qkv.weight", (9216, 3072)), ("single_blocks.0.linear1.weight",
                                                                          (21504, 3072))),
             UnsupportedModelError, "a Flux model"),
    "kohya LoRA": (meta(("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", (4, 320, 1, 1)),
                        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", (320, 4, 1, 1)),
                        ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", ())),
                   CheckpointError, "this is a LoRA"),
    "peft LoRA": (meta(("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", (4, 320))),
                  CheckpointError, "this is a LoRA"),
    "VAE (ldm)": (meta(("encoder.conv_in.weight", (128, 3, 3, 3)), ("decoder.up.0.block.0.conv1.weight",
                                                                    (128, 256, 3, 3)),
                       ("quant_conv.weight", (8, 8, 1, 1)), ("post_quant_conv.weight", (4, 4, 1, 1))),
                  CheckpointError, "standalone VAE (original layout)"),
    "VAE (diffusers)": (meta(("encoder.down_blocks.0.resnets.0.conv1.weight", (128, 128, 3, 3)),
                             ("quant_conv.weight", (8, 8, 1, 1))),
                        CheckpointError, "standalone VAE (diffusers layout)"),
    "embedding": (meta(("emb_params", (4, 768))), CheckpointError, "textual-inversion embedding"),
}


@pytest.mark.parametrize("name", OTHERS)
def test_other_files_are_named_for_what_they_are(name):
    sd, error, message = OTHERS[name]
    with pytest.raises(error, match=re.escape(message)) as caught:
        identify_single_file(sd, "x.safetensors")
    assert str(caught.value).startswith("x.safetensors: ") and "only some" not in str(caught.value)


def test_sdxl_file_through_the_loader_and_the_cli(tmp_path, capsys):
    path = write_header_only(tmp_path / "sdxl.safetensors", SDXL)
    with pytest.raises(UnsupportedModelError, match="this is an SDXL model; latentdiff builds SD 1.x and SD 2.x"):
        load_model(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SDXL" in err[0], err


@pytest.mark.parametrize("in_channels", [9, 8])
def test_inpainting_and_pix2pix_unets_are_sd_models(in_channels):
    """They load (the U-Net builds extra input channels); the pipeline names them at generation
    (test_conditioning)."""
    assert identify_single_file(sd15_with(in_channels), "x") == "sd1"


# --- files written before ModelConfig.family --------------------------------------------------------

@pytest.mark.parametrize("config", [SD1, SD2_V], ids=["sd1", "sd2"])
def test_stored_config_without_family_takes_it_from_the_keys(tmp_path, config):
    model = tiny_model(config)
    written = save_model(model, tmp_path / "new.safetensors")
    stored = json.loads(checkpoint.safetensors_metadata(written)["latentdiff_config"])
    assert stored["family"] == config.family
    del stored["family"]  # as latentdiff wrote it before the field existed
    save_file(load_file(written), tmp_path / "old.safetensors",
              metadata={"format": "pt", "latentdiff_config": json.dumps(stored)})
    loaded = load_model(tmp_path / "old.safetensors")
    assert config_to_dict(loaded.config) == config_to_dict(config)
    again = load_file(save_model(loaded, tmp_path / "again.safetensors"))
    assert again.keys() == load_file(written).keys()  # SD 2.x written back in OpenCLIP's layout


def test_family_is_validated():
    from latentdiff.config import ModelConfig
    from latentdiff.errors import InputError
    with pytest.raises(InputError, match="family must be 'sd1' or 'sd2', not 'sdxl'"):
        ModelConfig(family="sdxl")


def test_diffusers_folders_carry_their_family_and_other_pipelines_are_named(tmp_path):
    folder = save_model(tiny_model(SD2_V), tmp_path / "sd2")
    assert load_model(folder).config.family == "sd2"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UnsupportedModelError, match=r"this is an SDXL model \(model_index.json: StableDiffusionXL"):
        load_model(folder)
