"""ShapesWorld generation: determinism, the dataset format, the held-out split, the text pools."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vargpt.data.shapesworld import text
from vargpt.data.shapesworld.__main__ import main
from vargpt.data.shapesworld.generate import load_world, sample_split_scene, write_dataset
from vargpt.data.shapesworld.world import (
    KNOWN_SHAPES,
    Scene,
    SceneObject,
    World,
    object_mask,
    render,
    shape_mask,
)
from vargpt.special_tokens import IMAGE, IMAGE_GEN

ROLES = {"system", "user", "assistant"}
TASKS = {"caption", "qa", "gen", "class_gen"}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapesworld")
    write_dataset(root, n_train=300, n_test=150, seed=3, progress=False)
    return root


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_dataset(tmp_path / name, n_train=40, n_test=20, seed=seed, progress=False)
    a, b, c = (_tree_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["train.jsonl"] != c["train.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 40


def test_prefix_stable_and_cli(tmp_path):
    write_dataset(tmp_path / "small", n_train=10, n_test=0, seed=1, progress=False)
    assert main(["--out", str(tmp_path / "big"), "--n-train", "25", "--n-test", "5", "--seed", "1",
                 "--no-progress"]) == 0
    small, big = _tree_digest(tmp_path / "small"), _tree_digest(tmp_path / "big")
    for name, digest in small.items():
        if name.endswith(".png"):
            assert big[name] == digest
    assert json.loads((tmp_path / "big" / "world.json").read_text())["counts"]["test_images"] == 5


def test_records_are_valid(dataset):
    for split in ("train", "test"):
        records = _records(dataset, split)
        assert records
        for rec in records:
            assert set(rec) <= {"messages", "images", "class", "meta"}
            roles = [m["role"] for m in rec["messages"]]
            assert set(roles) <= ROLES and roles[-1] == "assistant"
            n_in = sum(m["content"].count(IMAGE) for m in rec["messages"] if m["role"] == "user")
            n_gen = sum(m["content"].count(IMAGE_GEN) for m in rec["messages"] if m["role"] == "assistant")
            assert n_in + n_gen == len(rec["images"]) == 1
            assert all(IMAGE_GEN not in m["content"] for m in rec["messages"] if m["role"] == "user")
            assert (dataset / rec["images"][0]).is_file() and not Path(rec["images"][0]).is_absolute()
            meta = rec["meta"]
            assert meta["task"] in TASKS and isinstance(meta["combo_seen"], bool)
            assert ("qtype" in meta) == (meta["task"] == "qa")
            if meta["task"] in ("gen", "class_gen"):
                assert n_gen == 1 and rec["messages"][-1]["content"].endswith(IMAGE_GEN)
                assert len(meta["objects"]) == 1
            else:
                assert rec["messages"][0]["content"].startswith(IMAGE + "\n")
            obj = meta["objects"][0]
            assert ("class" in rec) == (len(meta["objects"]) == 1)
            if "class" in rec:  # generation records: the image to draw, with its size and place
                want = ((obj["size"], obj["colour"], obj["shape"], obj["position"])
                        if meta["task"] in ("gen", "class_gen") else (obj["colour"], obj["shape"]))
                assert rec["class"] == " ".join(want)


def test_layout_classes_name_the_drawn_image_and_plain_classes_restore_the_old_records(dataset, tmp_path):
    """A generation record's class is "{size} {colour} {shape} {position}" of its image (the caption-based
    prompt states all four, the class prompt colour and shape); ``--plain-classes`` changes only those
    classes, and world.json says which."""
    world = load_world(dataset)
    gen = [r for r in _records(dataset, "train") if r["meta"]["task"] in ("gen", "class_gen")]
    assert {r["meta"]["task"] for r in gen} == {"gen", "class_gen"}
    for r in gen:
        named = world.class_attributes(r["class"])
        assert named == r["meta"]["objects"][0]
        prompt = r["messages"][0]["content"]
        stated = named.values() if r["meta"]["task"] == "gen" else (named["colour"], named["shape"])
        assert all(word in prompt for word in stated)
    assert main(["--out", str(tmp_path / "plain"), "--n-train", "300", "--n-test", "150", "--seed", "3",
                 "--no-progress", "--plain-classes"]) == 0
    assert json.loads((dataset / "world.json").read_text())["layout_classes"] is True
    assert json.loads((tmp_path / "plain" / "world.json").read_text())["layout_classes"] is False
    for split in ("train", "test"):
        layout, plain = _records(dataset, split), _records(tmp_path / "plain", split)
        assert len(layout) == len(plain)
        for a, b in zip(layout, plain, strict=True):
            obj = a["meta"]["objects"][0]
            if a["meta"]["task"] in ("gen", "class_gen"):
                assert b["class"] == f"{obj['colour']} {obj['shape']}" != a["class"]
                b = {**b, "class": a["class"]}
            assert a == b


def test_class_attributes_parses_any_order_and_rejects_unknown_words():
    world = World(image_size=32)
    assert world.class_attributes("red star") == {"colour": "red", "shape": "star"}
    assert world.class_attributes("left small red star") == {
        "position": "left", "size": "small", "colour": "red", "shape": "star"}
    with pytest.raises(ValueError, match="'tiny' is no ShapesWorld"):
        world.class_attributes("tiny red star")
    with pytest.raises(ValueError, match="two colours"):
        world.class_attributes("red blue star")


def test_records_match_pixels_and_world(dataset):
    world = load_world(dataset)
    assert world == World(image_size=32)
    for rec in _records(dataset, "train")[:200]:
        image = Image.open(dataset / rec["images"][0])
        assert image.size == (32, 32) and image.mode == "RGB"
        pixels = np.asarray(image).reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(pixels, axis=0)}
        expected = {world.backgrounds[rec["meta"]["background"]]}
        expected |= {world.colours[o["colour"]] for o in rec["meta"]["objects"]}
        assert colours == expected  # no antialiasing, every object visible


def test_held_out_combos_absent_from_train_present_in_test(dataset):
    world = load_world(dataset)
    held = {tuple(c) for c in json.loads((dataset / "world.json").read_text())["held_out"]}
    assert held == set(world.held_out) and 0.1 <= len(held) / len(world.class_names) <= 0.15
    assert {c for c, _ in held} == set(world.colours) and {s for _, s in held} == set(world.shapes)

    def combos(rec):
        return {(o["colour"], o["shape"]) for o in rec["meta"]["objects"]}

    train, test = _records(dataset, "train"), _records(dataset, "test")
    assert all(not combos(r) & held and r["meta"]["combo_seen"] for r in train)
    assert all(r["meta"]["combo_seen"] == (not combos(r) & held) for r in test)
    test_gen = [r for r in test if r["meta"]["task"] == "class_gen"]
    assert {r["meta"]["combo_seen"] for r in test_gen} == {True, False}
    assert len({r["class"] for r in test_gen if not r["meta"]["combo_seen"]}) >= 4


def test_tasks_and_questions(dataset):
    records = _records(dataset, "train")
    tasks = {r["meta"]["task"] for r in records}
    assert tasks == TASKS
    assert {r["meta"]["qtype"] for r in records if r["meta"]["task"] == "qa"} == set(text.QTYPES)
    assert {len(r["meta"]["objects"]) for r in records if r["meta"]["task"] == "caption"} == {1, 2}
    for rec in records:
        if rec["meta"]["task"] == "qa":
            answer = rec["messages"][-1]["content"]
            assert " " not in answer and answer.islower()


def test_two_object_captions_follow_reading_order(dataset):
    """Whatever order the objects were drawn in, a caption lists the upper (then the left) object first."""
    rank = {"top": 0, "left": 1, "center": 2, "right": 3, "bottom": 4}
    drawn_later_first = 0
    for split in ("train", "test"):
        for r in _records(dataset, split):
            objects = r["meta"]["objects"]
            if r["meta"]["task"] != "caption" or len(objects) != 2:
                continue
            ordered = sorted(objects, key=lambda o: rank[o["position"]])
            drawn_later_first += ordered[0] is objects[1]
            expected = " and ".join(f"a {o['size']} {o['colour']} {o['shape']} {text.POSITION_PHRASES[o['position']]}"
                                    for o in ordered)
            assert r["messages"][1]["content"] == expected
    assert drawn_later_first > 10  # the drawing order does vary, so the test can fail
    assert json.loads((dataset / "world.json").read_text())["caption_order"] == "reading"


def test_binding_questions_ask_about_every_object_in_train_only(dataset, tmp_path):
    """``--binding-questions``: in train, every attribute question type about each object of a two-object
    image (answers read from *that* object); one-object images and the test split unchanged: without it
    the train split is exactly the records that remain when the extra ones are removed."""
    assert main(["--out", str(tmp_path / "rich"), "--n-train", "300", "--n-test", "150", "--seed", "3",
                 "--no-progress", "--binding-questions"]) == 0
    rich_dir = tmp_path / "rich"
    train = _records(rich_dir, "train")
    by_image: dict[str, list[dict]] = {}
    for r in train:
        if r["meta"]["task"] == "qa":
            by_image.setdefault(r["images"][0], []).append(r)
    two = [qs for qs in by_image.values() if len(qs[0]["meta"]["objects"]) == 2]
    assert two
    for qs in by_image.values():
        objects = qs[0]["meta"]["objects"]
        per_type = {q: [r for r in qs if r["meta"]["qtype"] == q] for q in text.QTYPES}
        assert len(per_type["count"]) == 1
        for qtype in ("colour", "shape", "position", "size"):
            assert len(per_type[qtype]) == len(objects)
            named = []
            for r in per_type[qtype]:
                question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
                # the object the question names (by its shape word, else its colour word) gives the answer
                words = set(question.replace("?", " ").split())
                (obj,) = ([o for o in objects if o["shape"] in words] or [o for o in objects if o["colour"] in words]
                          or objects)  # "What colour is the object?" (one-object images only)
                assert answer == obj[qtype]
                named.append(obj["shape"])
            assert sorted(named) == sorted(o["shape"] for o in objects)
    for root in (rich_dir, dataset):
        test_qa = [(r["images"][0], r["meta"]["qtype"]) for r in _records(root, "test") if r["meta"]["task"] == "qa"]
        assert len(test_qa) == len(set(test_qa))  # one question per type and image
    plain = [json.dumps(r) for r in _records(dataset, "train")]
    rich = [json.dumps(r) for r in train]
    assert len(rich) == len(plain) + 4 * len(two)
    it = iter(rich)
    assert all(any(line == other for other in it) for line in plain)  # plain is a subsequence of rich
    assert (rich_dir / "test.jsonl").read_bytes() == (dataset / "test.jsonl").read_bytes()


def test_two_object_scenes_are_separated_and_distinct():
    world = World(image_size=32)
    for index in range(150):
        scene, _ = sample_split_scene(world, "train", 0, index)
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        assert a.colour != b.colour and a.shape != b.shape and a.position != b.position
        # at least two background pixels between the objects, diagonals included
        grown = ndimage.binary_dilation(object_mask(a, 32), np.ones((3, 3), bool), iterations=2)
        assert not (grown & object_mask(b, 32)).any()


def test_text_pools_and_grammar():
    assert len(text.GENERATION_PROMPTS) >= 50 and len(set(text.GENERATION_PROMPTS)) == len(text.GENERATION_PROMPTS)
    assert len(text.GENERATION_ANSWERS) >= 20 and all(a.endswith(IMAGE_GEN) for a in text.GENERATION_ANSWERS)
    assert all("{caption}" in p for p in text.GENERATION_PROMPTS)
    user, assistant = text.class_turns("orange", "star", random.Random(0))
    assert user == "Please generate an image of an orange star." and assistant.endswith(IMAGE_GEN)
    scene = Scene("white", (SceneObject("circle", "red", "large", "left", 1, 9, 15),
                            SceneObject("star", "blue", "small", "top", 11, 3, 10)))
    # reading order of the regions (top, left, centre, right, bottom), not drawing order
    assert text.caption(scene) == "a small blue star at the top and a large red circle on the left"
    assert text.caption(Scene("white", scene.objects[::-1])) == text.caption(scene)
    right = SceneObject("heart", "green", "small", "right", 20, 9, 10)
    assert text.caption(Scene("white", (right, scene.objects[0]))).startswith("a large red circle on the left and")
    # a custom world's regions order by their own centres
    flipped = {"left": (0.25, 0.9), "top": (0.5, 0.1)}
    assert text.caption(scene, flipped).startswith("a small blue star")
    assert text.caption(scene, {"left": (0.25, 0.1), "top": (0.5, 0.2)}).startswith("a large red circle")
    with pytest.raises(ValueError, match="top"):
        text.caption(scene, {"left": (0.25, 0.5)})


def test_palette_separation_and_shapes():
    world = World()
    colours = np.array(list(world.colours.values()), dtype=float)
    backgrounds = np.array(list(world.backgrounds.values()), dtype=float)
    pairwise = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(pairwise) > 100
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() > 100
    assert len(world.shapes) >= 6 and len(world.colours) >= 6 and set(world.shapes) <= set(KNOWN_SHAPES)
    for side in (10, 15):
        masks = {s: shape_mask(s, side) for s in world.shapes}
        for a, b in itertools.combinations(world.shapes, 2):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, (a, b, side)


@pytest.mark.parametrize("size", [32, 64])
def test_render_sizes(size):
    world = World(image_size=size)
    scene, _ = sample_split_scene(world, "test", 0, 0)
    image = render(scene, world)
    assert image.size == (size, size)
    assert world.side("small") < world.side("large") < size // 2
