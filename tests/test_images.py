"""Images in and out: input normalisation, tensor conversion, safe PNG saving.

Every input image is made here with PIL; expected pixels follow from the format's definition
(EXIF orientation, alpha over white, 16-bit scaling), never from our own output.
"""

import errno
import os
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from latentdiff.errors import GenerationError, InputError
from latentdiff.images import (
    fit_to_multiple, load_image, pil_to_tensor, safe_stem, save_png, tensor_to_pil,
)

WHITE = (255, 255, 255)


# ------------------------------------------------------------------------------------ input images

def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored 32 wide x 16 high: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display", which puts the stored left edge at the top.
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 32)
    top, bottom = image.getpixel((8, 4)), image.getpixel((8, 27))
    # JPEG is lossy: check the dominant channel, far from any edge.
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_rgba_transparent_pixels_become_white_and_opaque_ones_stay(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 200, 30, 255))
    rgba.putpixel((2, 2), (255, 0, 0, 128))
    path = tmp_path / "rgba.png"
    rgba.save(path)

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 1)) == (10, 200, 30)
    # Half-transparent red over white: 255*a + 255*(1-a) = 255 in red, 255*(1 - 128/255) in green
    # and blue; +-1 for PIL's integer rounding.
    r, g, b = image.getpixel((2, 2))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_la_grey_with_alpha(tmp_path):
    la = Image.new("LA", (4, 4), (50, 0))
    la.putpixel((3, 3), (50, 255))
    path = tmp_path / "la.png"
    la.save(path)

    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((3, 3)) == (50, 50, 50)


def test_palette_with_transparent_index(tmp_path):
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    palette_image.putpixel((2, 2), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    assert Image.open(path).mode == "P"  # the test really feeds a palette image with tRNS

    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE  # index 0 is transparent, although its colour is black
    assert image.getpixel((2, 2)) == (0, 128, 255)


def test_grey_l(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (4, 4), 100).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (100, 100, 100)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # a real 16-bit file, not an 8-bit one

    image = load_image(path)
    # 65535 -> 255 is a division by 257: 1000/257 = 3.89 -> 4, 25700/257 = 100 exactly.
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (100, 100, 100), WHITE]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 2), (255, 0, 0, 0))  # pure cyan ink
    cmyk.putpixel((3, 1), (0, 0, 0, 255))  # pure black ink
    path = tmp_path / "cmyk.tiff"  # TIFF keeps CMYK losslessly
    cmyk.save(path)

    image = load_image(path)
    assert image.getpixel((0, 0)) == (0, 255, 255)
    assert image.getpixel((3, 1)) == (0, 0, 0)


def test_loaded_image_is_detached_from_the_file(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(InputError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just some text, not an image\n")
    with pytest.raises(InputError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{suffix}"
    Image.fromarray(noise).save(whole)
    path = tmp_path / f"cut.{suffix}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def _png_declaring(width, height):
    """A few-hundred-byte PNG whose header declares width x height 1-bit pixels.

    Only the first rows are present: an open that did not refuse the size would fail later with a
    'truncated' error, so the message check below tells the two apart.
    """
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side_factor", [1.1, 2.5])  # PIL warns above 1x its limit, raises above 2x
def test_decompression_bomb_is_refused(tmp_path, side_factor):
    limit = Image.MAX_IMAGE_PIXELS
    side = int((limit * side_factor) ** 0.5) + 1
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(side, side))
    assert path.stat().st_size < 1000
    filters_before = list(warnings.filters)

    with pytest.raises(InputError, match="decompression bomb") as info:
        load_image(path)
    assert str(path) in str(info.value)
    # Neither PIL's limit nor the global warning filters were changed.
    assert Image.MAX_IMAGE_PIXELS == limit
    assert warnings.filters == filters_before


def test_float_image_is_refused_rather_than_guessed(tmp_path):
    path = tmp_path / "float.tiff"
    Image.new("F", (4, 4), 0.5).save(path)
    with pytest.raises(InputError, match="floating-point"):
        load_image(path)


# ------------------------------------------------------------------------------------ multiple of 8

def _coordinate_image(width, height):
    """Red = x, green = y: a cropped pixel tells where it came from."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def test_fit_to_multiple_crops_centred_down_to_multiple():
    image = fit_to_multiple(_coordinate_image(85, 70), 8)
    # 85 -> 80 drops 5 columns: 2 on the left, 3 on the right; 70 -> 64 drops 3 rows above, 3 below.
    assert image.size == (80, 64)
    assert image.getpixel((0, 0)) == (2, 3, 0)
    assert image.getpixel((79, 63)) == (81, 66, 0)


def test_fit_to_multiple_leaves_a_fitting_image_alone():
    original = _coordinate_image(64, 16)
    assert fit_to_multiple(original, 8) is original
    assert fit_to_multiple(_coordinate_image(130, 64), 64).size == (128, 64)


@pytest.mark.parametrize("size", [(7, 64), (64, 5)])
def test_fit_to_multiple_refuses_a_side_below_the_multiple(size):
    with pytest.raises(InputError, match=f"{size[0]}x{size[1]}"):
        fit_to_multiple(Image.new("RGB", size), 8)


def test_fit_to_multiple_checks_the_multiple():
    with pytest.raises(InputError, match="multiple"):
        fit_to_multiple(Image.new("RGB", (8, 8)), 0)


# ------------------------------------------------------------------------------------ tensors

def _noise_image(width=24, height=16, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255
    return Image.fromarray(rgb)


def test_pil_to_tensor_matches_diffusers_and_its_range():
    image = _noise_image()
    ours = pil_to_tensor(image)
    reference = VaeImageProcessor(do_resize=False).preprocess(image)
    assert ours.shape == (1, 3, 16, 24) and ours.dtype == torch.float32
    # Same float32 arithmetic on the same uint8 values: the results must be identical.
    assert (ours - reference).abs().max().item() == 0.0
    assert ours[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert ours[0, :, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_pil_to_tensor_dtype_and_mode():
    assert pil_to_tensor(_noise_image(), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(InputError, match="RGB"):
        pil_to_tensor(Image.new("RGBA", (8, 8)))


def test_tensor_round_trip_is_lossless():
    images = [_noise_image(seed=1), _noise_image(seed=2)]
    batch = torch.cat([pil_to_tensor(image) for image in images])
    back = tensor_to_pil(batch)
    assert len(back) == 2
    for original, restored in zip(images, back):
        assert restored.mode == "RGB" and np.array_equal(np.asarray(original), np.asarray(restored))


def test_tensor_to_pil_matches_diffusers_rounding_and_clamping():
    x = torch.linspace(-1.3, 1.3, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    ours = np.stack([np.asarray(image) for image in tensor_to_pil(x)])
    reference = np.stack([np.asarray(image) for image in VaeImageProcessor().postprocess(x, output_type="pil")])
    assert np.array_equal(ours, reference)  # uint8 output: exact equality is the tolerance
    assert ours.min() == 0 and ours.max() == 255  # values beyond [-1, 1] were clamped


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tensor_to_pil_refuses_non_finite(bad):
    x = torch.zeros(1, 3, 8, 8)
    x[0, 1, 2, 3] = bad
    with pytest.raises(GenerationError, match="NaN or Inf"):
        tensor_to_pil(x)


def test_tensor_to_pil_checks_shape():
    with pytest.raises(InputError, match=r"\(3, 8, 8\)"):
        tensor_to_pil(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------------ saving

PARAMS = "a red fox, snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 1"


def test_png_has_a_text_chunk_named_parameters_readable_by_plain_pil(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), (9, 8, 7)), tmp_path, "fox", PARAMS)
    assert path == tmp_path / "fox.png"
    # The raw chunk: A1111 and other tools look for exactly this keyword in a tEXt chunk.
    assert b"tEXtparameters\x00" + PARAMS.encode("latin-1") in path.read_bytes()
    with Image.open(path) as image:
        assert image.text["parameters"] == PARAMS
        assert image.getpixel((0, 0)) == (9, 8, 7)


def test_non_latin1_parameters_survive_in_an_itxt_chunk(tmp_path):
    text = "一只猫, ☃\nSteps: 1, Sampler: x, Seed: 2"
    path = save_png(Image.new("RGB", (8, 8)), tmp_path, "cat", text)
    assert b"iTXtparameters\x00" in path.read_bytes()
    with Image.open(path) as image:
        assert image.text["parameters"] == text


def test_png_without_parameters(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path, "plain", None)
    assert b"parameters" not in path.read_bytes()


def test_existing_file_is_never_overwritten(tmp_path):
    existing = tmp_path / "fox.png"
    existing.write_bytes(b"precious bytes")
    first = save_png(Image.new("RGB", (8, 8)), tmp_path, "fox", PARAMS)
    second = save_png(Image.new("RGB", (8, 8)), tmp_path, "fox", PARAMS)
    assert (first.name, second.name) == ("fox-1.png", "fox-2.png")
    assert existing.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox-2.png", "fox.png"]


def test_concurrent_saves_never_share_a_name(tmp_path):
    saved = []

    def save_some(shade):
        for _ in range(8):
            saved.append(save_png(Image.new("RGB", (8, 8), (shade,) * 3), tmp_path, "same", None))

    threads = [threading.Thread(target=save_some, args=(shade,)) for shade in (10, 200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(saved)) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved)  # no temp files


def test_outdir_is_created(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a" / "b", "x", None)
    assert path == tmp_path / "a" / "b" / "x.png" and path.is_file()


def test_outdir_that_is_a_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    with pytest.raises(InputError, match="exists as a file"):
        save_png(Image.new("RGB", (8, 8)), blocker, "x", None)
    assert blocker.read_text() == "a file"


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def save_half_then_fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half of a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    outdir = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        save_png(Image.new("RGB", (8, 8)), outdir, "fox", PARAMS)
    assert list(outdir.iterdir()) == []


def test_failure_while_claiming_the_name_leaves_nothing(tmp_path, monkeypatch):
    def broken_link(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    with pytest.raises(OSError, match="Input/output"):
        save_png(Image.new("RGB", (8, 8)), tmp_path, "fox", PARAMS)
    assert list(tmp_path.iterdir()) == []


def test_filesystem_without_hard_links_still_never_overwrites(tmp_path, monkeypatch):
    def no_hard_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # what vfat answers

    monkeypatch.setattr(os, "link", no_hard_links)
    existing = tmp_path / "fox.png"
    existing.write_bytes(b"precious bytes")
    path = save_png(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path, "fox", PARAMS)
    assert path.name == "fox-1.png"
    assert existing.read_bytes() == b"precious bytes"
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (1, 2, 3) and image.text["parameters"] == PARAMS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox.png"]


@pytest.mark.parametrize("stem", [
    "../../escape", "/etc/passwd", "..\\..\\windows", "a/../../b", "..", ".", "", "\x00\x01nul",
    "line\nbreak", "C:evil", "CON", "nul.txt", "~/home", "x" * 1000, "猫" * 50, " .hidden. ",
])
def test_prompt_derived_stems_stay_inside_outdir(tmp_path, stem):
    outdir = tmp_path / "out"
    path = save_png(Image.new("RGB", (8, 8)), outdir, stem, None)
    assert path.parent == outdir and path.is_file()
    assert list(outdir.iterdir()) == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside outdir
    name = path.name
    assert not name.startswith(".") and ".." not in name and "/" not in name and "\\" not in name
    assert all(ch.isprintable() for ch in name)
    assert len(name.encode("utf-8")) <= 130
    assert name.split(".")[0].upper() not in {"CON", "NUL"}


def test_safe_stem_keeps_ordinary_text():
    assert safe_stem("00012-1234 a red fox, snow") == "00012-1234 a red fox, snow"
    assert safe_stem("a  b\tc") == "a b c"
    assert safe_stem("猫" * 300).encode("utf-8") == ("猫" * 40).encode("utf-8")  # 120 bytes, whole chars
