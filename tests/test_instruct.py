"""InstructPix2Pix: 8-channel U-Nets load from both layouts, edit like diffusers' pipeline on the same random
weights, and their option is refused on other models with one line naming the flag.

Parity: ours runs img2img at strength 1 on a tiny 8-channel model; diffusers' StableDiffusionInstructPix2Pix-
Pipeline starts from our first x (as tests/test_pipeline_parity.py's txt2img does), with the scheduler set
to our sampler's convention. Euler and DDIM draw no noise after the start, so only arithmetic can differ:
FLOAT_TOL = 1e-4 on [0, 1] images (fp32; the suite's bound), uint8 at most 1 apart (equal floats can round
to neighbours).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image
from test_pipeline_parity import FLOAT_TOL, SCHEDULERS, init_image, our_float_image
from tiny import SD1, SD2_V, tiny_model, with_inputs

from latentdiff.cli import main
from latentdiff.conditioning import Cond
from latentdiff.denoisers import InstructCFGDenoiser
from latentdiff.errors import FieldError
from latentdiff.infotext import parse_parameters, read_png_parameters
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, CFG, IMAGE_CFG = 6, 7.5, 1.5
INSTRUCTION, NEGATIVE = "make it a red circle", "blurry"


@pytest.fixture(scope="module", params=[SD1, SD2_V], ids=["sd1", "sd2-v"])
def pipes(request, tmp_path_factory, single_thread):
    config = with_inputs(request.param, 8)
    model = tiny_model(config, seed=1)
    folder = save_model(model, tmp_path_factory.mktemp("ip2p") / config.name)
    ours = Pipeline(model, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    theirs.folder_scheduler_config = dict(theirs.scheduler.config)
    return ours, theirs


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize("scales", [(CFG, IMAGE_CFG), (4.0, 2.5), (1.0, 1.0)], ids=["default", "other", "off"])
def test_edit_matches_diffusers(pipes, sampler, scales):
    ours, theirs = pipes
    cfg, image_cfg = scales
    cls, settings, space = SCHEDULERS[sampler]
    theirs.scheduler = cls.from_config(theirs.folder_scheduler_config, **settings)
    steps = []
    result = ours.img2img(init_image(), INSTRUCTION, NEGATIVE, strength=1.0, steps=STEPS, sampler=sampler,
                          cfg_scale=cfg, image_cfg_scale=image_cfg, seed=4, progress=False, return_latents=True,
                          callback=steps.append)
    x, sigma = steps[0]["x"], steps[0]["sigma"]
    if space == "vp":
        x = x / (sigma**2 + 1) ** 0.5
    theirs.scheduler.set_timesteps(STEPS)
    out = theirs(INSTRUCTION, image=init_image(), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                 guidance_scale=cfg, image_guidance_scale=image_cfg, latents=x / theirs.scheduler.init_noise_sigma,
                 output_type="pt").images[0]
    assert out.std() > 0.05, "reference image is nearly flat: the comparison would prove little"
    float_diff = (our_float_image(ours, result.latents) - out).abs().max().item()
    u8 = np.abs(np.asarray(result.images[0]).astype(int) - (out.permute(1, 2, 0).numpy() * 255).round().astype(int))
    print(f"{ours.config.name} {sampler} {scales}: float {float_diff * 255:.4f}/255, uint8 max {u8.max()}")
    assert float_diff <= FLOAT_TOL and u8.max() <= 1


def test_the_image_conditions_every_step(pipes):
    """The image channels matter (another image, another edit), and the unconditional-image half of the
    guidance sees zeros: a denoiser that records its inputs shows the three records in diffusers' order."""
    ours, _ = pipes
    kwargs = dict(strength=1.0, steps=2, sampler="Euler", seed=1, progress=False)
    a = np.asarray(ours.img2img(init_image(), INSTRUCTION, **kwargs).images[0]).astype(int)
    b = np.asarray(ours.img2img(init_image().transpose(0), INSTRUCTION, **kwargs).images[0]).astype(int)
    assert np.abs(a - b).max() > 10
    batch = ours.img2img(init_image(), INSTRUCTION, batch_size=2, **(kwargs | dict(seed=0))).images
    # image i of a batch is the run with seed + i (up to rounding: another batch size, other kernels)
    assert np.abs(np.asarray(batch[1]).astype(int) - a).max() <= 1
    seen = []

    def network(x, sigma, cond):
        seen.append(cond)
        return x * 0

    image = torch.ones(1, 4, 2, 2)
    cond, uncond = Cond(context=torch.ones(1, 3, 5), concat=image), Cond(context=torch.zeros(1, 3, 5), concat=image)
    InstructCFGDenoiser(network)(torch.zeros(1, 4, 2, 2), 1.0, cond=cond, uncond=uncond, cfg_scale=2.0,
                                 image_cfg_scale=1.5)
    (batch,) = seen
    assert batch.context[:, 0, 0].tolist() == [1, 0, 0]  # cond, uncond, uncond
    assert batch.concat.flatten(1).mean(1).tolist() == [1, 1, 0]  # image, image, no image


def test_image_guidance_alone_and_scheduled_prompts(pipes):
    """cfg 1 with image guidance still needs the negative prompt (its two unconditional records): it runs and
    differs from both scales 1; prompt editing, which the three-way guidance cannot take yet, is refused."""
    ours, _ = pipes
    kwargs = dict(strength=1.0, steps=2, sampler="Euler", seed=1, progress=False, cfg_scale=1.0)
    alone = np.asarray(ours.img2img(init_image(), INSTRUCTION, image_cfg_scale=2.0, **kwargs).images[0]).astype(int)
    off = np.asarray(ours.img2img(init_image(), INSTRUCTION, image_cfg_scale=1.0, **kwargs).images[0]).astype(int)
    assert np.abs(alone - off).max() > 2
    with pytest.raises(FieldError, match="prompt uses prompt editing, alternation or AND"):
        ours.img2img(init_image(), "make it [red:blue:0.5]", **kwargs)


def test_guidance_formula_on_known_predictions():
    """D = D(u,0) + s_T (D(c,I) - D(u,I)) + s_I (D(u,I) - D(u,0)) with made-up predictions 3, 2, 1."""
    def network(x, sigma, cond):
        return cond.context[:, :1, :1].view(-1, 1, 1, 1).expand_as(x)

    image = torch.ones(1, 4, 2, 2)
    out = InstructCFGDenoiser(network)(torch.zeros(1, 4, 2, 2), 1.0, cfg_scale=7.0, image_cfg_scale=1.5,
                                       cond=Cond(context=torch.full((1, 1, 1), 3.0), concat=image),
                                       uncond=Cond(context=torch.full((1, 1, 1), 2.0), concat=image))
    # the two unconditional records share the context (2): D(u,I) = D(u,0) = 2, so D = 2 + 7 * (3 - 2)
    assert torch.allclose(out, torch.full_like(out, 9.0))


def test_single_file_and_folder_load_as_instruct_pix2pix(tmp_path, capsys):
    model = tiny_model(with_inputs(SD1, 8))
    single = save_model(model, tmp_path / "ip2p.safetensors")
    folder = save_model(model, tmp_path / "ip2p-folder")
    index = json.loads((folder / "model_index.json").read_text())  # as diffusers' own ip2p folders name it
    index["_class_name"] = "StableDiffusionInstructPix2PixPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    images = []
    for source in (single, folder):
        pipe = Pipeline.from_pretrained(source, device="cpu", dtype=torch.float32)
        assert pipe.config.unet.in_channels == 8
        result = pipe.img2img(init_image(), INSTRUCTION, steps=2, sampler="Euler", seed=2, progress=False)
        assert result.request.image_cfg_scale == IMAGE_CFG
        images.append(np.asarray(result.images[0]))
    assert np.array_equal(*images)
    assert main(["info", str(single)]) == 0
    assert "InstructPix2Pix U-Net (latents + image latents) (edits with img2img)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ip2p = save_model(tiny_model(with_inputs(SD1, 8)), root / "ip2p.safetensors")
    plain = save_model(tiny_model(SD1), root / "plain.safetensors")
    image = root / "in.png"
    init_image().save(image)
    return ip2p, plain, image


BASE = ["--steps", "2", "--quiet", "--dtype", "fp32", "--seed", "3", "--sampler", "Euler"]


def test_cli_edit_writes_image_cfg_scale_and_from_png_replays_it(files, tmp_path, capsys):
    ip2p, _, image = files
    out = tmp_path / "out"
    assert main(["img2img", INSTRUCTION, "--init-image", str(image), "--model", str(ip2p), "--image-cfg-scale", "1.25",
                 "--strength", "1", "-o", str(out), *BASE]) == 0
    (first,) = out.glob("*.png")
    params = parse_parameters(read_png_parameters(first)).params
    assert params["Image CFG scale"] == "1.25" and params["Denoising strength"] == "1"
    replay = tmp_path / "replay"
    assert main(["img2img", "--from-png", str(first), "--init-image", str(image), "--model", str(ip2p), "--quiet",
                 "--dtype", "fp32", "-o", str(replay)]) == 0
    (second,) = replay.glob("*.png")
    assert read_png_parameters(second) == read_png_parameters(first)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    capsys.readouterr()


@pytest.mark.parametrize("case, message", [
    ("option on an ordinary model", "--image-cfg-scale is for InstructPix2Pix checkpoints (8-channel U-Nets)"),
    ("no image for an ip2p model", "--init-image is required: this is an InstructPix2Pix checkpoint"),
    ("not a number", "--image-cfg-scale must be a finite number"),
])
def test_bad_input_is_one_line_status_2_and_nothing_written(files, tmp_path, capsys, case, message):
    ip2p, plain, image = files
    out = tmp_path / "out"
    args = {"option on an ordinary model": ["img2img", "x", "--init-image", str(image), "--model", str(plain),
                                            "--image-cfg-scale", "1.5"],
            "no image for an ip2p model": ["txt2img", "x", "--model", str(ip2p)],
            "not a number": ["img2img", "x", "--init-image", str(image), "--model", str(ip2p),
                             "--image-cfg-scale", "nan"]}[case]
    capsys.readouterr()
    assert main([*args, "-o", str(out), *BASE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
