"""Oracle generation metrics with a right and a wrong stand-in generator; FID maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vargpt.data.shapesworld import load_world
from vargpt.evaluation.generation import (
    ORACLE_KEYS,
    REPLY_KEYS,
    compute_fid,
    evaluate_generation,
    evaluate_replies,
    expected_attributes,
    fid_from_features,
    fid_from_stats,
    generation_items,
    reply_names,
)


def test_items_and_expected_attributes(test_records):
    items = generation_items(test_records)
    assert items and all(it.reference is not None and "<image" not in it.prompt for it in items)
    tasks = {it.task for it in items}
    assert tasks == {"gen", "class_gen"}
    for it in items:
        if it.task == "class_gen":
            assert set(it.expected) == {"colour", "shape"}
            assert it.prompt.startswith("Please generate an image of")
        else:
            assert set(it.expected) == {"colour", "shape", "position", "size"}
    assert expected_attributes(test_records[0].__class__(messages=())) is None


def test_real_images_score_about_one(shapes_dir, test_records, stand_in):
    res = evaluate_generation(stand_in(test_records, "right"), test_records, load_world(shapes_dir), n_per_prompt=2)
    n = len(generation_items(test_records))
    assert res["n_prompts"] == n and res["n_images"] == 2 * n
    assert set(res["accuracy"]) == set(ORACLE_KEYS)
    assert all(v >= 0.95 for v in res["accuracy"].values()), res["accuracy"]
    assert res["n_seen"] > 0 and res["n_unseen"] > 0 and res["n_seen"] + res["n_unseen"] == 2 * n
    assert res["seen"]["colour+shape"] >= 0.95 and res["unseen"]["colour+shape"] >= 0.95
    # class prompts ask for colour and shape only
    assert res["accuracy_n"]["colour"] == 2 * n and res["accuracy_n"]["position"] < 2 * n
    assert set(res["per_task"]) == {"gen", "class_gen"}
    assert "position" not in res["per_task"]["class_gen"]
    # per asked-for size: only the caption prompts name one, and every image of them is counted once
    sizes = [it.expected["size"] for it in generation_items(test_records) if "size" in it.expected]
    assert set(res["per_size"]) == set(sizes) and sum(res["per_size_n"].values()) == 2 * len(sizes)
    assert all(res["per_size"][z]["colour+shape"] >= 0.95 for z in res["per_size"])
    s = res["samples"][0]
    assert s["image"].size == (32, 32) and len(s["previews"]) == 4 and s["judged"]["colour+shape"]


def test_blank_images_score_zero(shapes_dir, test_records, stand_in):
    res = evaluate_generation(stand_in(test_records, "wrong"), test_records, load_world(shapes_dir), max_prompts=10)
    assert res["n_prompts"] == 10
    assert all(v == 0.0 for v in res["accuracy"].values()), res["accuracy"]
    assert res["per_size"] and all(v == 0.0 for acc in res["per_size"].values() for v in acc.values())


def test_without_world_no_oracle(test_records, stand_in):
    res = evaluate_generation(stand_in(test_records, "right"), test_records, None, max_prompts=3)
    assert res["accuracy"] is None and res["seen"] is None and res["per_size"] is None and len(res["samples"]) == 3
    assert all(s["judged"] is None for s in res["samples"])


def test_generator_must_be_prompt_major(test_records, stand_in):
    pipe = stand_in(test_records, "right")
    real = pipe.generate_images

    def shuffled(prompts, **kw):
        return real(prompts, **kw)[::-1]

    pipe.generate_images = shuffled
    with pytest.raises(RuntimeError, match="prompt-major"):
        evaluate_generation(pipe, test_records, None, max_prompts=3)


def test_reply_names_checks_each_attribute(shapes_dir):
    world = load_world(shapes_dir)
    want = {"colour": "red", "shape": "circle", "size": "large", "position": "left"}
    assert reply_names("Here is a large red circle on the left.<image_gen>", want, world) == {
        "colour": True, "shape": True, "size": True, "position": True, "all": True}
    wrong_shape = reply_names("Here is a large red diamond on the left.", want, world)
    assert not wrong_shape["shape"] and wrong_shape["colour"] and not wrong_shape["all"]
    assert not reply_names("A red or blue circle, large, left.", want, world)["colour"]  # two colours named
    assert reply_names("Here is a blue one.", want, world) == {"colour": False, "all": False}  # only what it names
    assert reply_names("Sure.<image_gen>", want, world) == {}  # a reply need not restate the request
    assert reply_names("Redcircle", {"colour": "red"}, world) == {}  # whole words only
    assert reply_names("a black circle", {"background": "black"}, world) == {}


def test_replies_of_a_right_and_a_wrong_model(shapes_dir, test_records, stand_in):
    world = load_world(shapes_dir)
    pipe = stand_in(test_records, "right")
    res = evaluate_replies(pipe, test_records, world, max_prompts=None)
    n = len([it for it in generation_items(test_records) if it.expected])
    assert pipe.calls == [("generate_images", n, True, True)]  # the model writes its own lead-in and ending
    assert res["n"] == n and set(res["accuracy"]) == set(REPLY_KEYS)
    assert res["runaway"] == 0.0 and res["after_image"] == 0.0  # the dataset's replies end at the image
    assert res["forced_image"] == 0.0  # and start it themselves
    assert all(v == 1.0 for v in res["accuracy"].values()), res["accuracy"]  # the dataset's own replies
    assert 0 < res["named"]["all"] < 1  # some of them ("Sure.") name nothing
    s = next(s for s in res["samples"] if s["named"])
    assert s["reply"].endswith("<image_gen>") and s["named"]["all"] and s["expected"]
    assert res["seen"]["all"] == res["unseen"]["all"] == 1.0
    silent = evaluate_replies(stand_in(test_records, "wrong"), test_records, world, max_prompts=12)
    assert silent["n"] == 12 and silent["accuracy"] == {} and silent["named"] == {}
    # a model that names the wrong colour (the next one in the world's list) everywhere
    colours = list(world.colours)
    swap = {c: colours[(i + 1) % len(colours)] for i, c in enumerate(colours)}
    pipe.replies = {p: " ".join(swap.get(w, w) for w in r.split(" ")) for p, r in pipe.replies.items()}
    wrong = evaluate_replies(pipe, test_records, world, max_prompts=None)
    assert wrong["accuracy"]["colour"] < 0.1 and wrong["accuracy"]["all"] < 0.1, wrong["accuracy"]
    assert wrong["accuracy"]["shape"] == 1.0 and wrong["named"] == res["named"]


def test_replies_that_run_on_after_the_image(shapes_dir, test_records, stand_in):
    world = load_world(shapes_dir)
    pipe = stand_in(test_records, "right")
    pipe.run_on = 4  # every 4th reply goes on "... <image_gen> ring ring ring" to the text budget
    res = evaluate_replies(pipe, test_records, world, max_prompts=20)
    assert res["n"] == 20 and res["runaway"] == res["after_image"] == 0.25
    assert [s["finish_reason"] for s in res["samples"][:4]] == ["length", "stop", "stop", "stop"]
    assert res["accuracy"]["all"] == 1.0  # the words after the image ("ring") are not the lead-in's
    pipe.no_draw = 5  # replies 1, 6, 11, 16 write on instead of drawing: their images were forced
    res = evaluate_replies(pipe, test_records, world, max_prompts=20)
    assert res["forced_image"] == 0.2 and res["runaway"] == 0.25
    stopped = evaluate_replies(pipe, test_records, world, max_prompts=20, finish_reply=False)
    assert pipe.calls[-1] == ("generate_images", 20, True, False)
    assert stopped["runaway"] is None and stopped["after_image"] is None and stopped["forced_image"] == 0.2
    assert {s["finish_reason"] for s in stopped["samples"]} == {"image"}


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------


def test_fid_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_fid_shift_is_squared_distance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    shift = rng.normal(size=6)
    # same covariance, means differ by `shift`: FID = |shift|^2 exactly
    assert fid_from_features(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fid_closed_form_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert fid_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-9)


def test_fid_sampled_shifted_gaussian_close_to_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(loc=1.0, scale=2.0, size=(20000, 4))
    expected = 4 * 1.0 + 4 * (2.0 - 1.0) ** 2  # |mu|^2 + sum (sigma_a - sigma_b)^2
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_near_singular_covariances_are_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.5  # rank-4 covariances in 32 dims
    fid = fid_from_features(a, b)
    assert np.isfinite(fid) and fid > 0


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        fid_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_compute_fid_with_a_toy_extractor(test_records):
    from vargpt.data.records import load_image

    def mean_colour(images):
        pil = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        return np.stack([np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0) for im in pil])

    refs = [it.reference for it in generation_items(test_records)]
    inverted = [load_image(r).point(lambda v: 255 - v) for r in refs]
    assert compute_fid(mean_colour, refs, refs) == pytest.approx(0.0, abs=1e-6)
    assert compute_fid(mean_colour, refs, inverted) > 100
