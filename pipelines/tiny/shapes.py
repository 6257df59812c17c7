"""The synthetic world the built-in tiny model is trained on: one flat shape on a flat
background, described by a caption, drawn exactly, and judged back from pixels.

    "a small red circle on a blue background, top left"

A ``Scene`` is what a caption says (shape, size, colour, background, position); ``render``
draws it (with a little seeded jitter in place and size), ``caption`` writes it, ``parse``
reads a caption back, and ``judge`` recovers colour, background and position from an image
by pixel statistics, so prompt adherence can be measured without a second model.

A fixed set of (colour, background, position) combinations is never shown in training
(``held_out``): the adherence test asks the model for those, so it must compose what it
learned rather than recall an image it saw.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # the model's native resolution, pixels

# Colours far apart in RGB, so the nearest-palette judge cannot confuse them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 230, 30), "green": (30, 170, 50),
    "blue": (30, 70, 230), "purple": (150, 50, 200), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.11, "large": 0.18}  # half the shape's extent, as a fraction of the side
# Grid cells, row by row; the caption names them as people do ("top", not "top center").
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

HELD_OUT_SEED = 2026
HELD_OUT_COUNT = 24


@dataclass(frozen=True)
class Scene:
    shape: str
    size: str
    colour: str
    background: str
    position: str

    @property
    def triple(self) -> tuple[str, str, str]:
        """What adherence is judged on: shape colour, background colour, position."""
        return self.colour, self.background, self.position


def caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.shape} on a {scene.background} background, {scene.position}"


_CAPTION = re.compile(r"a (\w+) (\w+) (\w+) on a (\w+) background, ([\w ]+)")


def parse(text: str) -> Scene:
    """The scene a caption of ``caption``'s form describes; ValueError for anything else."""
    match = _CAPTION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"not a caption of the form {caption(example_scene())!r}: {text!r}")
    scene = Scene(match[3], match[1], match[2], match[4], match[5])
    if (scene.shape not in SHAPES or scene.size not in SIZES or scene.colour not in COLOURS
            or scene.background not in COLOURS or scene.position not in POSITIONS):
        raise ValueError(f"unknown shape, size, colour or position in {text!r}")
    return scene


def example_scene() -> Scene:
    return Scene("circle", "small", "red", "blue", "top left")


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, b, p) for c, b, p in itertools.product(COLOURS, COLOURS, POSITIONS) if c != b]


def held_out() -> list[tuple[str, str, str]]:
    """Combinations of colour, background and position never shown in training: every
    colour appears as shape and as background, and every position, at least twice."""
    rng = random.Random(HELD_OUT_SEED)
    triples = all_triples()
    while True:
        chosen = rng.sample(triples, HELD_OUT_COUNT)
        counts = [sum(t[i] == v for t in chosen) for i, values in ((0, COLOURS), (1, COLOURS), (2, POSITIONS))
                  for v in values]
        if min(counts) >= 2:
            return sorted(chosen)


def training_scenes() -> list[Scene]:
    """Every scene whose triple is not held out (6 shapes x 2 sizes x 480 triples)."""
    hidden = set(held_out())
    return [Scene(shape, size, c, b, p) for (c, b, p) in all_triples() if (c, b, p) not in hidden
            for shape in SHAPES for size in SIZES]


def _cell_centre(position: str, size: int) -> tuple[float, float]:
    row, column = divmod(POSITIONS.index(position), 3)
    # Cell centres pulled in from the edges so a large shape stays inside the image.
    spots = (0.2 * size, 0.5 * size, 0.8 * size)
    return spots[column], spots[row]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def polygon(points):
        return [(cx + r * x, cy + r * y) for x, y in points]
    if shape == "square":
        return polygon([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)])
    if shape == "triangle":
        return polygon([(0, -1), (0.95, 0.75), (-0.95, 0.75)])
    if shape == "diamond":
        return polygon([(0, -1), (0.8, 0), (0, 1), (-0.8, 0)])
    if shape == "cross":
        a, b = 0.3, 1.0
        return polygon([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                        (-b, -a), (-a, -a)])
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """Draw ``scene`` at ``size`` pixels; ``rng`` jitters the place (up to 6% of the side) and
    the size (up to 15%), as a data set needs. Drawn at twice the size and reduced, so edges
    are smooth."""
    big = 2 * size
    jitter = rng or random.Random(0)
    cx, cy = _cell_centre(scene.position, big)
    if rng is not None:
        cx += jitter.uniform(-0.06, 0.06) * big
        cy += jitter.uniform(-0.06, 0.06) * big
    r = SIZES[scene.size] * big * (jitter.uniform(0.85, 1.15) if rng is not None else 1.0)
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[scene.colour])
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r), fill=COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


# -- judging an image by its pixels --------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    colour: str | None       # None: no shape found
    background: str
    position: str | None

    @property
    def triple(self) -> tuple[str | None, str, str | None]:
        return self.colour, self.background, self.position


_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def _nearest(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Background: the median colour of the border. Shape: the pixels far from it (at least
    0.5% of the image); its colour is their median, its position the grid cell of their centroid."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    pixels = pixels[..., :3]
    h, w = pixels.shape[:2]
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                             pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1))
    mask = distance > 80
    if mask.sum() < 0.005 * h * w:
        return Judgement(None, _nearest(background_rgb), None)
    ys, xs = np.nonzero(mask)
    column = min(2, int(3 * xs.mean() / w))
    row = min(2, int(3 * ys.mean() / h))
    return Judgement(_nearest(np.median(pixels[mask], axis=0)), _nearest(background_rgb), POSITIONS[3 * row + column])
