"""Read back what a shapes image shows: background colour, shape colour, shape, size and grid cell.

Used to score generated images against the labels they were prompted with. Everything is measured, not
learnt, so the analyzer needs no training and cannot share a model's blind spots:

- background: the median of the border pixels (a shape covers little of the border), nearest named colour;
- foreground: pixels far from that background colour (after a 3x3 mean, which tames noise), keeping the
  largest 8-connected blob so specks and artefacts elsewhere do not count;
- colour: the median of the blob's quarter farthest from the background (its blurred rim mixes the two);
- shape: the shape's coverage (0 = background colour, 1 = shape colour) is resampled in a frame fixed by
  its own centroid and spread, and compared with every outline in SHAPES drawn and resampled the same way,
  sharp and blurred; the closest template (mean absolute difference) wins;
- position and size: the centre and the longest side of the half-coverage bounding box, which is how the
  dataset places shapes (a mask centroid would put a triangle lower than its box centre).
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..errors import InputError
from .shapes import COLORS, POSITIONS, SHAPES, SIZES, outline

_GRID = 24
_BLURS = (0.0, 0.05, 0.1, 0.15, 0.2)  # Gaussian sigma as a fraction of the shape's longest side
_REACH = 2.6  # standard deviations: the farthest point of any shape (a diamond's side corner) is ~2.45
_MIN_CONTRAST = 40.0  # RGB distance from the background that counts as foreground (closest colour pair: 100)

_COLOR_NAMES = tuple(COLORS)
_COLOR_TABLE = np.array([COLORS[n] for n in _COLOR_NAMES], dtype=np.float32)


def _moments(cov: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid and per-axis standard deviation of a coverage map, in pixels (pixel i spans [i, i + 1])."""
    ys, xs = np.indices(cov.shape) + 0.5
    mass = cov.sum()
    cx, cy = (cov * xs).sum() / mass, (cov * ys).sum() / mass
    return cx, cy, np.sqrt((cov * (xs - cx) ** 2).sum() / mass), np.sqrt((cov * (ys - cy) ** 2).sum() / mass)


def _normalised(cov: np.ndarray) -> np.ndarray:
    """Resample coverage on a _GRID x _GRID grid spanning +-_REACH standard deviations around the centroid.

    Moments are sums over many pixels, so this frame is sub-pixel accurate and barely moved by noise or
    blur, unlike a bounding box; per-axis scaling makes the comparison blind to aspect ratio.
    """
    cx, cy, sx, sy = _moments(cov)
    g = np.linspace(-_REACH, _REACH, _GRID)
    x, y = cx + g * sx - 0.5, cy + g * sy - 0.5  # array index space: pixel centres sit at i + 0.5
    padded = np.pad(cov, 2)  # clipped indices land in the zero border: outside the image is empty
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    xi, yi = np.clip(x0 + 2, 0, cov.shape[1] + 2), np.clip(y0 + 2, 0, cov.shape[0] + 2)

    def at(dy, dx):
        return padded[np.ix_(yi + dy, xi + dx)]

    return ((1 - fy)[:, None] * ((1 - fx) * at(0, 0) + fx * at(0, 1))
            + fy[:, None] * ((1 - fx) * at(1, 0) + fx * at(1, 1)))


def _templates(shape: str, res: int = 256) -> tuple[np.ndarray, ...]:
    """`shape`'s normalised coverage, sharp and under increasing blur (generated images are soft)."""
    pts = (outline(shape) + 2) * (res / 4)  # centred, longest side spanning half the canvas
    img = Image.new("L", (res, res), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=255)
    views = []
    for blur in _BLURS:
        view = _normalised(np.asarray(img.filter(ImageFilter.GaussianBlur(blur * res / 2)), dtype=np.float32) / 255)
        view.flags.writeable = False
        views.append(view)
    return tuple(views)


_TEMPLATES = {shape: _templates(shape) for shape in SHAPES}


def _to_rgb_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) array (uint8, or float in [0, 1]) or (3, H, W) tensor in [-1, 1] -> float32 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"analyze: tensor of shape {tuple(image.shape)}; pass one image as (3, H, W) in [-1, 1]")
        image = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"analyze: array of shape {arr.shape}; pass an RGB image as (H, W, 3)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"analyze: array dtype {arr.dtype}; use uint8 (0..255) or float (0..1)")
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise InputError(f"analyze: float array spans [{arr.min():.3g}, {arr.max():.3g}]; scale it to [0, 1]")
    return arr.astype(np.float32) * 255


def nearest_color(rgb) -> str:
    """Name of the COLORS entry closest to `rgb` (0..255) in Euclidean RGB distance."""
    return _COLOR_NAMES[int(np.argmin(((_COLOR_TABLE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def _mean3x3(a: np.ndarray) -> np.ndarray:
    """3x3 box mean over the first two axes (any channels ride along)."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask.

    Works on horizontal runs rather than pixels (a shape is a few hundred runs even at 256 px): runs on
    neighbouring rows that touch, diagonals included, are merged with a union-find.
    """
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; paired with starts in the same row-major order
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_row = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for y in range(1, mask.shape[0]):
        prev, cur = slice(first_of_row[y - 1], first_of_row[y]), slice(first_of_row[y], first_of_row[y + 1])
        # Runs in a row are sorted and disjoint, so the previous-row runs touching run i form a range.
        lo = prev.start + np.searchsorted(ends[prev], starts[cur])
        hi = prev.start + np.searchsorted(starts[prev], ends[cur], side="right")
        for i, first, last in zip(range(cur.start, cur.stop), lo, hi):
            for j in range(first, last):
                parent[root(i)] = root(j)
    roots = np.array([root(i) for i in range(len(rows))])
    sizes = np.bincount(roots, weights=ends - starts)
    out = np.zeros_like(mask)
    for i in np.nonzero(roots == sizes.argmax())[0]:
        out[rows[i], starts[i]:ends[i]] = True
    return out


def analyze(image) -> dict:
    """What `image` shows: {"background", "color", "shape", "size", "position"} as names.

    Everything but "background" is None when no shape stands out from the background.
    """
    rgb = _to_rgb_array(image)
    h, w, _ = rgb.shape
    ring = max(1, min(h, w) // 32)
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    result = {"background": nearest_color(bg), "color": None, "shape": None, "size": None, "position": None}

    # Average colours before taking distances: the mean of noisy distances stays high, that of colours does not.
    dist = np.linalg.norm(_mean3x3(rgb) - bg, axis=2)
    # A fixed threshold rather than a fraction of the peak: one vivid speck must not hide a faint shape.
    if not (dist > _MIN_CONTRAST).any():
        return result
    blob = _largest_blob(dist > _MIN_CONTRAST)

    core = blob & (dist >= np.percentile(dist[blob], 75))
    fg = np.median(rgb[core], axis=0)
    result["color"] = nearest_color(fg)

    # Coverage: each pixel's position on the background -> shape colour axis, kept near the blob.
    axis = (fg - bg) / max(float(((fg - bg) ** 2).sum()), 1e-6)
    cov = np.clip((rgb - bg) @ axis, 0, 1) * (_mean3x3(_mean3x3(blob.astype(np.float32))) > 0)
    ys, xs = np.nonzero(cov >= 0.5)  # the half-coverage line is where an edge is, blurred or not
    if len(ys) == 0:  # a blob whose median colour no pixel comes near: nothing to recognise or place
        return result
    shape_view = _normalised(cov)
    result["shape"] = min(SHAPES, key=lambda s: min(float(np.abs(shape_view - t).mean()) for t in _TEMPLATES[s]))

    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    extent = max(y1 - y0, x1 - x0) / max(h, w)
    result["size"] = min(SIZES, key=lambda s: abs(SIZES[s] - extent))
    row = min(2, int(3 * (y0 + y1) / 2 / h))
    col = min(2, int(3 * (x0 + x1) / 2 / w))
    result["position"] = POSITIONS[3 * row + col]
    return result


def score(label: dict, analysis: dict) -> dict:
    """Per-attribute agreement of an analysis with the label an image was made (or prompted) from."""
    return {key: analysis.get(key) == label[key] for key in ("background", "color", "shape", "position")}
