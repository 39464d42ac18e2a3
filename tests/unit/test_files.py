"""vargpt.files: a file is its old version or its complete new one, never a partial write."""

from __future__ import annotations

import json

import pytest

from vargpt.files import atomic_write, write_json_atomic


def test_write_json_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2], "when": object()}, default=lambda o: "obj")
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": [1, 2], "when": "obj"}
    assert path.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "step.json"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt  # a Ctrl-C mid-write too

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.json"]


def test_unserialisable_object_leaves_nothing(tmp_path):
    path = tmp_path / "new.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert list(tmp_path.iterdir()) == []
