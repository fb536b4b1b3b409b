"""A synthetic world with exact ground truth: flat-coloured shapes on plain backgrounds, and captions from a small
grammar that describe them ("two small yellow stars on a dark blue background").

A scene holds one to three shapes of one kind, colour and size on one background. Its caption names every attribute
or, in training, any subset of them (an omitted shape becomes "shapes"), so that short prompts such as
"red shapes" mean something to the model, as negative prompts need.

Some (colour, shape, background) triples never appear in training (``HELD_OUT``): evaluation captions use only
those, so a model is judged on combinations it has not seen, each of whose pairs it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 90, 230),
    "purple": (140, 50, 200),
    "pink": (250, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "dark blue": (15, 25, 80),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.1, "large": 0.16}  # shape radius as a fraction of the image side
COUNT_WORDS = ("a", "two", "three")
SIZE_JITTER = 0.08  # radii vary by up to this fraction, so that size words name a range

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


def _held_out() -> frozenset[tuple[str, str, str]]:
    """16 of the 128 (colour, shape, background) triples: c + 2s + 3b = 0 (mod 8) over the name indices. Every
    (shape, background) pair loses exactly one colour and every other pair at most one of its completions, so each
    pair of attributes is still seen in training."""
    return frozenset(
        (c, s, b)
        for i, c in enumerate(COLOUR_NAMES)
        for j, s in enumerate(SHAPES)
        for k, b in enumerate(BACKGROUND_NAMES)
        if (i + 2 * j + 3 * k) % 8 == 0
    )


HELD_OUT = _held_out()


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    count: int
    centres: tuple[tuple[float, float], ...]  # in [0, 1] image coordinates (x right, y down)
    radius: float  # fraction of the image side

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)

    def caption(self, keep: frozenset[str] = frozenset({"count", "size", "colour", "shape", "background"})) -> str:
        """The scene in words, naming only the attributes in ``keep`` (the shape noun becomes "shape" without it;
        without the count there is no article and the noun is plural)."""
        noun = self.shape if "shape" in keep else "shape"
        words = []
        if "count" in keep:
            words.append(COUNT_WORDS[self.count - 1])
            plural = self.count > 1
        else:
            plural = True
        if "size" in keep:
            words.append(self.size)
        if "colour" in keep:
            words.append(self.colour)
        words.append(noun + ("s" if plural else ""))
        if "background" in keep:
            words.append(f"on a {self.background} background")
        return " ".join(words)


ATTRIBUTES = ("count", "size", "colour", "shape", "background")


def partial_caption(scene: Scene, rng: np.random.Generator, keep_probability: float = 0.75) -> str:
    """A training caption: each attribute named with ``keep_probability``."""
    keep = frozenset(a for a in ATTRIBUTES if rng.random() < keep_probability)
    return scene.caption(keep)


def sample_scene(
    rng: np.random.Generator, *, held_out: bool = False, triple: tuple[str, str, str] | None = None,
    size: str | None = None, count: int | None = None,
) -> Scene:
    """A random scene from the training triples (or the held-out ones), with non-overlapping shapes."""
    if triple is None:
        pool = sorted(HELD_OUT) if held_out else [
            (c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUND_NAMES if (c, s, b) not in HELD_OUT]
        triple = pool[rng.integers(len(pool))]
    size = size or ("small", "large")[rng.integers(2)]
    count = count or int(rng.integers(1, 4))
    radius = SIZES[size] * (1 + SIZE_JITTER * (2 * rng.random() - 1))
    return Scene(*triple, size, count, _place(rng, count, radius), radius)


def _place(rng: np.random.Generator, count: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Centres of ``count`` shapes of ``radius`` inside the image (1.25 radii from the edges, which holds a star's
    tips) and 2.5 radii apart, so that no two touch: rejection sampling, restarting until every shape fits."""
    lo, hi = 1.25 * radius, 1 - 1.25 * radius
    for _ in range(1000):
        centres: list[tuple[float, float]] = []
        for _ in range(200):
            x, y = lo + (hi - lo) * rng.random(), lo + (hi - lo) * rng.random()
            if all(math.hypot(x - a, y - b) > 2.5 * radius for a, b in centres):
                centres.append((x, y))
                if len(centres) == count:
                    return tuple(centres)
    raise ValueError(f"cannot place {count} shapes of radius {radius:.3f} apart in the image")


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape of radius ``r`` at (cx, cy) in pixels; None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.2 * r
        return [(cx + R * math.cos(a), cy + 0.15 * r + R * math.sin(a)) for a in map(math.radians, (-90, 30, 150))]
    if shape == "star":
        points = []
        for i in range(10):
            radius = 1.25 * r if i % 2 == 0 else 0.55 * r
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), cy + 0.1 * r + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene, size: int = 256) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 RGB image."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for x, y in scene.centres:
        draw_shape(draw, scene.shape, x * size, y * size, scene.radius * size, COLOURS[scene.colour])
    return np.asarray(image)


def evaluation_scenes(n: int = 100, seed: int = 1234) -> list[Scene]:
    """``n`` scenes of held-out triples (each triple in turn, random sizes, counts and places): the evaluation set."""
    rng = np.random.default_rng(seed)
    triples = sorted(HELD_OUT)
    return [sample_scene(rng, triple=triples[i % len(triples)]) for i in range(n)]
