"""ShapesWorld scenes: the attribute vocabularies, seeded scene sampling and pixel-exact rendering.

A scene is a plain-colour background with one or two flat-coloured objects. Every object has a
shape, a colour, a size (small / large: the side of its square box) and a position (the region of the
image its box centre lies in, plus a little jitter). The class of a one-object image is
``"{colour} {shape}"``; a fixed set of colour x shape combinations is held out of the training split.

Shapes are defined as point-in-shape tests on box coordinates ``(u, v)`` in ``[-1, 1]^2`` (``v`` points
down) and rasterised at pixel centres without antialiasing, so every pixel is either exactly the
background colour or exactly an object colour. The oracle (:mod:`.oracle`) reuses :func:`shape_mask` as
its templates, so what is drawn and what is recognised are the same geometry.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
Combo = tuple[str, str]
"""A ``(colour, shape)`` pair."""

# Object colours: saturated, pairwise >= ~100 apart in RGB and >= ~100 from every background, so the
# nearest-palette colour survives blur, noise and VQ-VAE reconstruction (checked in the unit tests).
COLOURS: dict[str, RGB] = {
    "red": (215, 20, 20),
    "orange": (255, 130, 0),
    "yellow": (250, 235, 20),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (130, 40, 190),
    "pink": (240, 80, 190),
}
BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (200, 200, 200)}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross", "star", "ring", "heart")
# Box side as a fraction of the image side: 10 / 15 px at 32 px, 19 / 30 px at 64 px.
SIZES: dict[str, float] = {"small": 0.30, "large": 0.47}
# Region centres as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Two objects share an image only in edge regions: at these sizes a centre object always touches
# a neighbour.
PAIR_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
JITTER = 0.04
"""Maximum shift of a box centre from its region centre, as a fraction of the image side."""
MIN_GAP = 2
"""Background pixels that separate two objects (so connected components never merge them)."""
_MAX_LAYOUT_TRIES = 64


# --------------------------------------------------------------------------------------------------
# Shape geometry
# --------------------------------------------------------------------------------------------------


def _polygon_inside(vertices: Sequence[tuple[float, float]], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points ``(u, v)``."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, [*vertices[1:], vertices[0]], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at_v)
    return inside


def _star_vertices(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """A star with its bounding box centred and its larger side filling the box."""
    raw = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + math.pi * k / points
        raw.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*raw, strict=True)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = 2.0 / max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) * scale, (y - cy) * scale) for x, y in raw]


_STAR = _star_vertices()
_CROSS_HALF_WIDTH = 0.34  # bar width ~1/3 of the box: 4 px bars at 10 px, thick enough to survive blur
_RING_INNER = 0.52  # hole radius / outer radius; avoids exact ties with pixel centres at 10 and 15 px
_HEART_SCALE = 1.15  # maps the classic heart curve (x^2+y^2-1)^3 = x^2 y^3 onto the unit box


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = _HEART_SCALE * u, 0.15 - _HEART_SCALE * v
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": lambda u, v: np.ones(u.shape, dtype=bool),
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "triangle": lambda u, v: np.abs(u) <= (v + 1.0) / 2.0,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "cross": lambda u, v: np.minimum(np.abs(u), np.abs(v)) <= _CROSS_HALF_WIDTH,
    "star": lambda u, v: _polygon_inside(_STAR, u, v),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= _RING_INNER**2),
    "heart": _heart,
}
KNOWN_SHAPES: tuple[str, ...] = tuple(_SHAPE_TESTS)
"""Every shape :func:`shape_mask` can draw."""


@lru_cache(maxsize=1024)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` mask of ``shape`` filling a square box of ``side`` pixels.

    Pixels are tested at their centres, so the mask is exact and mirror-symmetric where the shape is.
    The returned array is cached and read-only.
    """
    if shape not in _SHAPE_TESTS:
        raise ValueError(f"unknown shape {shape!r}; known: {KNOWN_SHAPES}")
    if side <= 0:
        raise ValueError(f"side must be positive, got {side}")
    coords = (np.arange(side) + 0.5 - side / 2) / (side / 2)
    v, u = np.meshgrid(coords, coords, indexing="ij")
    mask = np.asarray(_SHAPE_TESTS[shape](u, v), dtype=bool)
    mask.flags.writeable = False
    return mask


# --------------------------------------------------------------------------------------------------
# The world: vocabularies and geometry
# --------------------------------------------------------------------------------------------------


def default_held_out(colours: Sequence[str], shapes: Sequence[str]) -> tuple[Combo, ...]:
    """One held-out shape per colour, ``shapes[(3 * i + 1) % n]`` for colour ``i``.

    With 8 colours and 8 shapes this holds out 8 of 64 combinations (12.5%), each colour and (when
    3 is coprime to the number of shapes) each shape exactly once, so every attribute value is still
    seen in training, only not in that combination.
    """
    n = len(shapes)
    return tuple((colour, shapes[(3 * i + 1) % n]) for i, colour in enumerate(colours))


@dataclass(frozen=True, kw_only=True)
class World:
    """The attribute vocabularies and geometry of ShapesWorld at one image size."""

    image_size: int = 32
    """Side of the square images, in pixels."""
    shapes: tuple[str, ...] = SHAPES
    """Object shapes, a subset of :data:`KNOWN_SHAPES`."""
    colours: Mapping[str, RGB] = field(default_factory=lambda: dict(COLOURS))
    """Object colour names and their RGB values."""
    backgrounds: Mapping[str, RGB] = field(default_factory=lambda: dict(BACKGROUNDS))
    """Background colour names and their RGB values."""
    sizes: Mapping[str, float] = field(default_factory=lambda: dict(SIZES))
    """Size names and box sides as fractions of the image side."""
    positions: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(POSITIONS))
    """Position names and region centres as fractions of (width, height)."""
    held_out: tuple[Combo, ...] | None = None
    """(colour, shape) pairs never drawn in training; ``None`` = :func:`default_held_out`."""

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"World.image_size={self.image_size}: must be >= 16")
        unknown = set(self.shapes) - set(KNOWN_SHAPES)
        if unknown:
            raise ValueError(f"World.shapes: unknown shapes {sorted(unknown)}; known: {KNOWN_SHAPES}")
        if self.held_out is None:
            object.__setattr__(self, "held_out", default_held_out(list(self.colours), self.shapes))
        object.__setattr__(self, "held_out", tuple(tuple(c) for c in self.held_out))
        bad = [c for c in self.held_out if c[0] not in self.colours or c[1] not in self.shapes]
        if bad:
            raise ValueError(f"World.held_out: combinations outside the vocabularies: {bad}")

    @property
    def class_names(self) -> list[str]:
        """All ``"{colour} {shape}"`` classes; a class id is its index here."""
        return [f"{colour} {shape}" for colour in self.colours for shape in self.shapes]

    @property
    def seen_combos(self) -> list[Combo]:
        """(colour, shape) pairs that may appear in training images."""
        held = set(self.held_out)
        return [(c, s) for c in self.colours for s in self.shapes if (c, s) not in held]

    def is_seen(self, colour: str, shape: str) -> bool:
        """Whether ``(colour, shape)`` may appear in training images."""
        return (colour, shape) not in set(self.held_out)

    def vocabularies(self) -> dict[str, set[str]]:
        """The words of each attribute: ``{"colour", "shape", "size", "position"}`` -> names."""
        return {"colour": set(self.colours), "shape": set(self.shapes), "size": set(self.sizes),
                "position": set(self.positions)}

    def class_attributes(self, name: str) -> dict[str, str]:
        """The attributes a class name states: ``"red star"`` -> ``{"colour": "red", "shape": "star"}``;
        ``"small red star left"`` adds ``"size"`` and ``"position"`` (any word order).

        Raises:
            ValueError: a word of no vocabulary, or two words of one attribute.
        """
        vocab = self.vocabularies()
        out: dict[str, str] = {}
        for word in name.split():
            kinds = [k for k, v in vocab.items() if word in v]
            if not kinds:
                raise ValueError(f"class {name!r}: {word!r} is no ShapesWorld colour, shape, size or position")
            if kinds[0] in out:
                raise ValueError(f"class {name!r} names two {kinds[0]}s ({out[kinds[0]]!r}, {word!r})")
            out[kinds[0]] = word
        return out

    def class_index(self, colour: str, shape: str) -> int:
        """Class id of ``"{colour} {shape}"``."""
        return list(self.colours).index(colour) * len(self.shapes) + self.shapes.index(shape)

    def side(self, size: str) -> int:
        """Box side in pixels of an object of ``size``."""
        return max(3, round(self.sizes[size] * self.image_size))

    def anchor(self, position: str) -> tuple[float, float]:
        """Region centre ``(x, y)`` in pixels of ``position``."""
        fx, fy = self.positions[position]
        return fx * self.image_size, fy * self.image_size

    @property
    def jitter(self) -> int:
        """Maximum centre shift in pixels."""
        return round(JITTER * self.image_size)

    def resized(self, image_size: int) -> World:
        """The same world at another image size."""
        return dataclasses.replace(self, image_size=image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the vocabularies, sizes, positions and held-out combinations)."""
        return {
            "image_size": self.image_size,
            "shapes": list(self.shapes),
            "colours": {k: list(v) for k, v in self.colours.items()},
            "backgrounds": {k: list(v) for k, v in self.backgrounds.items()},
            "sizes": dict(self.sizes),
            "side_px": {k: self.side(k) for k in self.sizes},
            "positions": {k: list(v) for k, v in self.positions.items()},
            "held_out": [list(c) for c in self.held_out],
            "classes": self.class_names,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> World:
        """Inverse of :meth:`to_dict`; ignores derived and unknown keys (e.g. ``classes``, ``seed``)."""
        return cls(
            image_size=int(data["image_size"]),
            shapes=tuple(data["shapes"]),
            colours={k: tuple(v) for k, v in data["colours"].items()},
            backgrounds={k: tuple(v) for k, v in data["backgrounds"].items()},
            sizes=dict(data["sizes"]),
            positions={k: tuple(v) for k, v in data["positions"].items()},
            held_out=tuple(tuple(c) for c in data["held_out"]),
        )


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and its square box (top-left corner ``x0, y0`` and ``side``)."""

    shape: str
    colour: str
    size: str
    position: str
    x0: int
    y0: int
    side: int

    def attributes(self) -> dict[str, str]:
        """``{"shape", "colour", "size", "position"}``, the form stored in dataset ``meta``."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A background colour name and the objects drawn on it, in drawing order."""

    background: str
    objects: tuple[SceneObject, ...]

    @property
    def class_name(self) -> str:
        """``"{colour} {shape}"`` of the first object."""
        first = self.objects[0]
        return f"{first.colour} {first.shape}"

    @property
    def layout_class_name(self) -> str:
        """``"{size} {colour} {shape} {position}"`` of the first object: every attribute a caption names."""
        first = self.objects[0]
        return f"{first.size} {first.colour} {first.shape} {first.position}"


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of ``obj`` in an image of side ``image_size`` (clipped at the border)."""
    canvas = np.zeros((image_size, image_size), dtype=bool)
    tile = shape_mask(obj.shape, obj.side)
    y0, x0 = max(obj.y0, 0), max(obj.x0, 0)
    y1, x1 = min(obj.y0 + obj.side, image_size), min(obj.x0 + obj.side, image_size)
    canvas[y0:y1, x0:x1] = tile[y0 - obj.y0 : y1 - obj.y0, x0 - obj.x0 : x1 - obj.x0]
    return canvas


def place_object(world: World, rng: random.Random, combo: Combo, size: str, position: str) -> SceneObject:
    """Put a ``combo`` object of ``size`` in the region ``position`` with a random jitter."""
    side = world.side(size)
    ax, ay = world.anchor(position)
    j = world.jitter
    top_left = []
    for centre in (ax, ay):
        start = math.floor(centre - side / 2 + 0.5) + rng.randint(-j, j)
        top_left.append(min(max(start, 0), world.image_size - side))
    colour, shape = combo
    return SceneObject(shape, colour, size, position, top_left[0], top_left[1], side)


def _separated(a: SceneObject, b: SceneObject, image_size: int) -> bool:
    """True if at least :data:`MIN_GAP` background pixels separate ``a`` and ``b``."""
    grown = np.zeros((image_size + 2 * MIN_GAP, image_size + 2 * MIN_GAP), dtype=bool)
    mask_a = object_mask(a, image_size)
    for dy in range(2 * MIN_GAP + 1):
        for dx in range(2 * MIN_GAP + 1):
            grown[dy : dy + image_size, dx : dx + image_size] |= mask_a
    grown = grown[MIN_GAP : MIN_GAP + image_size, MIN_GAP : MIN_GAP + image_size]
    return not np.any(grown & object_mask(b, image_size))


def _distinct_combo(rng: random.Random, choose: Callable[[random.Random], Combo], first: Combo) -> Combo:
    """A combo differing from ``first`` in colour *and* shape, so questions name objects uniquely."""
    for _ in range(1000):
        combo = choose(rng)
        if combo[0] != first[0] and combo[1] != first[1]:
            return combo
    raise RuntimeError(f"combo sampler never produced a partner for {first}")


def sample_scene(
    world: World, rng: random.Random, *, n_objects: int, choose_combo: Callable[[random.Random], Combo]
) -> Scene:
    """Sample a scene with ``n_objects`` (1 or 2) objects; all randomness comes from ``rng``.

    ``choose_combo(rng) -> (colour, shape)`` decides which combinations may appear (the split).
    Two objects differ in colour and in shape, sit in different edge regions and never touch.
    """
    background = rng.choice(list(world.backgrounds))
    if n_objects == 1:
        obj = place_object(world, rng, choose_combo(rng), rng.choice(list(world.sizes)),
                           rng.choice(list(world.positions)))
        return Scene(background, (obj,))
    if n_objects != 2:
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    first = choose_combo(rng)
    combos = (first, _distinct_combo(rng, choose_combo, first))
    for _ in range(_MAX_LAYOUT_TRIES):
        positions = rng.sample(PAIR_POSITIONS, 2)
        objs = tuple(place_object(world, rng, c, rng.choice(list(world.sizes)), p)
                     for c, p in zip(combos, positions, strict=True))
        if _separated(objs[0], objs[1], world.image_size):
            return Scene(background, objs)
    # Left and right small objects never touch; reached only with unusual custom worlds.
    smallest = min(world.sizes, key=world.sizes.__getitem__)
    pair = zip(combos, ("left", "right"), strict=True)
    objs = tuple(place_object(world, rng, c, smallest, p) for c, p in pair)
    return Scene(background, objs)


def render(scene: Scene, world: World) -> Image.Image:
    """Draw ``scene`` as an RGB PIL image of side ``world.image_size`` (no antialiasing)."""
    size = world.image_size
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = world.backgrounds[scene.background]
    for obj in scene.objects:
        pixels[object_mask(obj, size)] = world.colours[obj.colour]
    return Image.fromarray(pixels)
