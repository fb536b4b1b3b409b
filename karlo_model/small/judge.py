"""Reading a picture of the synthetic world (karlo_model.small.world) back into words, against the renderer's own
palette and shape outlines: the background, the dominant shape colour and the dominant shape kind.

The background is the median colour of the image border; foreground pixels are those far from it. Each foreground
pixel takes the nearest palette colour; connected foreground regions are matched against each shape's outline
fitted to the region's bounding box (intersection over union), and the image's shape is the area-weighted vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, SHAPES, shape_polygon

JUDGE_SIZE = 128  # images are judged at this size: fine enough for the outlines, fast to label
FOREGROUND_DISTANCE = 70.0  # RGB distance from the background above which a pixel is foreground
MIN_REGION = 0.002  # regions smaller than this fraction of the image are specks, not shapes

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
_BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    background: str  # nearest named background to the border colour
    colour: str | None  # dominant foreground palette colour; None without foreground
    shape: str | None  # area-weighted shape vote of the regions; None without any
    colour_fractions: dict[str, float]  # fraction of the image's pixels nearest each palette colour (foreground)
    regions: int


def _resized(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (JUDGE_SIZE, JUDGE_SIZE):
        return image.astype(np.float32)
    pil = Image.fromarray(image).resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def _split(x: np.ndarray) -> tuple[str, np.ndarray]:
    """(S, S, 3) float -> (the background's name, (S, S) bool foreground)."""
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, axis=0)
    bg_name = list(BACKGROUNDS)[int(np.argmin(np.linalg.norm(_BACKGROUND_PALETTE - background, axis=1)))]
    return bg_name, np.linalg.norm(x - background, axis=-1) > FOREGROUND_DISTANCE


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (JUDGE_SIZE, JUDGE_SIZE) bool: where the shapes are (the layout)."""
    return _split(_resized(image))[1]


def read(image: np.ndarray) -> Reading:
    """(H, W, 3) uint8 RGB -> what it shows."""
    x = _resized(image)  # (S, S, 3)
    bg_name, fg = _split(x)  # fg: (S, S) bool
    nearest = np.argmin(np.linalg.norm(x[..., None, :] - _PALETTE, axis=-1), axis=-1)  # (S, S)
    counts = np.bincount(nearest[fg], minlength=len(_PALETTE))
    fractions = {name: float(c) / fg.size for name, c in zip(COLOURS, counts)}
    colour = list(COLOURS)[int(np.argmax(counts))] if counts.sum() >= MIN_REGION * fg.size else None
    votes = dict.fromkeys(SHAPES, 0.0)
    labels = label_regions(fg)
    n_regions = 0
    for region in range(1, int(labels.max()) + 1):
        mask = labels == region
        area = int(mask.sum())
        if area < MIN_REGION * mask.size:
            continue
        n_regions += 1
        scores = shape_scores(mask)
        votes[max(scores, key=scores.get)] += area
    shape = max(votes, key=votes.get) if n_regions else None
    return Reading(bg_name, colour, shape, fractions, n_regions)


def label_regions(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean (H, W) mask: 0 off the mask, 1..n on it (numbered by first pixel)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # each pass spreads the smallest index one pixel; converges in about a region's diameter
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, np.minimum(labels, neighbours), big)
        if np.array_equal(new, labels):
            break
        labels = new
    roots = np.unique(labels[mask])
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of a region with each shape's outline stretched over the region's bounding box."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    region = mask[top:bottom, left:right]
    h, w = region.shape
    scores = {}
    for shape in SHAPES:
        template = _template(shape, h, w)
        union = np.logical_or(region, template).sum()
        scores[shape] = float(np.logical_and(region, template).sum() / max(union, 1))
    return scores


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """(h, w) bool: the shape's outline at unit radius, mapped onto an h x w box."""
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    polygon = shape_polygon(shape, 0.0, 0.0, 1.0)
    if polygon is None:
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    else:
        xs, ys = zip(*polygon)
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        draw.polygon([((x - x0) / (x1 - x0) * (w - 1), (y - y0) / (y1 - y0) * (h - 1)) for x, y in polygon], fill=255)
    return np.asarray(image) > 0
