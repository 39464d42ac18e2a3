"""The ShapesWorld oracle: read object attributes back from pixels, and judge generated images.

Rule-based, by analysis-by-synthesis, so it needs no training and explains its decisions:

1. background = per-channel median of the border pixels (objects cover little of the border);
2. every pixel is explained as a blend ``background + alpha * (colour - background)`` of the background
   with each palette colour (how blur and antialiasing mix them); a pixel is foreground when its
   best-explaining blend has ``alpha >= 0.5``. Foreground splits into 8-connected components; specks
   smaller than :data:`MIN_AREA_FRACTION` of a small object's box are ignored; largest first;
3. colour = the palette colour whose blends explain the component's pixels best (median residual);
4. shape, size and position = the best-fitting template. The component is seen as soft coverage (its
   colour's ``alpha`` map around it, fringe included); every shape of the world is rasterised with
   :func:`~vargpt.data.shapesworld.world.shape_mask` at sides around the component's extent, sharp and
   Gaussian-blurred (:data:`TEMPLATE_BLURS`: a blurred star is compared with blurred stars, not with
   sharp circles), and slid over it. The (shape, side, blur, offset) with the highest Tanimoto
   similarity ``a.t / (a.a + t.t - a.t)`` (IoU generalised to soft masks; 1 iff equal) wins; size =
   the nearest nominal side, position = the region whose centre is nearest to the fitted box centre.

Attributes the oracle cannot read with confidence (a colour far from every palette blend, a blob no
template fits) are reported as ``"unknown"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import ndimage

from vargpt.data.shapesworld.world import MIN_GAP, World, shape_mask

UNKNOWN = "unknown"
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
MIN_AREA_FRACTION = 0.1
"""Components smaller than this fraction of a small object's box area are specks."""
MAX_COLOUR_RESIDUAL = 80.0
"""Median RGB distance of a component's pixels from the best colour's blends above which the colour
is ``"unknown"`` (noise of sigma 8 gives ~15; the closest two palette colours are ~105 apart)."""
MIN_SHAPE_SCORE = 0.7
"""Best template similarity below which the shape is ``"unknown"``. Measured on test renders: clean 1.0;
blur 0.6-1.0 + noise >= 0.93; JPEG q50 or 4x down-and-up sampling >= 0.74 (1st percentile ~0.89);
random blobs ~0.5."""
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1, 1.4)
"""Gaussian sigmas of the template variants, in pixels of a 32 px image (scaled with the image size):
from sharp to more blurred than VQ-VAE reconstructions usually are."""
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float RGB in [0, 255] from a PIL image or a uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {pixels.shape}")
    return pixels[..., :3].astype(np.float64)


def _background(pixels_HW3: np.ndarray) -> np.ndarray:
    """Per-channel median of the border pixels, shape ``(3,)``."""
    p = pixels_HW3
    return np.median(np.concatenate([p[0], p[-1], p[1:-1, 0], p[1:-1, -1]]), axis=0)


def _blend_fit(pixels_HW3: np.ndarray, background_3: np.ndarray, palette_K3: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour, the blend weight ``alpha_HWK`` in [0, 1] and the RGB distance
    ``residual_HWK`` of the pixel from ``background + alpha * (colour - background)``."""
    direction_K3 = palette_K3 - background_3
    offset_HW3 = pixels_HW3 - background_3
    norm_K = np.maximum((direction_K3**2).sum(axis=1), 1.0)
    alpha_HWK = np.clip(offset_HW3 @ direction_K3.T / norm_K, 0.0, 1.0)
    fitted_HWK3 = alpha_HWK[..., None] * direction_K3
    residual_HWK = np.linalg.norm(offset_HW3[:, :, None, :] - fitted_HWK3, axis=-1)
    return alpha_HWK, residual_HWK


def _components(foreground: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``foreground`` with ``>= min_area`` pixels,
    largest first (ties: first in raster order)."""
    labels, n = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sorted((k for k in range(1, n + 1) if areas[k] >= min_area), key=lambda k: -areas[k])
    return [labels == k for k in keep]


def _best_colour(mask: np.ndarray, residual_HWK: np.ndarray) -> tuple[int, float]:
    """Index of the palette colour whose blends best explain the pixels of ``mask``, and the median
    residual of that fit."""
    median_K = np.median(residual_HWK[mask], axis=0)
    best = int(median_K.argmin())
    return best, float(median_K[best])


def _blur_margin(blur: float) -> int:
    """Pixels a Gaussian of sigma ``blur`` visibly spreads a shape beyond its box (2 sigma)."""
    return math.ceil(2 * blur)


@lru_cache(maxsize=4096)
def _template(shape: str, side: int, blur: float) -> np.ndarray:
    """``shape_mask(shape, side)`` as coverage in [0, 1], blurred by a Gaussian of sigma ``blur``.

    The box is padded by :func:`_blur_margin` on every side so the blurred fringe is kept.
    """
    margin = _blur_margin(blur)
    coverage = np.pad(shape_mask(shape, side), margin).astype(np.float64)
    if blur > 0:
        coverage = ndimage.gaussian_filter(coverage, blur, mode="constant")
    return coverage


class _TemplateBank(NamedTuple):
    """Templates of every (side, shape, blur), each centred in a ``(T, T)`` canvas."""

    canvas_NTT: np.ndarray
    energy_N: np.ndarray
    """Sum of squares of each template (its self-overlap)."""
    keys: list[tuple[str, int]]
    """(shape, side) of each template."""
    offsets: list[int]
    """Top-left corner of each template's (unpadded) box inside the canvas."""


@lru_cache(maxsize=256)
def _template_bank(shapes: tuple[str, ...], sides: tuple[int, ...], blurs: tuple[float, ...]
                   ) -> _TemplateBank:
    """All templates for one fit, stacked so that they are scored with one matrix product."""
    size = max(sides) + 2 * max(_blur_margin(b) for b in blurs)
    canvases, keys, offsets = [], [], []
    for side in sides:
        offset = (size - side) // 2
        for shape in shapes:
            for blur in blurs:
                margin = _blur_margin(blur)
                canvas = np.zeros((size, size), dtype=np.float32)
                start, stop = offset - margin, offset + side + margin
                canvas[start:stop, start:stop] = _template(shape, side, blur)
                canvases.append(canvas)
                keys.append((shape, side))
                offsets.append(offset)
    canvas_NTT = np.stack(canvases)
    canvas_NTT.flags.writeable = False
    return _TemplateBank(canvas_NTT, (canvas_NTT**2).sum(axis=(1, 2)), keys, offsets)


def _search_window(mask: np.ndarray, coverage: np.ndarray, size: int, slack: int
                   ) -> tuple[np.ndarray, int, int]:
    """Float32 crop of ``coverage`` of side ``size + 2 * slack`` centred on ``mask``'s bounding box.

    Returns ``(window, top, left)``; ``top``/``left`` locate the window in image coordinates (it may
    stick out of the image; those pixels are zero).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    side = size + 2 * slack
    top = int((rows[0] + rows[-1] + 1 - side) // 2)
    left = int((cols[0] + cols[-1] + 1 - side) // 2)
    pad = side
    window = np.pad(coverage, pad)[top + pad : top + pad + side, left + pad : left + pad + side]
    return window.astype(np.float32), top, left


def _extent(mask: np.ndarray) -> int:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


def _fit_template(mask: np.ndarray, coverage: np.ndarray, world: World
                  ) -> tuple[str, int, float, float, float]:
    """Best-fitting ``(shape, side, centre_x, centre_y, score)`` for an object.

    ``mask`` ``(H, W)`` is the object's component, ``coverage`` ``(H, W)`` its soft coverage. Sides
    range from a little below the mask's extent to well above it (the 0.5 cut shrinks blurred
    shapes); templates slide up to ``slack`` pixels from centre alignment. All templates are scored
    at all placements with one matrix product.
    """
    extent = _extent(mask)
    sides = tuple(range(max(3, round(0.85 * extent) - 1), round(1.3 * extent) + 3))
    scale = world.image_size / 32  # TEMPLATE_BLURS are in pixels of a 32 px image
    bank = _template_bank(tuple(world.shapes), sides, tuple(b * scale for b in TEMPLATE_BLURS))
    size, slack = bank.canvas_NTT.shape[1], 3 + extent // 10
    window, top, left = _search_window(mask, coverage, size, slack)
    views_PQTT = sliding_window_view(window, (size, size))
    n_places = views_PQTT.shape[0] * views_PQTT.shape[1]
    inter_XN = views_PQTT.reshape(n_places, -1) @ bank.canvas_NTT.reshape(len(bank.keys), -1).T
    score_XN = inter_XN / (float((window**2).sum()) + bank.energy_N - inter_XN)
    place, n = np.unravel_index(int(score_XN.argmax()), score_XN.shape)
    py, px = divmod(int(place), views_PQTT.shape[1])
    shape, side = bank.keys[n]
    x0, y0 = left + px + bank.offsets[n], top + py + bank.offsets[n]
    return shape, side, x0 + side / 2, y0 + side / 2, float(score_XN[place, n])


def _nearest_name(value: float | tuple[float, float], table: Mapping[str, Any]) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(np.subtract(table[k], value))))


def _read_component(mask: np.ndarray, alpha_HWK: np.ndarray, residual_HWK: np.ndarray, world: World
                    ) -> dict[str, str]:
    """Attributes of the object covering ``mask`` ``(H, W)``."""
    colour_index, residual = _best_colour(mask, residual_HWK)
    # Soft coverage of this colour around the object: keeps the blurred fringe (alpha < 0.5) that the
    # mask cut off, and nothing of other objects (>= MIN_GAP background pixels away).
    near = ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=MIN_GAP)
    coverage = alpha_HWK[..., colour_index] * near
    shape, side, cx, cy, score = _fit_template(mask, coverage, world)
    sides = {size: world.side(size) for size in world.sizes}
    anchors = {pos: world.anchor(pos) for pos in world.positions}
    return {
        "shape": shape if score >= MIN_SHAPE_SCORE else UNKNOWN,
        "colour": list(world.colours)[colour_index] if residual <= MAX_COLOUR_RESIDUAL else UNKNOWN,
        "size": _nearest_name(side, sides),
        "position": _nearest_name((cx, cy), anchors),
    }


def read_objects(image: Image.Image | np.ndarray, world: World | None = None) -> list[dict[str, str]]:
    """Read the objects of a ShapesWorld-like image, largest first.

    Args:
        image: a PIL image or a ``(H, W, 3)`` uint8 array with ``H == W``; any size (the world's
            geometry is rescaled to it).
        world: vocabularies and geometry (default :class:`World`); see ``generate.load_world``.

    Returns:
        One ``{"shape", "colour", "size", "position"}`` dict per object (the format of a dataset
        record's ``meta["objects"]``); unreadable attributes are ``"unknown"``.
    """
    pixels_HW3 = _as_pixels(image)
    world = (world or World()).resized(pixels_HW3.shape[0])
    background = _background(pixels_HW3)
    palette_K3 = np.array(list(world.colours.values()), dtype=np.float64)
    alpha_HWK, residual_HWK = _blend_fit(pixels_HW3, background, palette_K3)
    best_HW = residual_HWK.argmin(axis=-1)
    foreground = np.take_along_axis(alpha_HWK, best_HW[..., None], axis=-1)[..., 0] >= 0.5
    small = min(world.side(size) for size in world.sizes)
    min_area = max(4, round(MIN_AREA_FRACTION * small * small))
    return [_read_component(m, alpha_HWK, residual_HWK, world) for m in _components(foreground, min_area)]


def judge(
    image: Image.Image | np.ndarray, expected: Mapping[str, str], world: World | None = None
) -> dict[str, bool]:
    """Whether the main (largest) object of ``image`` has the ``expected`` attributes.

    Args:
        image: see :func:`read_objects`.
        expected: any of ``shape``, ``colour``, ``size``, ``position`` (e.g. ``meta["objects"][0]``).
        world: see :func:`read_objects`.

    Returns:
        ``{"colour", "shape", "colour+shape", "position", "size"}`` -> bool, for the attributes present
        in ``expected`` (``colour+shape`` when both are); all ``False`` when no object is found.
    """
    objects = read_objects(image, world)
    main = objects[0] if objects else {}
    result: dict[str, bool] = {}
    for key in ("colour", "shape"):
        if key in expected:
            result[key] = main.get(key) == expected[key]
    if "colour" in expected and "shape" in expected:
        result["colour+shape"] = result["colour"] and result["shape"]
    for key in ("position", "size"):
        if key in expected:
            result[key] = main.get(key) == expected[key]
    return result
