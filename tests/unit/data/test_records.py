import json

import numpy as np
import pytest
from PIL import Image

from vargpt.data.records import (
    DatasetError,
    image_to_tensor,
    load_image,
    load_records,
    tensor_to_image,
    unique_images,
)


def _write(root, lines, split="train"):
    (root / f"{split}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / f"{n}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    return tmp_path


GOOD = [
    {"messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                  {"role": "assistant", "content": "red"}], "images": ["img/a.png"], "meta": {"qtype": "colour"}},
    {"messages": [{"role": "user", "content": "Draw a red square."},
                  {"role": "assistant", "content": "Here.<image_gen>"}], "images": ["img/b.png"],
     "class": "red square"},
    {"messages": [{"role": "user", "content": "<image>\nand draw it <b>again</b>"},
                  {"role": "assistant", "content": "<image_gen> done"}], "images": ["img/a.png", "img/b.png"]},
]


def test_reads_good_records(root):
    _write(root, GOOD)
    recs = load_records(root, "train")
    assert len(recs) == 3
    assert recs[0].is_understanding and not recs[0].is_generation and recs[0].meta == {"qtype": "colour"}
    assert recs[1].is_generation and recs[1].cls == "red square"
    assert recs[2].input_images == [root / "img/a.png"] and recs[2].generated_images == [root / "img/b.png"]
    assert unique_images(recs) == [root / "img/a.png", root / "img/b.png"]
    assert recs[0].source.endswith("train.jsonl:1")


def test_to_json_is_the_inverse_of_parsing(root):
    from vargpt.data.records import parse_record

    _write(root, GOOD)
    for i, rec in enumerate(load_records(root, "train")):
        obj = rec.to_json(root)
        assert obj == GOOD[i]
        again = parse_record(obj, root, rec.source)
        assert again == rec and again.meta == rec.meta
    with pytest.raises(ValueError):
        load_records(root, "train")[2].to_json(root / "other")  # images are not under that folder


def test_shared_images_are_resolved_once_per_load(root, monkeypatch):
    """Many records name the same image; resolving costs a system call per path component."""
    import pathlib

    _write(root, [GOOD[0]] * 50 + [GOOD[2]] * 50)
    calls = []
    real = pathlib.Path.resolve
    monkeypatch.setattr(pathlib.Path, "resolve", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    recs = load_records(root, "train")
    assert len(recs) == 100 and recs[-1].generated_images == [root / "img/b.png"]
    assert len(calls) <= 4  # the root (twice), img/a.png, img/b.png


def test_rereading_a_split_reuses_the_parse_until_the_file_changes(root, monkeypatch):
    import vargpt.data.records as records

    _write(root, GOOD)
    first = load_records(root, "train")
    parsed = []
    real = records.parse_record
    monkeypatch.setattr(records, "parse_record", lambda *a, **k: parsed.append(1) or real(*a, **k))
    again = load_records(root, "train")
    assert again == first and again is not first and not parsed  # a new list, no parsing
    again.pop()
    assert len(load_records(root, "train")) == 3  # callers may change their list
    _write(root, GOOD[:2])  # same path, new content
    assert len(load_records(root, "train")) == 2 and len(parsed) == 2
    assert len(load_records(root, "train", check_images=False)) == 2 and len(parsed) == 4  # another key


def test_the_least_recently_read_split_is_forgotten_first(root, monkeypatch):
    import shutil

    import vargpt.data.records as records

    monkeypatch.setattr(records, "_RECENT_LOADS", {})
    roots = []
    for i in range(records._RECENT_LOADS_MAX + 1):
        shutil.copytree(root / "img", (r := root / f"d{i}") / "img")
        _write(r, GOOD)
        roots.append(r)
    for r in roots[:-1]:
        load_records(r, "train")
    load_records(roots[0], "train")  # read again: now the most recent
    load_records(roots[-1], "train")  # one over the limit: evicts d1, the least recently read
    parsed = []
    real = records.parse_record
    monkeypatch.setattr(records, "parse_record", lambda *a, **k: parsed.append(1) or real(*a, **k))
    load_records(roots[0], "train")
    assert not parsed
    load_records(roots[1], "train")
    assert len(parsed) == len(GOOD)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "x"}],
          "images": ["img/missing.png"]}, "image file not found"),
        ({"messages": [{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "x"}],
          "images": ["img/a.png"]}, "2 image placeholder"),
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
         "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
          "images": ["../outside.png"]}, "escapes the dataset folder"),
        ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
          "images": ["/etc/passwd"]}, "must be relative"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "<image_gen>"}, {"role": "assistant", "content": "x"}],
          "images": ["img/a.png"]}, "belong in assistant turns"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
          "picture": "a"}, "unknown key"),
    ],
)
def test_bad_records_name_file_line_and_problem(root, record, message):
    _write(root, [GOOD[0], record])
    with pytest.raises(DatasetError) as e:
        load_records(root, "train")
    assert message in str(e.value) and "train.jsonl:2" in str(e.value)


def test_invalid_json_and_missing_split(root):
    (root / "train.jsonl").write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(DatasetError, match="train.jsonl:2: invalid JSON"):
        load_records(root)
    with pytest.raises(DatasetError, match="no test.jsonl"):
        load_records(root, "test")


def test_corrupt_image_is_a_named_error(root):
    with pytest.raises(DatasetError, match="cannot read image"):
        load_image(root / "img" / "bad.png")


def test_llava_json(root):
    data = [{"image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "red"}]}]
    (root / "test.json").write_text(json.dumps(data))
    (rec,) = load_records(root, "test")
    assert rec.messages[0].role == "user" and rec.input_images == [root / "img/a.png"]
    (root / "test.json").write_text(json.dumps([{"image": "img/a.png", "conversations": [{"from": "bot"}]}]))
    with pytest.raises(DatasetError, match=r"test.json\[0\].*'bot'"):
        load_records(root, "test")


def test_image_tensor_round_trip(root):
    img = load_image(root / "img" / "a.png", size=4)
    assert img.size == (4, 4)
    x = image_to_tensor(img)
    assert x.shape == (3, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(x)), np.asarray(img))
