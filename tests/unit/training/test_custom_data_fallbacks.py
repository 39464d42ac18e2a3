"""What the recipe does with data unlike ShapesWorld: no classes, too many classes, no input images, foreign meta."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vargpt.data.records import Message, Record
from vargpt.evaluation.generation import expected_attributes
from vargpt.evaluation.run import fid_against_references
from vargpt.training.base_llava import understanding_records
from vargpt.training.base_text import CAPTION_QUESTION, captioning_records
from vargpt.training.decoder_trainer import decoder_pairs


def _gen(i: int, cls: str | None = None, meta: dict | None = None) -> Record:
    return Record((Message("user", f"Paint picture {i}."), Message("assistant", "Here:<image_gen>")),
                  (Path(f"/d/{i}.png"),), cls=cls, meta=meta or {})


def _und(i: int) -> Record:
    return Record((Message("user", "<image>\nWhat is it?"), Message("assistant", "stripes")), (Path(f"/d/{i}.png"),))


def test_decoder_pairs_without_classes_trains_every_image_unconditionally():
    records = [_und(0), _gen(1), _und(1), _gen(2)]
    pairs, classes = decoder_pairs(records, num_classes=64)
    assert classes == [] and pairs == [(Path("/d/0.png"), None), (Path("/d/1.png"), None), (Path("/d/2.png"), None)]


def test_decoder_pairs_keeps_the_most_frequent_classes():
    records = [_gen(i, cls=c) for i, c in enumerate(["a", "b", "b", "c", "c", "c", "d"])]
    pairs, classes = decoder_pairs(records, num_classes=2)
    assert classes == ["b", "c"]
    assert [c for _, c in pairs] == [None, "b", "b", "c", "c", "c", None]
    pairs, classes = decoder_pairs(records[:1], num_classes=64)  # a single class is a vocabulary too
    assert classes == ["a"] and pairs == [(Path("/d/0.png"), "a")]


def test_decoder_pairs_take_the_generation_records_class_when_there_is_one():
    """An image's drawing instruction says what the decoder is to draw ("small red star left"); a question
    about the same image may carry less ("red star"): only the generation records' classes count then.
    Data whose classes sit on understanding records only still trains on them."""
    und = Record((Message("user", "<image>\nWhat is it?"), Message("assistant", "a star")), (Path("/d/0.png"),),
                 cls="red star")
    pairs, classes = decoder_pairs([und, _gen(0, cls="small red star left"), _gen(1, cls="big blue ring top")],
                                   num_classes=64)
    assert classes == ["big blue ring top", "small red star left"]
    assert pairs == [(Path("/d/0.png"), "small red star left"), (Path("/d/1.png"), "big blue ring top")]
    pairs, classes = decoder_pairs([und, _gen(1)], num_classes=64)
    assert classes == ["red star"] and pairs == [(Path("/d/0.png"), "red star")]


def test_captioning_fallback_only_for_text_to_image_data():
    gens = [_gen(1, meta={"k": 1}), _gen(2)]
    caps = captioning_records(gens)
    assert [r.messages[-1].content for r in caps] == ["Paint picture 1.", "Paint picture 2."]
    assert caps[0].messages[0].content.endswith(CAPTION_QUESTION) and caps[0].input_images == [Path("/d/1.png")]
    assert understanding_records(gens) == caps
    assert understanding_records([*gens, _und(3)]) == [_und(3)]


def test_foreign_meta_objects_are_not_shapesworld_objects():
    assert expected_attributes(_gen(1, meta={"objects": ["cat", "dog"]})) is None
    assert expected_attributes(_gen(1, meta={"objects": "cat"})) is None
    sw = _gen(1, meta={"objects": [{"colour": "red", "shape": "circle", "size": "small"}], "task": "class_gen"})
    assert expected_attributes(sw) == {"colour": "red", "shape": "circle"}


def test_null_fid_says_why():
    feats = lambda ims: np.random.default_rng(len(ims)).normal(size=(len(ims), 4))  # noqa: E731
    r = fid_against_references(feats, [], ["a", "b"])
    assert r["fid"] is None and "at least 2" in r["fid_note"]
    r = fid_against_references(feats, ["g"] * 3, ["r"] * 6)
    assert r["fid"] is not None and r["fid_note"] is None
