"""Procedural captioned shapes: one coloured shape on a plain background, with a caption that says so.

Sample i is a pure function of (seed, split, i): nothing is stored, any index can be drawn on the fly, and
two machines produce the same pixels. Attributes and their names:

- shape: one of SHAPES, drawn as a polygon normalised to its bounding box (see `outline`);
- color / background: names in COLORS, never the same for one image;
- size: SIZES gives the shape's longest side as a fraction of the image side;
- position: one of POSITIONS, the cell of a 3x3 grid that holds the centre of the shape's bounding box.

HELD_OUT lists (shape, colour) pairs that the "train" split never draws and the "heldout" split draws
exclusively, to measure whether a model composes attributes it has only seen apart. Every shape and
colour of a held-out pair still appears in training in other pairs.

Light jitter (size +-6 %, centre +-3 % of the side, colour +-10 per channel) keeps a model from memorising
pixels; it never moves a shape out of its cell or size class. Edges are anti-aliased by drawing at 4x and
box-filtering down.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import InputError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond")

# Far apart in RGB (closest pair, orange-yellow, is 100 apart) so nearest-colour analysis is unambiguous.
COLORS = {
    "red": (215, 30, 35),
    "orange": (245, 130, 20),
    "yellow": (250, 230, 40),
    "green": (40, 170, 50),
    "cyan": (40, 210, 230),
    "blue": (35, 70, 215),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

SIZES = {"small": 0.22, "medium": 0.32, "big": 0.44}

# Row-major 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

HELD_OUT = frozenset({("star", "green"), ("heart", "blue"), ("circle", "purple"), ("triangle", "orange")})

SPLITS = ("train", "heldout")

# Contrasting twins of a sample (make_sample), hard negatives for the text encoder's contrastive batches;
# "color" (the shape recoloured) is the target of an InstructPix2Pix edit (train/instruct.py).
TWINS = ("shape", "swap", "color")

_SUPERSAMPLE = 4
_MARGIN = 0.05  # gap between the shape and the image border, as a fraction of the side
_SIZE_JITTER = 0.06
_POSITION_JITTER = 0.03
_COLOR_JITTER = 10

_POSITION_PHRASES = {
    "top left": ("in the top left corner", "in the top left", "at the top left"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top right": ("in the top right corner", "in the top right", "at the top right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right"),
}


def _fit(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box on the origin and scale its longer side to span [-1, 1]."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) * (2 / (hi - lo).max())


def outline(shape: str) -> np.ndarray:
    """The polygon of `shape` as (n, 2) x, y points in [-1, 1], y pointing down as in images."""
    t = np.linspace(0, 2 * math.pi, 128, endpoint=False)
    if shape == "circle":
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    elif shape == "triangle":
        pts = np.array([(0, -1), (1, 1), (-1, 1)], dtype=float)
    elif shape == "diamond":
        pts = np.array([(0, -1), (0.75, 0), (0, 1), (-0.75, 0)], dtype=float)
    elif shape == "star":
        # Inner radius 0.45 (a regular star has 0.38): fatter points survive 64 px and blur.
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif shape == "heart":
        # The classic parametric heart curve, flipped so the point is at the bottom.
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
    elif shape == "cross":
        a = 0.3  # half the arm width
        pts = np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                        (-1, a), (-1, -a), (-a, -a)], dtype=float)
    else:
        raise InputError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    return _fit(pts)


def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    if split == "train":
        return [(s, c) for s in SHAPES for c in COLORS if (s, c) not in HELD_OUT]
    if split == "heldout":
        return sorted(HELD_OUT)
    raise InputError(f"split={split!r} is not a split: use one of {', '.join(SPLITS)}")


def _check_args(seed: int, image_size: int, split: str) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r}: the shapes dataset needs a non-negative integer seed")
    if not isinstance(image_size, int) or image_size < 16:
        raise InputError(f"image_size={image_size!r}: use an integer of at least 16 pixels (e.g. 64, 128, 256)")
    _allowed_pairs(split)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(label: dict, rng: np.random.Generator) -> str:
    """A caption for `label` in one of several phrasings; size, position and background are sometimes left out."""
    words = ([label["size"]] if rng.random() < 0.7 else []) + [label["color"], label["shape"]]
    thing = f"{_article(words[0])} {' '.join(words)}"
    where = f" {rng.choice(_POSITION_PHRASES[label['position']])}" if rng.random() < 0.7 else ""
    bg = label["background"]
    if rng.random() < 0.7:
        forms = (f"{thing}{where} on {_article(bg)} {bg} background",
                 f"{bg} background with {thing}{where}",
                 f"{_article(bg)} {bg} background with {thing}{where}",
                 f"{thing} on {bg}{where}")
    else:
        forms = (f"{thing}{where}", f"a picture of {thing}{where}", f"there is {thing}{where}")
    return str(rng.choice(forms))


def _jitter_color(name: str, rng: np.random.Generator) -> tuple[int, ...]:
    rgb = np.array(COLORS[name]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _place(cell: int, half: float, rng: np.random.Generator) -> float:
    """Centre coordinate (fraction of the side) of a shape of half-extent `half` in grid column/row `cell`."""
    lo, hi = _MARGIN + half, 1 - _MARGIN - half
    return lo + cell * (hi - lo) / 2 + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)


def render(shape: str, color: tuple, background: tuple, center: tuple[float, float], extent: float,
           image_size: int) -> Image.Image:
    """Draw one anti-aliased shape; `center` (x, y) and `extent` (longest side) are fractions of the side."""
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    pts = np.array(center) * big + outline(shape) * (extent * big / 2)
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=color)
    return img.reduce(_SUPERSAMPLE)


def make_sample(seed: int, index: int, image_size: int = 64, split: str = "train",
                twin: str | None = None) -> tuple[Image.Image, str, dict]:
    """Sample `index` of the (seed, split) stream: (RGB image, caption, label dict of attributes).

    twin="shape" or "swap" gives the sample's contrasting twin instead: the same draw (place, size, colour
    jitter, caption phrasing) with one thing changed, see `_twin_label`.
    """
    _check_args(seed, image_size, split)
    if not isinstance(index, int) or index < 0:
        raise InputError(f"index={index!r}: sample indices are non-negative integers")
    if twin not in (None, *TWINS):
        raise InputError(f"twin={twin!r}: use one of {', '.join(TWINS)}, or None for the sample itself")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    pairs = _allowed_pairs(split)
    shape, color = pairs[rng.integers(len(pairs))]
    background = str(rng.choice([c for c in COLORS if c != color]))
    size = str(rng.choice(list(SIZES)))
    cell = int(rng.integers(9))
    label = {"shape": shape, "color": color, "background": background, "size": size, "position": POSITIONS[cell]}

    extent = SIZES[size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    row, col = divmod(cell, 3)
    center = (_place(col, extent / 2, rng), _place(row, extent / 2, rng))
    fill, back = _jitter_color(color, rng), _jitter_color(background, rng)
    if twin:
        twin_rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
        label = _twin_label(label, twin, split, twin_rng)
        if label["color"] == background:
            fill, back = back, fill
        elif label["color"] != color:
            fill = _jitter_color(label["color"], twin_rng)
    image = render(label["shape"], fill, back, center, extent, image_size)
    return image, make_caption(label, rng), label


def _twin_label(label: dict, twin: str, split: str, rng: np.random.Generator) -> dict:
    """"shape": another shape, drawn by `rng`; "swap": shape colour and background exchanged ("a white
    circle on red" for "a red circle on white"), or another shape where the split does not allow the
    swapped pair; "color": another colour for the shape, never the background's. All keep the (shape,
    colour) pair inside the split."""
    allowed = set(_allowed_pairs(split))
    if twin == "color":
        colors = [c for c in COLORS if c not in (label["color"], label["background"]) and (label["shape"], c) in allowed]
        return {**label, "color": str(rng.choice(colors))}
    if twin == "swap" and (label["shape"], label["background"]) in allowed:
        return {**label, "color": label["background"], "background": label["color"]}
    others = [s for s in SHAPES if s != label["shape"] and (s, label["color"]) in allowed]
    if not others:
        raise InputError(f"the {split} split has no other shape in {label['color']}: it has no shape twins")
    return {**label, "shape": str(rng.choice(others))}


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor in [-1, 1], the range the autoencoder expects."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1


class ShapesDataset(Dataset):
    """Map-style dataset of `length` procedural samples: item i is (image (3, S, S) in [-1, 1], caption, label).

    Nothing is cached: every item is drawn from (seed, split, i) when asked for, so workers and epochs agree.
    """

    def __init__(self, seed: int = 0, *, length: int = 100_000, image_size: int = 64, split: str = "train"):
        _check_args(seed, image_size, split)
        if not isinstance(length, int) or length < 1:
            raise InputError(f"length={length!r}: the dataset needs a positive integer length")
        self.seed, self.length, self.image_size, self.split = seed, length, image_size, split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, dict]:
        if not 0 <= index < self.length:
            # IndexError, not InputError: Python's sequence protocol relies on it to end iteration.
            raise IndexError(f"index {index} is outside this ShapesDataset of length {self.length}")
        image, caption, label = make_sample(self.seed, int(index), self.image_size, self.split)
        return image_to_tensor(image), caption, label
