"""Inpainting and outpainting (latentdiff/inpaint.py): masks, A1111's blend on ordinary models, the command line.

Parity of inpainting U-Nets with diffusers is in test_inpaint_parity.py; the demo-model measurements in
test_inpaint_demo.py.
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from scipy.ndimage import gaussian_filter
from tiny import SD1, inpainting_config, tiny_model

from latentdiff import inpaint
from latentdiff.cli import main
from latentdiff.errors import FieldError
from latentdiff.infotext import from_fields, parse_parameters, read_png_parameters, to_fields
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline
from latentdiff.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")
RUN = dict(steps=3, seed=4, progress=False)


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64] / 63.0
    return Image.fromarray((np.stack([x, y, 1 - x * y], axis=-1) * 255).round().astype(np.uint8))


def box_mask(box=(16, 16, 40, 40), size=(64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def pipe(single_thread):
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32)


# -- masks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [1, 1.5, 4, 12])
def test_blur_is_opencv_s_gaussian_as_a1111_calls_it(radius):
    """OpenCV's GaussianBlur with A1111's window 2 * int(2.5 r + 0.5) + 1 and mirrored borders (BORDER_REFLECT_101)
    is scipy's gaussian_filter with mode="mirror" and that window; within 1 for the uint8 rounding."""
    rng = np.random.default_rng(0)
    mask = Image.fromarray((rng.random((40, 56)) > 0.7).astype(np.uint8) * 255)
    half = int(2.5 * radius + 0.5)
    expected = gaussian_filter(np.asarray(mask, dtype=np.float64), radius, mode="mirror", truncate=half / radius,
                               radius=half)
    got = np.asarray(inpaint.blur_mask(mask, radius), dtype=np.float64)
    assert np.abs(got - expected).max() <= 1
    assert inpaint.blur_mask(mask, 0) is mask


def test_crop_region_is_diffusers_and_a1111_s():
    rng = np.random.default_rng(1)
    for _ in range(200):
        w, h = rng.choice([64, 96, 128], 2)
        x1, y1 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        mask = box_mask((x1, y1, rng.integers(x1 + 1, w), rng.integers(y1 + 1, h)), (w, h))
        pad, width, height = int(rng.integers(0, 20)), int(rng.choice([64, 128])), int(rng.choice([64, 96]))
        assert inpaint.crop_region(mask, pad, width, height) == \
            tuple(VaeImageProcessor.get_crop_region(mask, width, height, pad=pad))
    assert inpaint.crop_region(Image.new("L", (64, 64)), 8, 64, 64) is None


def test_fill_paints_the_hole_with_its_surroundings():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 30, 30)
    image[:, 32:] = (30, 30, 200)
    filled = np.asarray(inpaint.fill_masked(Image.fromarray(image), box_mask((4, 20, 20, 44))))
    assert np.array_equal(filled[:, 32:], image[:, 32:]) and np.array_equal(filled[:20], image[:20])
    assert np.abs(filled[20:44, 4:20].astype(int) - (200, 30, 30)).max() <= 2  # red all round: red


def test_alpha_channel_and_rgba_masks():
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.eval(box_mask(), lambda v: 255 - v))  # transparent square
    assert np.array_equal(np.asarray(inpaint.mask_from_alpha(rgba)), np.asarray(box_mask()))
    painted = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    painted.paste((255, 255, 255, 255), (16, 16, 40, 40))  # A1111's editor: opaque strokes on transparency
    assert np.array_equal(np.asarray(inpaint.load_mask(painted)), np.asarray(box_mask()))
    with pytest.raises(FieldError, match="the init image has none"):
        inpaint.mask_from_alpha(picture())


@pytest.mark.parametrize("fields, field, words", [
    (dict(mask=box_mask()), "mask", "needs an init image"),
    (dict(init_image=picture(), mask=3), "mask", "must be a PIL image, a file path or 'alpha'"),
    (dict(init_image=picture(), mask=box_mask(), inpainting_fill="noise"), "inpainting_fill", "'latent noise'"),
    (dict(init_image=picture(), mask=box_mask(), mask_blur=-1), "mask_blur", "0 to 256"),
    (dict(init_image=picture(), mask=box_mask(), inpaint_full_res=2), "inpaint_full_res", "true/false"),
    (dict(init_image=picture(), mask_blur=8), "mask_blur", "applies only when inpainting"),
    (dict(init_image=picture(), outpaint="left:60"), "outpaint", "multiple of 8"),
    (dict(init_image=picture(), outpaint="west:64"), "outpaint", "SIDE:PIXELS"),
    (dict(init_image=picture(), outpaint="left:64", mask=box_mask()), "mask", "outpainting makes its own mask"),
])
def test_inpaint_fields_are_validated(fields, field, words):
    with pytest.raises(FieldError, match=words) as error:
        GenerationRequest(prompt="x", **fields).validate()
    assert error.value.field == field


def test_masked_content_and_margins_by_a1111_s_names_and_numbers():
    assert [inpaint.masked_content(i) for i in range(4)] == list(inpaint.MASKED_CONTENT)
    assert inpaint.masked_content(" Latent Noise ") == "latent noise"
    assert inpaint.outpaint_margins("left:64, top:8") == (64, 0, 8, 0)
    assert inpaint.outpaint_margins({"right": 16}) == (0, 16, 0, 0)
    assert inpaint.outpaint_text((64, 0, 8, 0)) == "left:64,top:8"


# -- ordinary models: A1111's method ----------------------------------------------------------------

def test_a1111_blend_replaces_the_denoised_x0_outside_the_mask(pipe):
    """Every step's denoised prediction (what the callback reports) holds the original latents wherever the
    latent mask keeps them, and the kept pixels beyond the blur's reach come back exactly (pasted back)."""
    steps = []
    result = pipe.img2img(picture(), "a cat", mask=box_mask(), mask_blur=2, strength=0.9, callback=steps.append,
                          return_latents=True, **RUN)
    keep = 1 - inpaint.prepare(picture(), box_mask(), blur=2, invert=False, fill="original", only_masked=False,
                               padding=0, notes=[]).latent_mask(8, 8)
    first = steps[0]["denoised"]
    assert len(steps) == 2 and 0 < keep.mean() < 1
    for step in steps[1:]:
        assert torch.equal(step["denoised"] * keep, first * keep)
        assert (step["denoised"] - first).mul(1 - keep).abs().max() > 0  # the masked part is being repainted
    assert torch.allclose(result.latents * keep, first * keep)
    out, original = np.asarray(result.images[0]).astype(int), np.asarray(picture()).astype(int)
    far = np.ones((64, 64), bool)
    far[16 - 6:40 + 6, 16 - 6:40 + 6] = False  # the window's half width at blur 2 is 5 px
    assert np.array_equal(out[far], original[far]) and np.abs(out - original)[20:36, 20:36].mean() > 3


def test_masked_content_changes_only_the_masked_area(pipe):
    images = {fill: np.asarray(pipe.img2img(picture(), "a cat", mask=box_mask(), mask_blur=0, inpainting_fill=fill,
                                            **RUN).images[0]).astype(int) for fill in inpaint.MASKED_CONTENT}
    kept = np.asarray(box_mask()) == 0
    for fill, image in images.items():
        assert np.array_equal(image[kept], np.asarray(picture())[kept]), fill
    inside = [image[16:40, 16:40] for image in images.values()]
    assert all(np.abs(a - b).max() > 0 for i, a in enumerate(inside) for b in inside[i + 1:])


def test_invert_mask_is_the_inverted_mask(pipe):
    inverted = Image.eval(box_mask(), lambda v: 255 - v)
    a = pipe.img2img(picture(), "a cat", mask=box_mask(), inpainting_mask_invert=True, **RUN)
    b = pipe.img2img(picture(), "a cat", mask=inverted, **RUN)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_mask_notes_other_size_empty_and_all_white(pipe):
    small = box_mask((8, 8, 20, 20), (32, 32))
    result = pipe.img2img(picture(), "a cat", mask=small, **RUN)
    assert result.notes == ["mask resized from 32x32 to the image's 64x64"]
    empty = pipe.img2img(picture(), "a cat", mask=Image.new("L", (64, 64)), **RUN)
    assert any("the mask is empty" in note for note in empty.notes)
    assert np.array_equal(np.asarray(empty.images[0]), np.asarray(picture()))  # unchanged, as the note says
    white = pipe.img2img(picture(), "a cat", mask=Image.new("L", (64, 64), 255), **RUN)
    assert any("the mask is all white" in note for note in white.notes)
    plain = pipe.img2img(picture(), "a cat", **RUN)
    assert np.array_equal(np.asarray(white.images[0]), np.asarray(plain.images[0]))  # as plain img2img


def test_outpaint_extends_the_canvas_and_keeps_the_image(pipe):
    result = pipe.img2img(picture(), "a cat", outpaint="left:64", mask_blur=2, **RUN)
    out = np.asarray(result.images[0]).astype(int)
    assert out.shape == (64, 128, 3) and result.request.width == 128
    assert np.array_equal(out[:, 64 + 6:], np.asarray(picture())[:, 6:])  # beyond the blur band: exact


def test_an_inpainting_model_without_a_mask_repaints_everything():
    """A1111 gives an inpainting U-Net with nothing to keep the mask all 1 and a mid-grey masked image: img2img
    without a mask is then exactly img2img under an all-white mask (same draws, same channels), and txt2img
    runs."""
    model = Pipeline(tiny_model(inpainting_config(SD1)), device="cpu", dtype=torch.float32)
    plain = model.img2img(picture(), "a cat", **RUN)
    white = model.img2img(picture(), "a cat", mask=Image.new("L", (64, 64), 255), **RUN)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(white.images[0]))
    drawn = np.asarray(model.txt2img("a cat", **RUN).images[0])
    assert drawn.shape == (64, 64, 3) and drawn.std() > 1


def test_an_inpainting_model_takes_scheduled_prompts():
    """AND and prompt editing reach a 9-channel U-Net with its mask channels on every part: `a cat AND a cat`
    at cfg 3 guides as `a cat` at cfg 6 (uncond + 2 * 3 * (cond - uncond))."""
    model = Pipeline(tiny_model(inpainting_config(SD1)), device="cpu", dtype=torch.float32)
    run = dict(RUN, mask=box_mask())
    single = model.img2img(picture(), "a cat", cfg_scale=6.0, return_latents=True, **run)
    double = model.img2img(picture(), "a cat AND a cat", cfg_scale=3.0, return_latents=True, **run)
    assert torch.allclose(single.latents, double.latents, atol=1e-5)
    edited = model.img2img(picture(), "[a cat:a dog:0.5]", return_latents=True, **run)
    assert not torch.allclose(edited.latents, single.latents)


def test_inpainting_options_on_a_model_that_cannot_use_them(tmp_path, capsys):
    pix2pix = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, in_channels=8))
    other = Pipeline(tiny_model(pix2pix), device="cpu", dtype=torch.float32)
    with pytest.raises(FieldError, match="mask cannot be used with this checkpoint: it is an InstructPix2Pix U-Net"):
        other.img2img(picture(), "a cat", mask=box_mask(), **RUN)
    model = save_model(other.model, tmp_path / "pix2pix.safetensors")
    picture().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    status = main(["img2img", "a cat", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                   "--model", str(model), "--dtype", "fp32", "--quiet", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--mask cannot be used with this checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()


# -- infotext and the command line ------------------------------------------------------------------

def test_infotext_writes_a1111_s_keys_and_reads_them_back():
    fields = dict(prompt="a", steps=3, sampler="Euler", seed=1, strength=0.6, mask_blur=0, inpainting_mask_invert=True,
                  inpainting_fill="latent noise", inpaint_full_res=True, inpaint_full_res_padding=12)
    text = from_fields(fields)
    assert ("Mask blur: 0, Mask mode: Inpaint not masked, Masked content: latent noise, Inpaint area: Only masked, "
            "Masked area padding: 12") in text
    read, unhonoured = to_fields(parse_parameters(text))
    assert {k: read[k] for k in fields} == fields and unhonoured == []
    a1111 = to_fields(parse_parameters("a\nSteps: 3, Sampler: Euler, Seed: 1, Mask blur: 4, Inpaint area: Whole "
                                       "picture, Mask mode: Inpaint masked"))[0]
    assert (a1111["mask_blur"], a1111["inpaint_full_res"], a1111["inpainting_mask_invert"]) == (4, False, False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint-cli")
    picture().save(root / "in.png")
    box_mask().save(root / "mask.png")
    (root / "not-an-image.png").write_text("no")
    model = save_model(tiny_model(SD1), root / "tiny.safetensors")
    return root, ["--model", str(model), "--dtype", "fp32", "--steps", "2", "--quiet"]


def test_cli_inpaints_and_replays_from_png(files, capsys):
    root, common = files
    args = ["img2img", "a cat", "--init-image", str(root / "in.png"), "--mask", str(root / "mask.png"), "--seed", "3",
            "--masked-content", "fill", "--only-masked", "--mask-padding", "8", "--mask-blur", "2", *common]
    assert main([*args, "-o", str(root / "a")]) == 0
    made = root / "a" / "3.png"
    params = parse_parameters(read_png_parameters(made)).params
    assert (params["Masked content"], params["Inpaint area"], params["Masked area padding"], params["Mask blur"]) == \
        ("fill", "Only masked", "8", "2")
    replay = ["img2img", "--from-png", str(made), "--init-image", str(root / "in.png"), *common]
    assert main([*replay, "--mask", str(root / "mask.png"), "-o", str(root / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(root / "b" / "3.png")))
    capsys.readouterr()
    assert main([*replay, "-o", str(root / "c")]) == 2  # the mask is not in the PNG
    assert "this image was inpainted; replay it with --mask MASK" in capsys.readouterr().err
    assert not (root / "c").exists()


@pytest.mark.parametrize("extra, message", [
    (["--mask", "{root}/not-an-image.png"], "--mask {root}/not-an-image.png is not an image PIL can read"),
    (["--mask", "{root}/missing.png"], "--mask {root}/missing.png does not exist"),
    (["--mask-blur", "3"], "--mask-blur applies only when inpainting"),
    (["--mask", "alpha"], "--mask 'alpha' takes the mask from the init image's transparency"),
    (["--outpaint", "left:65"], "--outpaint left:65: each side takes a multiple of 8 px"),
    (["--mask", "{root}/mask.png", "--masked-content", "noise"], "argument --masked-content: invalid choice"),
])
def test_cli_bad_inpaint_input_is_one_line_status_2_nothing_written(files, extra, message, capsys):
    root, common = files
    args = ["img2img", "a", "--init-image", str(root / "in.png"), *[part.format(root=root) for part in extra]]
    try:
        status = main([*args, *common, "-o", str(root / "bad")])
    except SystemExit as usage_error:  # argparse's own errors exit from inside main
        status = usage_error.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message.format(root=root) in err[0], err
    assert not (root / "bad").exists()


def test_cli_mask_from_the_init_image_s_alpha(files):
    root, common = files
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.eval(box_mask(), lambda v: 255 - v))
    rgba.save(root / "holed.png")
    for mask, out in (("alpha", "alpha"), (str(root / "mask.png"), "file")):
        assert main(["img2img", "a cat", "--init-image", str(root / "holed.png"), "--mask", mask, "--seed", "1",
                     *common, "-o", str(root / out)]) == 0
    made = [np.asarray(Image.open(root / out / "1.png")) for out in ("alpha", "file")]
    assert np.array_equal(*made)
