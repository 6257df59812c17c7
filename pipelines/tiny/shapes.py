"""The synthetic world the built-in tiny model is trained on: one flat shape on a flat
background, described by a caption, drawn exactly, and judged back from pixels.

    "a small red circle on a blue background, top left"

A ``Scene`` is what a caption says (shape, size, colour, background, position); ``render``
draws it (with a little seeded jitter in place and size), ``caption`` writes it, ``parse``
reads a caption back, and ``judge`` recovers colour, background and position from an image
by pixel statistics, and the shape and size by fitting the six outlines to it, so prompt
adherence can be measured, attribute by attribute, without a second model.

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


def held_out_scenes(per_triple: int = 2) -> list[Scene]:
    """Held-out scenes over every attribute: each held-out (colour, background, position)
    drawn as ``per_triple`` of the twelve (shape, size) pairs, the pairs dealt in turn so
    that each appears equally often (24 triples x 2: every pair 4 times)."""
    pairs = list(itertools.product(SHAPES, SIZES))
    return [Scene(*pairs[(per_triple * i + k) % len(pairs)], c, b, p)
            for i, (c, b, p) in enumerate(held_out()) for k in range(per_triple)]


def adherence_table(scenes: list[Scene], judgements: list["Judgement"]) -> dict[str, float]:
    """The share of images right on each attribute, on all four (``ATTRIBUTES``), and on the size."""
    rows = [j.matches(s) for s, j in zip(scenes, judgements, strict=True)]
    table = {name: sum(r[name] for r in rows) / len(rows) for name in (*ATTRIBUTES, "size")}
    table["all four"] = sum(all(r[name] for name in ATTRIBUTES) for r in rows) / len(rows)
    return table


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

ATTRIBUTES = ("shape", "colour", "background", "position")   # what adherence counts ("all four")
SIZE_THRESHOLD = 0.145   # of the side: between the largest small (0.1265) and smallest large (0.153) shape


@dataclass(frozen=True)
class Judgement:
    colour: str | None       # None: no shape found
    background: str
    position: str | None
    shape: str | None = None
    size: str | None = None
    fit: float = 0.0         # the best shape's IoU with the drawn mask

    @property
    def triple(self) -> tuple[str | None, str, str | None]:
        return self.colour, self.background, self.position

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Each attribute of ``ATTRIBUTES`` (and the size), right or not."""
        return {name: getattr(self, name) == getattr(scene, name) for name in (*ATTRIBUTES, "size")}

    def right(self, scene: Scene) -> bool:
        """All four attributes right (the size is reported, not counted)."""
        matched = self.matches(scene)
        return all(matched[name] for name in ATTRIBUTES)


_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def _nearest(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """Area and centroid (x, y) of the shape drawn at centre (0, 0) with ``r = 1``."""
    if shape == "circle":
        return math.pi, 0.0, 0.0
    points = _outline(shape, 0.0, 0.0, 1.0)
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    area /= 2
    return abs(area), cx / (6 * area), cy / (6 * area)


_GEOMETRY = {shape: _unit_geometry(shape) for shape in SHAPES}


def _shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Where ``shape`` at centre ``(cx, cy)`` and extent ``r`` covers at least half a pixel."""
    image = Image.new("L", (2 * width, 2 * height), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([2 * (cx - r), 2 * (cy - r), 2 * (cx + r), 2 * (cy + r)], fill=255)
    else:
        draw.polygon([(2 * x, 2 * y) for x, y in _outline(shape, cx, cy, r)], fill=255)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX)) >= 128


def fit_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """The outline that best covers ``mask``: (shape, IoU, extent ``r`` in pixels). Each of
    the six is placed with its centroid on the mask's and its area equal to the mask's (then
    10% larger and smaller), and scored by intersection over union."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    my, mx, area = ys.mean() + 0.5, xs.mean() + 0.5, float(mask.sum())
    best = ("", -1.0, 0.0)
    for shape, (unit_area, ox, oy) in _GEOMETRY.items():
        r0 = math.sqrt(area / unit_area)
        for r in (0.9 * r0, r0, 1.1 * r0):
            drawn = _shape_mask(shape, mx - ox * r, my - oy * r, r, height, width)
            iou = (drawn & mask).sum() / max(1, (drawn | mask).sum())
            if iou > best[1]:
                best = (shape, float(iou), r0)
    return best


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Background: the median colour of the border. Shape: the pixels far from it (at least
    0.5% of the image); its colour is their median, its position the grid cell of their
    centroid, its outline the best fitting of the six (``fit_shape``) and its size that
    outline's extent against ``SIZE_THRESHOLD``."""
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
    shape, fit, extent = fit_shape(mask)
    size = "large" if extent > SIZE_THRESHOLD * min(h, w) else "small"
    return Judgement(_nearest(np.median(pixels[mask], axis=0)), _nearest(background_rgb), POSITIONS[3 * row + column],
                     shape, size, fit)
