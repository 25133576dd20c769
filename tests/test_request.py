"""GenerationRequest and the Python API around it: one place for defaults and checks, diffusers' habits met
halfway (a list of prompts is a batch, dtype names, pipe.to(dtype), paths or PIL images), A1111's resize modes."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import SD1, tiny_model

import latentdiff
from latentdiff.errors import FieldError, InputError
from latentdiff.images import resize_to
from latentdiff.devices import check_device, parse_dtype
from latentdiff.pipeline import Pipeline
from latentdiff.request import DEFAULTS, GenerationRequest, resize_mode

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = dict(steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe(single_thread):
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32)


def test_defaults_live_in_the_request():
    assert (DEFAULTS.steps, DEFAULTS.sampler, DEFAULTS.cfg_scale, DEFAULTS.seed) == (20, "Euler a", 7.0, -1)
    assert GenerationRequest(prompt="a cat").validate().prompts == ["a cat"]


@pytest.mark.parametrize("fields, field", [
    (dict(width=0), "width"), (dict(height=8192), "height"), (dict(steps=True), "steps"),
    (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(strength=0.0), "strength"), (dict(seed=2**64), "seed"),
    (dict(batch_size=65), "batch_size"), (dict(resize_mode="stretch"), "resize_mode"),
    (dict(init_image=3), "init_image"), (dict(loras=("x",)), "loras"), (dict(mask=Image.new("L", (8, 8))), "mask"),
    (dict(sampler=None), "sampler"), (dict(prompt=None), "prompt"),
])
def test_validation_names_the_field(fields, field):
    with pytest.raises(FieldError) as error:
        GenerationRequest(prompt="a cat").replace(**fields).validate()
    assert error.value.field == field and str(error.value).startswith(field + " ")


def test_resize_modes_by_name_and_number():
    assert [resize_mode(m) for m in (0, 1, 2, "Crop and Resize")] == [
        "just resize", "crop and resize", "resize and fill", "crop and resize"]


def stripes(width, height) -> Image.Image:
    """Left half red, right half blue: where the halves end shows what a resize did."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    return Image.fromarray(pixels)


def test_resize_modes_geometry():
    image = stripes(200, 100)  # 2:1 into a square
    stretched = np.asarray(resize_to(image, 64, 64, "just resize"))
    assert stretched[:, :28, 0].min() > 200 and stretched[:, 36:, 2].min() > 200  # both halves kept, squeezed
    cropped = np.asarray(resize_to(image, 64, 64, "crop and resize"))  # 128x64 cover, centre 64 columns kept
    assert cropped[:, :28, 0].min() > 200 and cropped[:, 36:, 2].min() > 200
    assert resize_to(image, 64, 64, "crop and resize").size == (64, 64)
    filled = np.asarray(resize_to(image, 64, 64, "resize and fill"))  # 64x32 fitted, 16 rows above and below
    assert filled.shape == (64, 64, 3)
    assert np.array_equal(filled[0], filled[16]) and np.array_equal(filled[63], filled[47])  # edge rows repeated


def test_a_list_of_prompts_is_a_batch(pipe):
    batch = pipe.txt2img(["a red circle", "a blue square"], seed=4, return_latents=True, **FAST)
    singles = [pipe.txt2img(p, seed=s, return_latents=True, **FAST) for p, s in (("a red circle", 4),
                                                                                    ("a blue square", 5))]
    assert batch.seeds == [4, 5] and len(batch.images) == 2
    for i, single in enumerate(singles):  # the batched GEMMs may round differently: test_pipeline's bound
        torch.testing.assert_close(batch.latents[i], single.latents[0], rtol=1e-5, atol=1e-4)


def test_n_iter_continues_the_seeds(pipe):
    result = pipe.txt2img("a cat", seed=10, batch_size=2, n_iter=2, **FAST)
    assert result.seeds == [10, 11, 12, 13] and len(result.images) == 4
    assert result.request.seed == 10 and result.request.width == SD1.resolution


def test_img2img_takes_a_path_or_an_image_and_crops_without_a_size(pipe, tmp_path):
    image = stripes(72, 64)
    image.save(tmp_path / "in.png")
    from_pil = pipe.img2img(image, "a cat", seed=1, **FAST)
    from_path = pipe.img2img(tmp_path / "in.png", "a cat", seed=1, **FAST)
    assert from_pil.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(from_pil.images[0]), np.asarray(from_path.images[0]))
    assert from_pil.notes == ["init image cropped from 72x64 to 64x64 (sides must be multiples of 16)"]


def test_img2img_with_a_size_uses_the_resize_mode(pipe):
    result = pipe.img2img(stripes(100, 50), "a cat", seed=1, width=128, height=64, resize_mode="crop and resize",
                          **FAST)
    assert result.images[0].size == (128, 64)
    only_width = pipe.img2img(stripes(100, 50), "a cat", seed=1, width=128, **FAST)  # keeps the aspect: 128x64
    assert only_width.images[0].size == (128, 64)


def test_wrong_types_get_a_clear_error(pipe):
    with pytest.raises(FieldError, match="init_image must be a PIL image or a file path, not int"):
        pipe.img2img(3, "a cat", **FAST)
    with pytest.raises(FieldError, match="prompt must be a string or a list of strings"):
        pipe.txt2img(7, **FAST)
    with pytest.raises(InputError, match="needs a GenerationRequest, not dict"):
        pipe.generate({"prompt": "a cat"})


def test_dtype_names_and_pipe_to(pipe):
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32 and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(FieldError, match="dtype 'int8'"):
        parse_dtype("int8")
    other = Pipeline(tiny_model(SD1), device="cpu", dtype="bf16")
    assert other.dtype is torch.bfloat16 and other.model.dtype is torch.bfloat16
    assert other.to(torch.float32) is other and other.model.dtype is torch.float32
    other.to("cpu", "bf16")
    assert other.model.dtype is torch.bfloat16 and other.device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_device_is_a_clear_error():
    with pytest.raises(FieldError, match="device cuda: this machine has no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(FieldError, match="'gpu' is not a device"):
        check_device("gpu")


def test_pipeline_is_importable_from_the_package():
    assert latentdiff.Pipeline is Pipeline
