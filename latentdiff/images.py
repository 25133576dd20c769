"""Images in and out: reading user images, PIL <-> tensor, safe PNG saving.

save_png stores the generation parameters text (infotext.py writes and reads it) in a PNG text
chunk named `parameters`, where A1111, Forge, ComfyUI loaders and civitai look for it.
"""

import contextlib
import errno
import io
import os
import re
import secrets
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import GenerationError, InputError

# ---------------------------------------------------------------------------------------- input images

BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image, detached from the file.

    - The EXIF Orientation tag is applied, so a phone photo comes out the way viewers show it.
    - Transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour) is composited over white, the
      background most UIs show behind transparent pixels; the alpha channel is then dropped.
    - 16-bit grey (I;16*, and I, which PIL uses for 16-bit data) is scaled 65535 -> 255; PIL's own
      conversion would clip everything above 255 to white.
    - CMYK, YCbCr, 1-bit, palette and the other modes go through PIL's conversion to RGB.
    - Only the first frame of an animated or multi-page file is read.

    Images with more pixels than PIL.Image.MAX_IMAGE_PIXELS are refused as possible decompression
    bombs (PIL only warns between 1x and 2x that limit; here both are errors). Every failure raises
    InputError naming the file.
    """
    path = Path(path)
    try:
        # Turning the bomb warning into an error is scoped to this block; the global filters and
        # PIL's limit are left as they were.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                upright = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise InputError(f"input image {path} does not exist: check the path "
                         f"(relative paths start from {Path.cwd()})") from None
    except IsADirectoryError:
        raise InputError(f"input image {path} is a folder, not an image file: pass the path of "
                         "one image") from None
    except PermissionError:
        raise InputError(f"input image {path} cannot be read (permission denied): "
                         "fix its permissions or copy it somewhere readable") from None
    except UnidentifiedImageError:
        raise InputError(f"input image {path} is not an image PIL can read: pass a PNG, JPEG, "
                         "WebP, BMP, GIF or TIFF file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"input image {path} is refused as a possible decompression bomb ({e}): "
                         "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the "
                         "file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"input image {path} is truncated or corrupt ({e}): re-export or "
                         "re-download it") from None
    return _to_rgb(upright, path)


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        # Float images have no agreed range ([0, 1]? [0, 255]?); guessing could give a black image.
        raise InputError(f"input image {path} holds 32-bit floating-point pixels, which have no "
                         "standard range: convert it to an 8- or 16-bit PNG first")
    try:
        if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
            background = Image.new("RGBA", image.size, BACKGROUND + (255,))
            return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"input image {path} has pixel mode {image.mode!r}, which PIL cannot "
                         f"convert to RGB ({e}): re-save it as an RGB PNG") from None


def fit_to_multiple(image: Image.Image, multiple: int = 8) -> Image.Image:
    """Crop each side DOWN to a multiple of `multiple` by a centred crop (at most multiple - 1 px).

    The VAE needs sides divisible by 8. Cropping keeps every remaining pixel exactly as it was
    (resizing would resample the whole image); the extra pixel of an odd excess goes from the
    right/bottom edge. An image that already fits is returned as is.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise InputError(f"fit_to_multiple: multiple must be a positive integer, got {multiple!r}")
    width, height = image.size
    if width < multiple or height < multiple:
        raise InputError(f"image is {width}x{height}, smaller than {multiple} px on a side: "
                         f"use an image at least {multiple}x{multiple}")
    new_width, new_height = width - width % multiple, height - height % multiple
    if (new_width, new_height) == (width, height):
        return image
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))



def as_rgb_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """A path or a PIL image (any mode) as an upright 8-bit RGB image, as load_image reads files."""
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image), Path("<PIL image>"))
    return load_image(image)


def resize_to(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at exactly width x height, by one of A1111's img2img resize modes:
    "just resize" stretches it; "crop and resize" scales it to cover the size and crops the centre;
    "resize and fill" scales it to fit inside and fills the two margins by repeating its edge pixels."""
    if image.size == (width, height):
        return image
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    cover = mode == "crop and resize"
    scale = (max if cover else min)(width / image.width, height / image.height)
    scaled = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    if cover:
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    pad_x, pad_y = width - scaled.width, height - scaled.height
    pad = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
    return Image.fromarray(np.pad(np.asarray(scaled), pad, mode="edge"))

# ---------------------------------------------------------------------------------------- tensors

def pil_to_tensor(image: Image.Image, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) tensor in [-1, 1], the VAE's input range (0 -> -1, 255 -> 1).

    Computed in float32 like diffusers' image processor, then cast to `dtype`.
    """
    if image.mode != "RGB":
        raise InputError(f"pil_to_tensor needs an RGB image, got mode {image.mode!r}: "
                         "read images with load_image(), which converts them")
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)
    return (2.0 * pixels - 1.0).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """A (B, 3, H, W) tensor in [-1, 1] (any device or dtype) as B RGB images.

    Values outside [-1, 1] are clamped; the arithmetic is diffusers': (x/2 + 0.5).clamp(0, 1) * 255,
    rounded half to even, in float32. NaN or Inf raises GenerationError instead of giving a black
    image.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"tensor_to_pil needs a (batch, 3, height, width) tensor, got shape "
                         f"{tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise GenerationError("the decoded image contains NaN or Inf values (usually fp16 overflow "
                              "in the VAE): decode in float32 or use an fp16-safe VAE")
    pixels = ((x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


# ---------------------------------------------------------------------------------------- saving

_MAX_STEM_BYTES = 120  # room for "-NNNN.png" under the 255-byte file-name limit of common filesystems
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                    *(f"LPT{i}" for i in range(1, 10))}
# os.link fails with these where the filesystem has no hard links (FAT, some network mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_MAX_NUMBER = 99999


def tile_grid(rows: list[list[Image.Image]], size: tuple[int, int], fill="white") -> Image.Image:
    """The images in rows, each nearest-neighbour resized to `size` (width, height) so pixels stay sharp."""
    w, h = size
    grid = Image.new("RGB", (max(len(row) for row in rows) * w, len(rows) * h), fill)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((w, h), Image.NEAREST), (c * w, r * h))
    return grid


def safe_stem(text: str) -> str:
    """A file-name stem made from free text (a prompt, a seed): one path component, never a path.

    Whitespace runs (newlines, tabs) become one space; separators, other control and format
    characters and characters Windows forbids become "_"; runs of dots collapse to one;
    leading/trailing dots and spaces go (no hidden files, no "." or ".."); Windows device names get
    a "_" prefix; the result is cut to 120 UTF-8 bytes on a character boundary. An empty result
    becomes "image".
    """
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    text = "".join("_" if c in _WINDOWS_FORBIDDEN or unicodedata.category(c)[0] == "C" else c
                   for c in text)
    text = re.sub(r"\.{2,}", ".", text).strip(" .")
    text = text.encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", errors="ignore").rstrip(" .")
    if text.split(".")[0].upper() in _WINDOWS_DEVICES:
        text = "_" + text
    return text or "image"


def save_png(image: Image.Image, outdir: str | os.PathLike, stem: str,
             parameters: str | None = None) -> Path:
    """Save `image` as a PNG in `outdir` (created if needed) without ever overwriting a file.

    The name is `<stem>.png`, or `<stem>-1.png`, `<stem>-2.png`, ... for the first free one; the stem
    goes through safe_stem(), so a prompt cannot steer the path out of outdir. `parameters` (the text
    infotext.py writes) goes into a PNG text chunk named "parameters" (tEXt, or iTXt when it is
    not Latin-1), where A1111 and other tools look for it.

    The PNG is written and fsynced to a hidden temporary file in outdir, then hard-linked to the
    chosen name: linking fails if the name exists, so two processes can never take the same name,
    and the name only ever shows a complete file. Where the filesystem has no hard links the name is
    claimed with O_EXCL and the temporary file renamed over the (empty) claim. Any failure removes
    the temporary file; nothing partial is left behind (a killed process can leave a hidden
    `.latentdiff-*.png.tmp`, never a partial `<stem>.png`).
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"save_png needs a PIL image, got {type(image).__name__}")
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"output folder {outdir} exists as a file (or under one): "
                         "choose another output folder") from None
    except PermissionError:
        raise InputError(f"cannot create output folder {outdir} (permission denied): "
                         "choose a writable output folder") from None
    temporary = _write_temporary_png(image, outdir, parameters)
    try:
        return _claim_free_name(temporary, outdir, safe_stem(stem))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The image as a PNG file, with A1111's `parameters` text chunk when given (iTXt when not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _write_temporary_png(image: Image.Image, outdir: Path, parameters: str | None) -> Path:
    temporary = outdir / f".latentdiff-{secrets.token_hex(8)}.png.tmp"
    try:
        # Mode 0o666 lets the umask decide the final permissions, like any normally created file.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except PermissionError:
        raise InputError(f"output folder {outdir} is not writable: choose another output "
                         "folder") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(png_bytes(image, parameters))
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def _claim_free_name(temporary: Path, outdir: Path, stem: str) -> Path:
    claim = _link_claim
    number = 0
    while number <= _MAX_NUMBER:
        target = outdir / (f"{stem}.png" if number == 0 else f"{stem}-{number}.png")
        try:
            claim(temporary, target)
            return target
        except FileExistsError:
            number += 1
        except OSError as e:
            if claim is _exclusive_claim or e.errno not in _NO_HARD_LINKS:
                raise
            claim = _exclusive_claim  # the same name again, without hard links
    raise InputError(f"{outdir} already holds {stem}.png through {stem}-{_MAX_NUMBER}.png: "
                     "choose another output folder or file name")


def _link_claim(temporary: Path, target: Path) -> None:
    os.link(temporary, target)  # atomic, and fails with FileExistsError when the name is taken


def _exclusive_claim(temporary: Path, target: Path) -> None:
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
