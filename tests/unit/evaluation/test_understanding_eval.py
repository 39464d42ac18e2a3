"""Exact-match normalisation and understanding accuracy with right and wrong answerers."""

from __future__ import annotations

import pytest

from vargpt.data.records import Message, Record
from vargpt.evaluation.understanding import (
    evaluate_understanding,
    exact_match,
    normalise_answer,
    understanding_items,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("Red", "red"),
    ("  The red.  ", "red"),
    ("a Large, RED circle!", "large red circle"),
    ("Two", "2"),
    ("two shapes", "2 shapes"),
    ("1.5", "1.5"),
    ("an apple and the pear", "apple and pear"),
    ("", ""),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_exact_match_number_words_and_digits():
    assert exact_match("2", "two")
    assert exact_match("Two.", "2")
    assert exact_match("The square", "square")
    assert not exact_match("red", "blue")
    assert not exact_match("red circle", "red")


def test_items_question_and_gold(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(img)
    qa = Record((Message("user", "<image>\nWhat colour?"), Message("assistant", "red")), (img,),
                meta={"qtype": "colour"})
    multi = Record((Message("user", "<image>\nHi"), Message("assistant", "hello"),
                    Message("user", "What shape?"), Message("assistant", "circle")), (img,))
    gen = Record((Message("user", "Draw a cat"), Message("assistant", "<image_gen>")), (img,))
    text_only = Record((Message("user", "Hi"), Message("assistant", "hello")))
    items = understanding_items([qa, multi, gen, text_only])
    assert [(it.question, it.gold, it.qtype) for it in items] == [("What colour?", "red", "colour"),
                                                                  ("What shape?", "circle", None)]


def test_perfect_answerer_scores_one(test_records, stand_in):
    res = evaluate_understanding(stand_in(test_records, "right"), test_records, batch_size=7)
    assert res["n"] == len(understanding_items(test_records)) > 100
    assert res["accuracy"] == 1.0
    assert set(res["per_qtype"]) == {"colour", "shape", "position", "size", "count"}
    assert all(v == 1.0 for v in res["per_qtype"].values())
    assert set(res["per_task"]) == {"qa", "caption"}
    assert sum(res["per_qtype_n"].values()) == res["per_task_n"]["qa"]
    assert all(s["correct"] for s in res["samples"])


def test_wrong_answerer_scores_zero_and_max_records(test_records, stand_in):
    pipe = stand_in(test_records, "wrong")
    res = evaluate_understanding(pipe, test_records, batch_size=4, max_records=10, max_new_tokens=5)
    assert res["n"] == 10 and res["accuracy"] == 0.0
    assert [c[1] for c in pipe.calls] == [4, 4, 2] and all(c[2] == 5 for c in pipe.calls)
    s = res["samples"][0]
    assert set(s) == {"image", "question", "answer", "gold", "correct", "qtype", "task"}
    assert s["answer"] == "zzz" and s["correct"] is False


def test_per_qtype_accounting(test_records, stand_in):
    res = evaluate_understanding(stand_in(test_records, "colour_only"), test_records, tasks=("qa",))
    assert res["per_task"] == {"qa": res["accuracy"]}
    assert res["per_qtype"]["colour"] == 1.0
    assert all(res["per_qtype"][q] == 0.0 for q in ("shape", "position", "size", "count"))
    n = res["per_qtype_n"]
    assert res["accuracy"] == pytest.approx(n["colour"] / sum(n.values()), abs=1e-4)


def test_empty_records_give_none(stand_in, test_records):
    res = evaluate_understanding(stand_in(test_records), [])
    assert res["accuracy"] is None and res["n"] == 0 and res["samples"] == []
