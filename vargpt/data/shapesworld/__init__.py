"""ShapesWorld: the project's procedural dataset of coloured shapes, and the oracle that judges it.

The tiny counterpart of the paper's data (ARCHITECTURE section 3): small images of one or two flat
shapes with a caption, understanding QA pairs, ImageNet-Instruct-style generation instructions and
stage-1 class prompts, written in the project's conversation format; a held-out set of colour x shape
combinations never appears in training. :func:`read_objects` / :func:`judge` read the attributes
back from (possibly blurry, generated) pixels.

    >>> from vargpt.data.shapesworld import write_dataset
    >>> write_dataset("data/shapesworld", n_train=5000, n_test=500, seed=0)  # doctest: +SKIP
"""

from vargpt.data.shapesworld.generate import load_world, scene_records, write_dataset
from vargpt.data.shapesworld.oracle import judge, read_objects
from vargpt.data.shapesworld.world import Scene, SceneObject, World, render, sample_scene

__all__ = [
    "Scene",
    "SceneObject",
    "World",
    "judge",
    "load_world",
    "read_objects",
    "render",
    "sample_scene",
    "scene_records",
    "write_dataset",
]
