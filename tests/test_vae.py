"""The KL autoencoder against diffusers' AutoencoderKL (random weights), and its ldm <-> diffusers formats."""

import json

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from latentdiff.config import VAEConfig
from latentdiff.errors import CheckpointError, InputError, UnsupportedModelError
from latentdiff.formats.vae_keys import (detect_vae_config, vae_config_from_diffusers, vae_config_to_diffusers,
                                    vae_from_diffusers, vae_key_table, vae_to_diffusers)
from latentdiff.vae import AutoencoderKL

# Two tiny architectures: one downsampling, and two with an unwidened level (no nin_shortcut there).
TINY = {
    "two_levels": (VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1), (16, 24)),
    "three_levels": (VAEConfig(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2), (16, 24)),
}
# fp32 on CPU: both sides run the same convolutions; only summation order differs (measured ~5e-6).
ATOL = 1e-4

# runwayml/stable-diffusion-v1-5 vae/config.json as published (SD 2.x uses the same architecture).
SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms included, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # GroupNorm scale
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
    """(ours, reference, cfg, image size): the reference randomized, ours loaded from its state dict."""
    cfg, size = TINY[request.param]
    ref = ReferenceVAE(**vae_config_to_diffusers(cfg, 0.18215)).eval()
    randomize_(ref, seed=0)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True)
    return ours, ref, cfg, size


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, ref, cfg, (h, w) = pair
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got, want = ours.encode(x), ref.encode(x).latent_dist
    assert got.mean.shape == (2, cfg.latent_channels, h // cfg.downsample_factor, w // cfg.downsample_factor)
    assert got.mean.std() > 0.1 and got.std.min() > 0.1  # a live posterior, not a degenerate one
    torch.testing.assert_close(got.mean, want.mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.std, want.std, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.var, want.var, atol=ATOL, rtol=1e-5)
    assert torch.equal(got.mode(), got.mean)
    # KL sums ~1e2 terms of O(1): relative tolerance.
    torch.testing.assert_close(got.kl(), want.kl(), atol=0, rtol=1e-5)


@torch.no_grad()
def test_sample_with_same_generator_matches_diffusers(pair):
    ours, ref, _, (h, w) = pair
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = ours.encode(x).sample(generator=torch.Generator().manual_seed(7))
    want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    other = ours.encode(x).sample(generator=torch.Generator().manual_seed(8))
    assert (other - got).abs().max() > 0.1  # the noise really comes from the generator


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, ref, cfg, (h, w) = pair
    f = cfg.downsample_factor
    z = torch.randn(2, cfg.latent_channels, h // f, w // f, generator=torch.Generator().manual_seed(3))
    got, want = ours.decode(z), ref.decode(z).sample
    assert got.shape == (2, 3, h, w)
    assert got.std() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_our_keys_are_the_ldm_keys_diffusers_converts(pair):
    """diffusers' own single-file converter reads ldm keys: fed our state dict, it must give exactly the
    reference's state dict, and so must our table."""
    ours, ref, cfg, _ = pair
    sd = ours.state_dict()
    levels = len(cfg.channel_mult)
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, config)
    ref_sd = ref.state_dict()
    mine = vae_to_diffusers(sd, cfg)
    assert set(theirs) == set(ref_sd) == set(mine)
    for key in ref_sd:
        assert torch.equal(theirs[key], ref_sd[key]), key
        assert torch.equal(mine[key], ref_sd[key]), key


def test_full_size_sd_vae_has_the_checkpoint_module_tree():
    """SD 1.x/2.x size, on the meta device (no memory): our tree is what diffusers' converter expects of
    a real `first_stage_model.*`, with the same shapes, and detection reads the config back."""
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
        ref = ReferenceVAE(**{k: v for k, v in SD15_VAE_JSON.items() if not k.startswith("_")})
    sd = ours.state_dict()
    assert len(sd) == 248  # tensors in the SD 1.5 VAE (first_stage_model.*)
    assert "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, SD15_VAE_JSON)
    ref_sd = ref.state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert set(vae_key_table(VAEConfig())) == set(sd)
    assert detect_vae_config(sd) == VAEConfig()
    assert vae_config_from_diffusers(SD15_VAE_JSON) == VAEConfig()


@pytest.mark.parametrize("name", sorted(TINY))
def test_mapping_round_trip_is_lossless(name):
    cfg, _ = TINY[name]
    model = AutoencoderKL(cfg)
    randomize_(model, seed=4)
    sd = model.state_dict()
    diffusers_sd = vae_to_diffusers(sd, cfg)
    assert diffusers_sd["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2  # Linear in diffusers
    back = vae_from_diffusers(diffusers_sd, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key


def test_old_diffusers_attention_names_are_accepted():
    cfg, _ = TINY["two_levels"]
    model = AutoencoderKL(cfg)
    randomize_(model, seed=5)
    new = vae_to_diffusers(model.state_dict(), cfg)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in new.items():
        for a, b in renames.items():
            key = key.replace(a, b)
        old[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    back = vae_from_diffusers(old, cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key
    # Conv-shaped (4-d) projections, as some old conversions stored them, load as they are.
    conv_shaped = old | {"encoder.mid_block.attentions.0.query.weight": model.encoder.mid.attn_1.q.weight}
    assert torch.equal(vae_from_diffusers(conv_shaped, cfg)["encoder.mid.attn_1.q.weight"],
                       model.encoder.mid.attn_1.q.weight)


@pytest.mark.parametrize("cfg", [TINY["two_levels"][0], TINY["three_levels"][0], VAEConfig(),
                                 VAEConfig(in_channels=1, latent_channels=8, base_channels=64,
                                           channel_mult=(1, 2, 2), num_res_blocks=3)])
def test_config_round_trip(cfg, tmp_path):
    d = vae_config_to_diffusers(cfg, 0.13025)
    assert vae_config_from_diffusers(d) == cfg
    with torch.device("meta"):  # no memory for the full-size one
        ref = ReferenceVAE(**d)  # diffusers accepts it as is
    assert ref.config.scaling_factor == 0.13025
    ref.save_config(tmp_path)  # the config.json diffusers writes, with its metadata keys, reads back
    assert vae_config_from_diffusers(json.loads((tmp_path / "config.json").read_text())) == cfg


@pytest.mark.parametrize("name", sorted(TINY))
def test_detect_vae_config_returns_the_config_it_was_built_from(name):
    cfg, _ = TINY[name]
    assert detect_vae_config(AutoencoderKL(cfg).state_dict()) == cfg


# -- bad input -----------------------------------------------------------------------------------------

def _tiny_diffusers_sd():
    cfg, _ = TINY["two_levels"]
    return cfg, vae_to_diffusers(AutoencoderKL(cfg).state_dict(), cfg)


def test_unmapped_key_is_an_error_naming_it():
    cfg, sd = _tiny_diffusers_sd()
    with pytest.raises(CheckpointError, match=r"'encoder\.extra\.weight'"):
        vae_from_diffusers(sd | {"encoder.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match=r"'loss\.logvar'"):
        vae_to_diffusers(AutoencoderKL(cfg).state_dict() | {"loss.logvar": torch.zeros(1)}, cfg)


def test_missing_weight_is_an_error_naming_it():
    cfg, sd = _tiny_diffusers_sd()
    del sd["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.conv_out\.bias"):
        vae_from_diffusers(sd, cfg, where="my/vae")
    ours = AutoencoderKL(cfg).state_dict()
    del ours["encoder.mid.attn_1.k.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.mid\.attn_1\.k\.weight"):
        vae_to_diffusers(ours, cfg)


def test_old_and_new_name_for_one_weight_is_an_error():
    cfg, sd = _tiny_diffusers_sd()
    sd["encoder.mid_block.attentions.0.query.weight"] = sd["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(CheckpointError, match=r"query\.weight.*keep only one|keep only one"):
        vae_from_diffusers(sd, cfg)


@pytest.mark.parametrize("change, error, words", [
    ({"out_channels": 4}, UnsupportedModelError, "out_channels"),
    ({"use_quant_conv": False}, UnsupportedModelError, "use_quant_conv"),
    ({"norm_num_groups": 16}, UnsupportedModelError, "norm_num_groups"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, UnsupportedModelError,
     "down_block_types"),
    ({"shift_factor": 0.1159}, UnsupportedModelError, "shift_factor"),
    ({"spatial_norm": True}, UnsupportedModelError, "spatial_norm"),
    ({"block_out_channels": [32, 48]}, UnsupportedModelError, "block_out_channels"),
])
def test_unsupported_diffusers_config_is_refused(change, error, words):
    d = vae_config_to_diffusers(TINY["two_levels"][0], 0.18215) | change
    with pytest.raises(error, match=words) as info:
        vae_config_from_diffusers(d, where="folder/vae/config.json")
    assert "folder/vae/config.json" in str(info.value)


def test_config_diffusers_cannot_express_is_refused():
    with pytest.raises(UnsupportedModelError, match="channel_mult"):
        vae_config_to_diffusers(VAEConfig(base_channels=32, channel_mult=(2, 4)), 0.18215)


def test_detect_on_diffusers_layout_says_to_convert():
    _, sd = _tiny_diffusers_sd()
    with pytest.raises(CheckpointError, match="vae_from_diffusers"):
        detect_vae_config(sd)


def test_bad_images_and_latents_raise_input_errors():
    cfg, _ = TINY["three_levels"]
    model = AutoencoderKL(cfg)
    with pytest.raises(InputError, match=r"\(batch, 3, height, width\).*\(1, 4, 8, 8\)"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="multiple of 4"):
        model.encode(torch.zeros(1, 3, 8, 10))
    with pytest.raises(InputError, match=r"\(batch, 4, height, width\)"):
        model.decode(torch.zeros(1, 3, 2, 2))
