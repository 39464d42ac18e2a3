"""Write a ShapesWorld dataset folder in the project's conversation format.

Layout of ``out_dir``::

    world.json            vocabularies, image size, seed, held-out combinations, classes, counts
    train.jsonl           one record per line (below)
    test.jsonl
    images/train/000000.png ...
    images/test/000000.png ...

A record is ``{"messages": [{"role", "content"}, ...], "images": [relative paths], "class": str
(one-object images only: ``"{colour} {shape}"``; with ``layout_classes`` the two generation records'
class is ``"{size} {colour} {shape} {position}"``, the image the decoder is to draw),
"meta": {"task", "qtype" (qa only), "objects", "background", "combo_seen"}}``. ``<image>`` in a user turn
is an input image, ``<image_gen>`` in an assistant turn an image to generate; ``images`` lists them in
order of appearance. Every image backs several records: a caption (objects in reading order of their
regions: top, left, centre, right, bottom), one question per QA type (with ``binding_questions``, in the
train split of two-object images one per QA type and object) and, for one-object images, a caption-based
generation instruction and a stage-1 class prompt.

Each image draws from its own ``random.Random`` seeded by ``(seed, split, index)``, so the output is
byte-identical for a seed and the first ``n`` images do not depend on how many are written.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vargpt.data.shapesworld import text
from vargpt.data.shapesworld.world import Combo, Scene, World, render, sample_scene
from vargpt.special_tokens import IMAGE

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
ONE_OBJECT_RATE = 0.6
"""Share of one-object images (the only ones with generation and class records)."""
TEST_HELD_OUT_RATE = 0.3
"""Chance that a test object takes a held-out combination (oversampled so they are well measured)."""


def image_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of image ``index`` of ``split``; string seeds hash with SHA-512 (stable)."""
    return random.Random(f"shapesworld:{seed}:{split}:{index}")


def combo_sampler(world: World, split: str) -> Callable[[random.Random], Combo]:
    """``choose(rng) -> (colour, shape)`` for ``split``: train never yields a held-out combination."""
    seen, held_out = world.seen_combos, list(world.held_out)
    if split == "train":
        return lambda rng: rng.choice(seen)
    if split == "test":
        return lambda rng: rng.choice(held_out) if rng.random() < TEST_HELD_OUT_RATE else rng.choice(seen)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def sample_split_scene(world: World, split: str, seed: int, index: int) -> tuple[Scene, random.Random]:
    """Scene of image ``index`` of ``split``, and its generator (to draw that image's text from)."""
    rng = image_rng(seed, split, index)
    n_objects = 1 if rng.random() < ONE_OBJECT_RATE else 2
    return sample_scene(world, rng, n_objects=n_objects, choose_combo=combo_sampler(world, split)), rng


def _record(user: str, assistant: str, image: str, meta: dict[str, Any], cls: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "images": [image],
    }
    if cls is not None:
        record["class"] = cls
    record["meta"] = meta
    return record


def scene_records(scene: Scene, image: str, world: World, rng: random.Random, *,
                  every_object: bool = False, layout_classes: bool = False) -> list[dict[str, Any]]:
    """All records backed by one image: caption, QA of every type (with ``every_object``, about every
    object of a multi-object scene), and (one object) gen + class_gen; with ``layout_classes`` the class
    of both generation records is :attr:`Scene.layout_class_name` (the image they ask for, with its size
    and place; the caption-based prompt names them, the class prompt leaves them open)."""
    base = {
        "objects": [obj.attributes() for obj in scene.objects],
        "background": scene.background,
        "combo_seen": all(world.is_seen(obj.colour, obj.shape) for obj in scene.objects),
    }
    single = len(scene.objects) == 1
    cls = scene.class_name if single else None
    gen_cls = scene.layout_class_name if single and layout_classes else cls
    description = text.caption(scene, world.positions)
    records = [_record(f"{IMAGE}\n{text.caption_prompt(rng)}", description, image,
                       {"task": "caption", **base}, cls)]
    for qa in text.qa_pairs(scene, rng, every_object=every_object):
        records.append(_record(f"{IMAGE}\n{qa.question}", qa.answer, image,
                               {"task": "qa", "qtype": qa.qtype, **base}, cls))
    if single:
        obj = scene.objects[0]
        records.append(_record(*text.generation_turns(description, rng), image, {"task": "gen", **base}, gen_cls))
        records.append(_record(*text.class_turns(obj.colour, obj.shape, rng), image,
                               {"task": "class_gen", **base}, gen_cls))
    return records


def _write_split(out: Path, split: str, n_images: int, world: World, seed: int, progress: bool,
                 every_object: bool = False, layout_classes: bool = False) -> int:
    """Write ``images/{split}/*.png`` and ``{split}.jsonl``; returns the number of records."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(max(n_images - 1, 0))))
    n_records = 0
    with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as lines:
        for index in tqdm(range(n_images), desc=f"shapesworld {split}", unit="img", disable=not progress):
            scene, rng = sample_split_scene(world, split, seed, index)
            relative = f"images/{split}/{index:0{digits}d}.png"
            render(scene, world).save(out / relative, format="PNG")
            for record in scene_records(scene, relative, world, rng, every_object=every_object,
                                        layout_classes=layout_classes):
                lines.write(json.dumps(record, ensure_ascii=False) + "\n")
                n_records += 1
    return n_records


def write_dataset(
    out_dir: str | Path, *, n_train: int, n_test: int, seed: int = 0, image_size: int = 32,
    progress: bool = True, binding_questions: bool = False, layout_classes: bool = True,
) -> dict[str, int]:
    """Generate ShapesWorld into ``out_dir`` (created if needed; existing files are overwritten).

    Args:
        out_dir: dataset folder.
        n_train / n_test: number of *images* per split (each backs 6 to 8 records).
        seed: everything (scenes, text, held-out test sampling) is a function of it.
        image_size: side of the square images in pixels (32 for the tiny preset; 64 also works).
        progress: show a tqdm progress bar.
        binding_questions: in the train split, ask every QA type (count excepted) about each object of a
            two-object image, not about one of them (:func:`~vargpt.data.shapesworld.text.qa_pairs`);
            the test split always asks one question per type, so its measurements do not change. Off by
            default: on the tiny preset it did not teach binding in the recipe's budget (README).
        layout_classes: the generation records' ``class`` is ``"{size} {colour} {shape} {position}"``
            (the decoder pretrains on generation records' classes, so with ``class_embed="words"`` it
            learns to draw a named size and place, and stages 1-3 align the prompt's state to that
            condition); understanding records keep ``"{colour} {shape}"``. False: every record as before.
            Scenes, text and images are the same either way.

    Returns:
        ``{"train_images", "train_records", "test_images", "test_records"}``.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: must be >= 0")
    world = World(image_size=image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, n_images in zip(SPLITS, (n_train, n_test), strict=True):
        counts[f"{split}_images"] = n_images
        counts[f"{split}_records"] = _write_split(out, split, n_images, world, seed, progress,
                                                  every_object=binding_questions and split == "train",
                                                  layout_classes=layout_classes)
    description = {"name": "shapesworld", "seed": seed, **world.to_dict(), "counts": counts,
                   "binding_questions": binding_questions, "layout_classes": layout_classes,
                   "caption_order": "reading"}
    (out / "world.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote ShapesWorld to %s: %s", out, counts)
    return counts


def load_world(dataset_dir: str | Path) -> World:
    """The :class:`World` described by ``dataset_dir/world.json``."""
    return World.from_dict(json.loads((Path(dataset_dir) / "world.json").read_text(encoding="utf-8")))
