"""VAE swap (`--vae`, Pipeline.from_pretrained(vae=...), loader.swap_vae): a second VAE with other random weights,
saved in each layout people download, decodes exactly as a model built with those weights, and bad files are
refused in one line before anything is written."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from tiny import SD1, tiny_model

from latentdiff.checkpoint import save_safetensors
from latentdiff.cli import main
from latentdiff.config import VAEConfig
from latentdiff.formats.vae_keys import vae_config_to_diffusers, vae_to_diffusers
from latentdiff.infotext import parse_parameters, read_png_parameters
from latentdiff.loader import save_model, swap_vae
from latentdiff.pipeline import Pipeline
from latentdiff.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("single_thread")
RUN = dict(steps=2, width=64, height=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model file, and the other VAE (seed 1) in every layout; "reference" is its weights in memory."""
    root = tmp_path_factory.mktemp("vae")
    other = tiny_model(SD1, seed=1)
    vae = other.vae.state_dict()
    ema = {"model_ema.decay": torch.tensor(0.9999), "loss.logvar": torch.zeros(())}  # extras real files carry
    diffusers_vae = DiffusersVAE(**vae_config_to_diffusers(SD1.vae, 0.18215))
    diffusers_vae.load_state_dict(vae_to_diffusers(vae, SD1.vae), strict=True)
    diffusers_vae.save_pretrained(root / "diffusers-vae")
    torch.save(vae | ema, root / "bare.pt")
    return {
        "model": save_model(tiny_model(SD1, seed=0), root / "tiny.safetensors"),
        "prefixed": save_safetensors({"first_stage_model." + k: v for k, v in vae.items()} | ema,
                                     root / "prefixed.safetensors"),
        "bare": save_safetensors(vae, root / "bare.safetensors"),
        "bare pickle": root / "bare.pt",
        "diffusers folder": root / "diffusers-vae",
        "diffusers keys": save_safetensors(vae_to_diffusers(vae, SD1.vae), root / "diffusers-keys.safetensors"),
        "whole checkpoint": save_model(other, root / "other-model.safetensors"),
        "whole diffusers folder": save_model(other, root / "other-model"),
        "reference": vae,
    }


def images(pipe: Pipeline) -> tuple[list[np.ndarray], object]:
    result = pipe.txt2img("a red circle", **RUN)
    return [np.asarray(image) for image in result.images], result


@pytest.fixture(scope="module")
def expected(files):
    """Images from a model built with the other VAE's weights, and from the model's own VAE."""
    model = tiny_model(SD1, seed=0)
    model.vae.load_state_dict(files["reference"], strict=True)
    swapped, _ = images(Pipeline(model, device="cpu", dtype=torch.float32))
    own, _ = images(Pipeline.from_pretrained(files["model"], device="cpu", dtype=torch.float32))
    assert not np.array_equal(swapped[0], own[0])  # the two VAEs must differ for the tests below to mean anything
    return swapped, own


LAYOUTS = ["prefixed", "bare", "bare pickle", "diffusers folder", "diffusers keys", "whole checkpoint",
           "whole diffusers folder"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swapped_vae_decodes_as_a_model_built_with_it(files, expected, layout):
    pipe = Pipeline.from_pretrained(files["model"], vae=files[layout], device="cpu", dtype=torch.float32)
    got, result = images(pipe)
    assert np.array_equal(got[0], expected[0][0])  # the same fp32 weights run the same ops: bit-identical
    params = parse_parameters(pipe.infotext(result.request, 0))[2]
    weights = {"diffusers folder": files[layout] / "diffusion_pytorch_model.safetensors",
               "whole diffusers folder": files[layout] / "vae" / "diffusion_pytorch_model.safetensors"}.get(layout,
                                                                                                          files[layout])
    assert params["VAE"] == files[layout].name
    assert params["VAE hash"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def test_a_vae_for_another_latent_scale_is_named(files, tmp_path, caplog):
    """SDXL's VAE has SD's shapes but another latent space (scaling_factor 0.13025): it loads, with a warning."""
    DiffusersVAE(**vae_config_to_diffusers(SD1.vae, 0.13025)).save_pretrained(tmp_path / "xl-vae")
    model = tiny_model(SD1)
    with caplog.at_level("WARNING", logger="latentdiff"):
        swap_vae(model, tmp_path / "xl-vae")
    assert "scaling_factor 0.13025 is not the model's latent scale 0.18215" in caplog.text


def test_no_vae_keys_without_a_swap(files):
    pipe = Pipeline.from_pretrained(files["model"], device="cpu", dtype=torch.float32)
    _, result = images(pipe)
    params = parse_parameters(pipe.infotext(result.request, 0))[2]
    assert "VAE" not in params and "VAE hash" not in params


def test_cli_writes_vae_into_the_png(files, tmp_path):
    out = tmp_path / "out"
    assert main(["txt2img", "a red circle", "-W", "64", "-H", "64", "--steps", "2", "--seed", "3", "--dtype", "fp32",
                 "--quiet", "--model", str(files["model"]), "--vae", str(files["bare"]), "-o", str(out)]) == 0
    [png] = out.glob("*.png")
    params = parse_parameters(read_png_parameters(png))[2]
    assert params["VAE"] == "bare.safetensors"
    assert params["VAE hash"] == hashlib.sha256(files["bare"].read_bytes()).hexdigest()[:10]


def _bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    torch.manual_seed(0)
    wide = AutoencoderKL(VAEConfig(base_channels=64, channel_mult=(1, 1, 1, 1), num_res_blocks=1)).state_dict()
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    return {
        "mismatch": (save_safetensors(wide, root / "wide.safetensors"),
                     "this VAE does not fit the model: base_channels 64 (the model's: 32)"),
        "lora": (save_safetensors(lora, root / "lora.safetensors"), "not a VAE"),
        "missing": (root / "nope.safetensors", "VAE not found"),
        "empty folder": ((root / "empty").resolve(), "not a diffusers AutoencoderKL folder"),
    }


@pytest.mark.parametrize("case", ["mismatch", "lora", "missing", "empty folder"])
def test_bad_vae_is_one_line_with_status_2_and_writes_nothing(files, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    path, problem = _bad_files(tmp_path)[case]
    out = tmp_path / "out"
    status = main(["txt2img", "a cat", "-W", "64", "-H", "64", "--steps", "2", "--quiet",
                   "--model", str(files["model"]), "--vae", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("latentdiff: error: ")
    assert problem in err and path.name in err
    assert not out.exists()
