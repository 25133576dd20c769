"""The instance images of a personalisation run: a folder of pictures of the concept, with their captions.

- Images: every file in the folder (not its subfolders) whose suffix is in IMAGE_SUFFIXES, in sorted
  order, read upright as RGB (images.load_image: EXIF orientation, transparency over white). An image
  that is not `resolution` x `resolution` is scaled so its shorter side is `resolution` px and the centre
  cropped square (A1111's "crop and resize", the Resize + CenterCrop of diffusers' training scripts).
- Captions: `NAME.txt` beside `NAME.png` holds the image's caption ("[filewords]"); a template (A1111's
  convention) builds the caption from it: "[name]" becomes the method's token (the embedding's trigger
  word, DreamBooth's "identifier class", a LoRA's trigger) and "[filewords]" the .txt text. Without a
  template: "[filewords]" where .txt files exist, else "a photo of [name]" (Gal et al.'s first template).
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..clip import Tokenizer
from ..errors import InputError
from ..images import load_image, resize_to
from .shapes import image_to_tensor

log = logging.getLogger("latentdiff")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATE = "a photo of [name]"
# CLIP's BPE ids are merge ranks: the lower, the more common the word was in CLIP's training text. The
# rare tokens the DreamBooth community uses as identifiers ("sks" 48136, "ohwx" 47993) lie above this.
COMMON_WORD_BELOW = 40000


@dataclass(frozen=True)
class Example:
    path: Path
    image: torch.Tensor  # (3, resolution, resolution) in [-1, 1]
    caption: str


def read_examples(folder, *, resolution: int, token: str, template: str | None = None,
                  require_token: bool = True) -> list[Example]:
    """The folder's images and captions (see the module docstring). `require_token`: every caption must
    contain `token` as a word of its own, as prompts.find_triggers finds trigger words (textual inversion
    and DreamBooth learn it from those captions)."""
    folder = Path(folder).expanduser()
    files = image_files(folder)
    examples, resized = [], []
    for path in files:
        image = load_image(path)  # InputError naming the file for anything unreadable
        if image.size != (resolution, resolution):
            resized.append(f"{path.name} {image.width}x{image.height}")
            image = resize_to(image, resolution, resolution, "crop and resize")
        caption = _caption(path, template, token)
        if require_token and not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", caption, re.I):
            raise InputError(f"{path}: its caption {caption!r} does not contain {token!r}; put [name] in its .txt "
                             "caption or in the template (--template)")
        examples.append(Example(path, image_to_tensor(image), caption))
    if resized:
        log.info("%d of %d images are not %dx%d (%s): each is scaled to %d px on its shorter side and centre-"
                 "cropped", len(resized), len(files), resolution, resolution, ", ".join(resized[:3]), resolution)
    return examples


def image_files(folder: Path) -> list[Path]:
    """The image files of the folder, sorted; InputError if it is no folder or holds none."""
    if not folder.is_dir():
        raise InputError(f"images: {folder} is not a folder; pass the folder that holds the concept's pictures")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the pictures of "
                         "the concept there (3-20 are usual)")
    return files


def _caption(path: Path, template: str | None, token: str) -> str:
    text_file = path.with_suffix(".txt")
    try:
        words = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{text_file}: cannot read the caption ({e}); save it as UTF-8 text") from None
    template = template or ("[filewords]" if words is not None else DEFAULT_TEMPLATE)
    if "[filewords]" in template and words is None:
        raise InputError(f"{path}: the caption template {template!r} uses [filewords] but {text_file.name} does not "
                         "exist; write the image's caption there, or use a template without [filewords]")
    return " ".join(template.replace("[filewords]", words or "").replace("[name]", token).split())


def common_word_warning(tokenizer: Tokenizer, token: str) -> str | None:
    """A warning if `token` is a common word of the text encoder's vocabulary (one whole-word BPE token among
    the COMMON_WORD_BELOW commonest): prompts that use the word in its ordinary sense would get the concept."""
    ids = tokenizer.token_ids([token])[0]
    if len(ids) == 1 and ids[0] < COMMON_WORD_BELOW and tokenizer.bpe.convert_ids_to_tokens(ids[0]).endswith("</w>"):
        return (f"the token {token!r} is a common word; every prompt that uses it will get the trained concept. "
                "A made-up word (e.g. '<my-cat>') or a rare token ('sks') keeps the word's meaning")
    return None
