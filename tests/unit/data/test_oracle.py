"""The ShapesWorld oracle reads attributes back from clean and degraded held-out renders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vargpt.data.shapesworld.generate import sample_split_scene
from vargpt.data.shapesworld.oracle import UNKNOWN, judge, read_objects
from vargpt.data.shapesworld.world import Scene, SceneObject, World, render

ATTRS = ("shape", "colour", "size", "position")
N_IMAGES = 320


def _blur_and_noise(image: Image.Image, index: int, radius: float = 0.6, sigma: float = 8.0) -> np.ndarray:
    """What a VQ-VAE reconstruction looks like: slightly blurred, slightly noisy."""
    rng = np.random.default_rng(index)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(np.round(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, 255).astype(np.uint8)


def _accuracy(world: World, degrade=None, n_images: int = N_IMAGES) -> dict[str, float]:
    """Per-attribute accuracy over every object of ``n_images`` test-split scenes (seed 11)."""
    hits = dict.fromkeys((*ATTRS, "colour+shape", "count"), 0)
    n_objects = 0
    for index in range(n_images):
        scene, _ = sample_split_scene(world, "test", 11, index)
        image = render(scene, world)
        found = read_objects(degrade(image, index) if degrade else image, world)
        hits["count"] += len(found) == len(scene.objects)
        for obj in scene.objects:
            truth = obj.attributes()
            best = max(found, key=lambda f: sum(f[k] == truth[k] for k in ATTRS), default={})
            for key in ATTRS:
                hits[key] += best.get(key) == truth[key]
            hits["colour+shape"] += best.get("colour") == obj.colour and best.get("shape") == obj.shape
            n_objects += 1
    return {k: v / (n_images if k == "count" else n_objects) for k, v in hits.items()}


@pytest.fixture(scope="module")
def world() -> World:
    return World(image_size=32)


def test_clean_renders_are_read_exactly(world):
    accuracy = _accuracy(world)
    print("oracle accuracy, clean held-out renders:", accuracy)
    assert accuracy["colour+shape"] >= 0.99
    assert min(accuracy.values()) >= 0.99


def test_blurred_noisy_renders(world):
    accuracy = _accuracy(world, _blur_and_noise)
    print("oracle accuracy, blur 0.6 + noise 8:", accuracy)
    assert accuracy["colour+shape"] >= 0.95
    assert min(accuracy.values()) >= 0.95


def test_64px_blurred(world):
    big = world.resized(64)
    accuracy = _accuracy(big, lambda im, i: _blur_and_noise(im, i, radius=1.2), n_images=80)
    assert accuracy["colour+shape"] >= 0.95


def test_judge_main_object(world):
    scene = Scene("gray", (SceneObject("heart", "purple", "large", "right", 17, 9, 15),))
    image = _blur_and_noise(render(scene, world), 0)
    truth = scene.objects[0].attributes()
    assert judge(image, truth, world) == {"colour": True, "shape": True, "colour+shape": True,
                                          "position": True, "size": True}
    wrong = judge(image, {**truth, "colour": "pink", "size": "small"})
    assert wrong == {"colour": False, "shape": True, "colour+shape": False, "position": True, "size": False}
    assert judge(image, {"shape": "heart"}) == {"shape": True}


def test_empty_and_off_palette_images(world):
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert read_objects(blank) == []
    assert judge(blank, {"colour": "red", "shape": "circle"}) == dict.fromkeys(
        ("colour", "shape", "colour+shape"), False)
    speckled = blank.copy()
    speckled[5, 5] = speckled[20, 7] = (215, 20, 20)
    assert read_objects(speckled) == []
    brown = Scene("white", (SceneObject("square", "red", "large", "center", 9, 9, 15),))
    pixels = np.asarray(render(brown, world)).copy()
    pixels[pixels[..., 1] == 20] = (120, 110, 30)  # olive: far from every palette colour
    assert read_objects(pixels)[0]["colour"] == UNKNOWN


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        read_objects(np.zeros((32, 16, 3), dtype=np.uint8))
