"""Inpainting and outpainting: a mask says what to repaint (white) and what to keep (black).

The method depends on the model:
- an inpainting U-Net (5 extra input channels: the mask and the masked image's latents) is shown the mask
  and the kept pixels, built as diffusers' StableDiffusionInpaintPipeline builds them (mask >= 0.5
  repainted, the masked image zero there in [-1, 1], the mask downsampled to the latents by nearest);
- any other model repaints by A1111's method: at every step the denoiser's prediction of the clean latents
  (x0) is replaced, outside the mask, by the original image's latents.
Either way the kept pixels are pasted back over the decoded image through the (blurred) mask. "Only masked"
cuts the region around the mask (plus padding, widened to the image's aspect ratio) out of the image,
repaints it at the full image size and scales it back into place. Outpainting extends the canvas with a
fill of the image's own colours and inpaints the new border.
"""

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .conditioning import Cond, concat_family
from .errors import FieldError
from .images import pil_to_tensor, resize_to
from .prompt_schedule import ScheduledText

# A1111's "Masked content" (inpainting_fill), in the order of its API numbers 0..3
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
MASK_FROM_ALPHA = "alpha"  # mask="alpha": repaint where the init image is transparent
OUTPAINT_SIDES = ("left", "right", "top", "bottom")
INPAINT_EXTRA_CHANNELS = 5  # an inpainting U-Net: latents + mask (1) + masked-image latents (4)


def masked_content(value) -> str:
    """A1111's masked content by name (case-insensitive) or API number (0 fill .. 3 latent nothing)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(MASKED_CONTENT):
        return MASKED_CONTENT[value]
    if isinstance(value, str) and value.strip().lower() in MASKED_CONTENT:
        return value.strip().lower()
    raise FieldError("inpainting_fill", f"{value!r}: choose one of {', '.join(map(repr, MASKED_CONTENT))} "
                                        f"(or 0, 1, 2, 3)")


def outpaint_margins(value) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels from a dict, a 4-tuple or the text "left:64,right:64"."""
    if isinstance(value, str):
        items = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            side, _, px = part.partition(":")
            if side.strip().lower() not in OUTPAINT_SIDES or not px.strip().isdigit():
                raise FieldError("outpaint", f"{part!r}: write SIDE:PIXELS pairs such as left:64,right:64 "
                                             f"(sides: {', '.join(OUTPAINT_SIDES)})")
            items[side.strip().lower()] = int(px)
        value = items
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(OUTPAINT_SIDES))
        if unknown:
            raise FieldError("outpaint", f"unknown side(s) {unknown}; the sides are {', '.join(OUTPAINT_SIDES)}")
        value = tuple(value.get(side, 0) for side in OUTPAINT_SIDES)
    if not isinstance(value, (tuple, list)) or len(value) != 4 or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FieldError("outpaint", f"{value!r}: give pixels per side, e.g. 'left:64,right:64' or "
                                     f"{{'left': 64, 'right': 64}}")
    if any(v < 0 or v % 8 for v in value) or not any(value):
        raise FieldError("outpaint", f"{outpaint_text(value) or 'all sides 0'}: each side takes a multiple of 8 px "
                                     f"(0 or more), and at least one side more than 0")
    return tuple(value)


def outpaint_text(margins: tuple[int, int, int, int]) -> str:
    """The margins as the flag writes them: "left:64,right:64"."""
    return ",".join(f"{side}:{px}" for side, px in zip(OUTPAINT_SIDES, margins) if px)


# -- masks ------------------------------------------------------------------------------------------

def load_mask(source, field: str = "mask") -> Image.Image:
    """A mask as an 8-bit grey image (white = repaint). A mask with transparency is read by its alpha
    (opaque = repaint), as A1111 reads the masks its editor paints; otherwise by its grey level."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        try:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except FileNotFoundError:
            raise FieldError(field, f"{source} does not exist: check the path") from None
        except IsADirectoryError:
            raise FieldError(field, f"{source} is a folder: pass a mask image file") from None
        except UnidentifiedImageError:
            raise FieldError(field, f"{source} is not an image PIL can read: pass a PNG, JPEG, WebP or BMP mask "
                                    f"(white = repaint, black = keep)") from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise FieldError(field, f"{source} cannot be read ({e}): re-export the mask") from None
    else:
        raise FieldError(field, f"must be a PIL image, a file path or {MASK_FROM_ALPHA!r}, not {type(source).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def mask_from_alpha(image) -> Image.Image:
    """The mask of an init image's transparency: fully transparent pixels repainted, partly transparent in
    proportion. An image without transparency is an error naming the field."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
            raise FieldError("init_image", f"{image} cannot be read for its alpha channel ({e})") from None
    if not (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
        raise FieldError("mask", f"{MASK_FROM_ALPHA!r} takes the mask from the init image's transparency, and the "
                                 f"init image has none ({image.mode}); pass a mask file instead")
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """A Gaussian blur of standard deviation `radius` px over a window of 2 * int(2.5 * radius + 0.5) + 1,
    the window A1111 gives OpenCV, mirrored at the borders (OpenCV's default)."""
    if radius <= 0:
        return mask
    half = int(2.5 * radius + 0.5)
    taps = torch.exp(-torch.arange(-half, half + 1, dtype=torch.float64) ** 2 / (2 * radius**2))
    taps /= taps.sum()
    x = torch.from_numpy(np.asarray(mask, dtype=np.float64))[None, None]
    for kernel in (taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)):
        along = 3 if kernel.shape[3] > 1 else 2
        pad = min(half, x.shape[along] - 1)  # mirror padding needs a pad shorter than the side
        x = F.pad(x, (pad, pad, 0, 0) if along == 3 else (0, 0, pad, pad), mode="reflect")
        if pad < half:  # a side shorter than the window: clamp beyond the mirror
            x = F.pad(x, (half - pad,) * 2 + (0, 0) if along == 3 else (0, 0) + (half - pad,) * 2, mode="replicate")
        x = F.conv2d(x, kernel)
    return Image.fromarray(x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy())


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by `padding` on each side (inside the
    image), then widened along one axis, centred and shifted back inside, to the aspect ratio width:height of
    the size it will be repainted at. None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, mask.width), min(box[3] + padding, mask.height)
    ratio = width / height  # divided by, not multiplied: the same rounding as A1111 and diffusers
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """[lo, hi) grown by `extra` (the odd pixel on the far side), moved back inside [0, size), clipped."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    shift = max(hi - size, 0) - max(-(lo - max(hi - size, 0)), 0)  # past the far edge back, then the near one
    lo, hi = lo - shift, hi - shift
    return max(lo, 0), min(hi, size)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it. Each pass takes a normalised blur
    of the kept pixels (colours weighted by how kept they are) at a smaller radius, so far holes get the
    average colour and near ones their neighbours'; kept pixels are then put back."""
    keep = 1 - torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    filled = (rgb * keep).sum((2, 3), keepdim=True) / keep.sum().clamp_min(1e-6) * torch.ones_like(rgb)
    for radius in (64, 16, 4, 1):
        weight = _box_blur(keep, radius)
        colour = _box_blur(rgb * keep, radius) / weight.clamp_min(1e-6)
        known = (weight > 1e-3).float()
        filled = colour * known + filled * (1 - known)
    out = rgb * keep + filled * (1 - keep)
    return Image.fromarray(out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def _box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    size = 2 * radius + 1
    return F.avg_pool2d(F.pad(x, (radius,) * 4, mode="replicate"), size, stride=1)


def outpaint_canvas(image: Image.Image, margins: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas, the new border filled from its colours (fill_masked), and the mask of
    that border."""
    left, right, top, bottom = margins
    size = (image.width + left + right, image.height + top + bottom)
    canvas, mask = Image.new("RGB", size), Image.new("L", size, 255)
    canvas.paste(image, (left, top))
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return fill_masked(canvas, mask), mask


# -- the prepared region ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Inpainting:
    """What one request repaints. canvas: the whole init image (RGB); image: what is sampled (the canvas, or
    the region cut out and scaled to the canvas size), with masked content "fill" applied; mask: image's
    blurred mask (L); overlay: the canvas-size mask the result is pasted back through; box: the region (None:
    the whole picture); fill: the masked content."""

    canvas: Image.Image
    image: Image.Image
    mask: Image.Image
    overlay: Image.Image
    box: tuple[int, int, int, int] | None
    fill: str

    def latent_mask(self, height: int, width: int) -> torch.Tensor:
        """(1, 1, h, w): 1 where the latents are repainted, A1111's: the blurred mask scaled down (bicubic)
        and rounded."""
        small = self.mask.resize((width, height), Image.BICUBIC)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).round()[None, None]

    def binary_mask(self) -> torch.Tensor:
        """(1, 1, H, W): the inpainting U-Net's mask, 1 where the blurred mask is >= 0.5 (diffusers' binarize)."""
        return (torch.from_numpy(np.asarray(self.mask, dtype=np.float32) / 255) >= 0.5).float()[None, None]

    def paste_back(self, generated: Image.Image) -> Image.Image:
        """The generated image (image-sized) put back into the canvas, kept pixels through the overlay mask."""
        full = generated
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            full = self.canvas.copy()
            full.paste(resize_to(generated, x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        return Image.composite(full, self.canvas, self.overlay)


def prepare(canvas: Image.Image, mask: Image.Image, *, blur: float, invert: bool, fill: str, only_masked: bool,
            padding: int, notes: list[str]) -> Inpainting:
    """The region to repaint of `canvas` under `mask` (both canvas-sized), as A1111 prepares it: invert, blur,
    then the whole picture (paste-back mask: the blurred mask doubled, so that kept pixels stay exact
    beyond the blur's inner half) or only the masked region (paste-back mask: the blurred mask)."""
    mask = ImageOps.invert(mask) if invert else mask
    low, high = mask.getextrema()
    if high == 0:
        notes.append("the mask is empty (all black): nothing is repainted and the image comes back as it was; "
                     "paint the area to change white" + (" (or leave out --invert-mask)" if invert else ""))
    elif low == 255:
        notes.append("the mask is all white: the whole image is repainted, as img2img with masked content "
                     f"{fill!r}")
    mask = blur_mask(mask, blur)
    box = crop_region(mask, padding, *canvas.size) if only_masked else None
    if box is None:
        overlay = Image.fromarray(np.minimum(np.asarray(mask, dtype=np.uint16) * 2, 255).astype(np.uint8))
        image, work_mask = canvas, mask
    else:
        overlay = mask
        image = resize_to(canvas.crop(box), *canvas.size, "resize and fill")
        work_mask = resize_to(mask.crop(box).convert("RGB"), *canvas.size, "resize and fill").convert("L")
    if fill != "original":  # A1111 fills for the latent modes too: their kept part is encoded from it
        image = fill_masked(image, work_mask)
    return Inpainting(canvas=canvas, image=image, mask=work_mask, overlay=overlay, box=box, fill=fill)


# -- sampling ---------------------------------------------------------------------------------------

class MaskedDenoiser:
    """A1111's blend: the wrapped denoiser's x0 prediction, with the original latents wherever `keep` is 1."""

    def __init__(self, denoiser, original: torch.Tensor, keep: torch.Tensor):
        self.denoiser, self.original, self.keep = denoiser, original, keep

    def __call__(self, x, sigma, **kwargs):
        return self.blend(self.denoiser(x, sigma, **kwargs))

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        return self.original * self.keep + x * (1 - self.keep)


def start_sampling(inpainting: Inpainting, latents: torch.Tensor, denoiser, extra_args: dict, *, encode,
                   fresh_noise, inpainting_unet: bool):
    """(initial latents, denoiser, extra_args, finish) for sampling `inpainting`'s image, whose encoded
    latents are `latents` (B, 4, h, w). `encode(pixels)` encodes a (1, 3, H, W) tensor in [-1, 1] to B latents
    (one posterior sample per image, after the initial noise, in diffusers' draw order); `fresh_noise()`
    draws the B images' noise from freshly seeded generators (A1111's "latent noise"); finish(x) is applied
    to the sampled latents."""
    repaint = inpainting.latent_mask(*latents.shape[2:]).to(latents.device)
    keep = 1 - repaint
    if inpainting.fill == "latent noise":
        latents = latents * keep + fresh_noise() * repaint
    elif inpainting.fill == "latent nothing":
        latents = latents * keep
    if inpainting_unet:
        binary = inpainting.binary_mask()
        masked = encode(pil_to_tensor(inpainting.image) * (binary < 0.5))
        small = F.interpolate(binary, size=latents.shape[2:]).to(masked)
        concat = torch.cat([small.expand(len(masked), -1, -1, -1), masked], dim=1)
        extra_args = extra_args | {key: _with_concat(extra_args[key], concat) for key in ("cond", "uncond")}
        return latents, denoiser, extra_args, lambda x: x
    blended = MaskedDenoiser(denoiser, latents, keep)
    return latents, blended, extra_args, blended.blend


def whole_image_conditioning(extra_args: dict, *, encode, size: tuple[int, int]) -> dict:
    """extra_args for an inpainting U-Net with nothing to keep (txt2img, or img2img without a mask), as A1111
    feeds it: the mask all 1 and the latents of an all-0 (mid-grey) masked image of `size` (height, width)."""
    masked = encode(torch.zeros(1, 3, *size))
    concat = torch.cat([torch.ones_like(masked[:, :1]), masked], dim=1)
    return extra_args | {key: _with_concat(extra_args[key], concat) for key in ("cond", "uncond")}


def _with_concat(cond: Cond | ScheduledText | None, concat: torch.Tensor) -> Cond | ScheduledText | None:
    if isinstance(cond, ScheduledText):  # prompt editing / AND: every part of every step gets them
        return cond.with_parts(concat=concat)
    return None if cond is None else dataclasses.replace(cond, concat=concat)


def check_mask_size(mask: Image.Image, size: tuple[int, int], notes: list[str]) -> Image.Image:
    """The mask at the canvas size: resized (and said) if it is another size; a mask of another aspect ratio
    is stretched, so say how much."""
    if mask.size == size:
        return mask
    stretch = abs(math.log((mask.width / mask.height) / (size[0] / size[1])))
    notes.append(f"mask resized from {mask.width}x{mask.height} to the image's {size[0]}x{size[1]}"
                 + (" (another aspect ratio: stretched)" if stretch > 0.01 else ""))
    return mask.resize(size, Image.LANCZOS)


def check_fields(request) -> None:
    """The inpainting fields of a request, checked without a model (request.validate calls this)."""
    from .request import DEFAULTS
    if request.mask is not None and request.outpaint is not None:
        raise FieldError("mask", "and outpaint both set: outpainting makes its own mask (the new border); give one")
    masked = request.mask is not None or request.outpaint is not None
    if masked and request.init_image is None:
        raise FieldError("mask" if request.mask is not None else "outpaint",
                         "needs an init image to repaint (img2img --init-image)")
    if request.mask is not None and not isinstance(request.mask, (Image.Image, str, os.PathLike)):
        raise FieldError("mask", f"must be a PIL image, a file path or {MASK_FROM_ALPHA!r}, not "
                                 f"{type(request.mask).__name__}")
    if request.outpaint is not None:
        outpaint_margins(request.outpaint)
    masked_content(request.inpainting_fill)
    for name in ("mask_blur", "inpaint_full_res_padding"):
        value = getattr(request, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 256:
            raise FieldError(name, f"must be a whole number of pixels from 0 to 256, not {value!r}")
    for name in ("inpainting_mask_invert", "inpaint_full_res"):
        if getattr(request, name) not in (0, 1):  # A1111's API sends 0/1; True/False are the same values
            raise FieldError(name, f"must be true/false (or 0/1), not {getattr(request, name)!r}")
    if not masked:
        changed = [name for name in INPAINT_FIELDS if getattr(request, name) != getattr(DEFAULTS, name)]
        if changed:
            raise FieldError(changed[0], "applies only when inpainting: give a mask (img2img --mask) or outpaint, "
                                         "or leave it out")


# request fields that only mean something with a mask (A1111's API names)
INPAINT_FIELDS = ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
                  "inpaint_full_res_padding")


def is_inpainting_unet(unet) -> bool:
    """A U-Net (its UNetConfig) that takes the mask and the masked image's latents beside the latents."""
    return unet.in_channels - unet.out_channels == INPAINT_EXTRA_CHANNELS


def check_model(request, unet) -> None:
    """A request that inpaints needs a model that can: every text-to-image U-Net (A1111's blend) and an
    inpainting U-Net (its own channels), not U-Nets conditioned on something else through extra channels."""
    family = concat_family(unet.in_channels, unet.out_channels)
    masked = request.mask is not None or request.outpaint is not None
    if masked and unet.in_channels != unet.out_channels and not is_inpainting_unet(unet):
        raise FieldError("mask" if request.mask is not None else "outpaint",
                         f"cannot be used with this checkpoint: it is {family}, which does not inpaint; use a "
                         f"text-to-image or an inpainting checkpoint")


def for_request(request, notes: list[str]) -> Inpainting | None:
    """The region a prepared request repaints (its init image and mask at their final size), or None."""
    if request.mask is None:
        return None
    return prepare(request.init_image, request.mask, blur=request.mask_blur,
                   invert=bool(request.inpainting_mask_invert), fill=masked_content(request.inpainting_fill),
                   only_masked=bool(request.inpaint_full_res), padding=request.inpaint_full_res_padding, notes=notes)


def infotext_fields(request) -> dict:
    """What A1111 records of an inpainting (infotext.INPAINT_KEYS) for a prepared request; {} without a mask."""
    if request.mask is None:
        return {}
    outpaint = request.outpaint and outpaint_text(outpaint_margins(request.outpaint))
    return dict(mask_blur=request.mask_blur, inpainting_mask_invert=bool(request.inpainting_mask_invert),
                inpainting_fill=masked_content(request.inpainting_fill),
                inpaint_full_res=bool(request.inpaint_full_res),
                inpaint_full_res_padding=request.inpaint_full_res_padding, outpaint=outpaint)

