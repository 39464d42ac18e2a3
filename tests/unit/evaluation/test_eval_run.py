"""evaluate_model end to end with stand-in pipelines, and the `vargpt eval` parser."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from vargpt.evaluation.generation import generation_items
from vargpt.evaluation.run import add_eval_parser, add_feature_net_parser, evaluate_model, fid_against_references


def test_evaluate_model_right_pipeline(shapes_dir, test_records, stand_in, tmp_path):
    from vargpt.evaluation.feature_net import train_feature_net

    train_feature_net(shapes_dir, tmp_path / "fn", steps=2, batch_size=8, progress=False)
    out = tmp_path / "eval" / "metrics.json"
    m = evaluate_model(None, shapes_dir, out=out, pipeline=stand_in(test_records, "right"), feature_net=tmp_path / "fn",
                       max_understanding=40, max_generation=12)
    assert m["understanding_accuracy"] == 1.0 and m["understanding_n"] == 40
    assert m["generation_accuracy"] == 1.0 and m["generation_n_images"] == 12
    assert set(m["generation_per_attribute"]) == {"colour", "shape", "colour+shape", "position", "size"}
    n_one_object = len({r.images[0] for r in test_records if r.is_generation})
    assert m["fid"] is not None and m["fid_n_generated"] == 12 and m["fid_n_real"] == n_one_object > 12
    assert m["fid_reference"] is not None and m["fid_features"].startswith("project:")
    assert m["generation_reply_accuracy"] == 1.0 and 0 < m["generation_reply_named"] < 1
    assert m["generation_reply_n"] == len([it for it in generation_items(test_records) if it.expected])
    assert m["generation_reply_runaway"] == m["generation_reply_after_image"] == 0.0  # every reply ends at its image
    assert json.loads(out.read_text())["understanding_accuracy"] == 1.0
    page = (tmp_path / "eval" / "metrics.html").read_text()
    assert m["report"].endswith("metrics.html") and page.count("data:image/png") > 40
    assert "the model's own replies" in page and "replies name what was asked" in page


def test_evaluate_model_wrong_pipeline_no_fid(shapes_dir, test_records, stand_in):
    pipe = stand_in(test_records, "wrong")
    pipe.run_on = 2  # every other reply runs on after its image to the text budget
    m = evaluate_model(None, shapes_dir, pipeline=pipe, max_understanding=10, max_generation=4, max_replies=10)
    assert m["understanding_accuracy"] == 0.0 and m["generation_accuracy"] == 0.0
    assert m["generation_reply_accuracy"] is None and m["generation_reply_named"] is None  # "Here it is."
    assert m["generation_reply_n"] == 10 and m["generation_reply_runaway"] == m["generation_reply_after_image"] == 0.5
    assert m["fid"] is None and m["fid_features"] is None and m["report"] is None


def test_evaluate_model_non_shapesworld_data(shapes_dir, test_records, stand_in, tmp_path):
    import shutil

    data = tmp_path / "plain"
    shutil.copytree(shapes_dir, data)
    (data / "world.json").unlink()  # not recognisably ShapesWorld any more
    from vargpt.data.records import load_records

    def random_features(images):
        return np.random.default_rng(len(images)).normal(size=(len(images), 3))

    m = evaluate_model(None, data, pipeline=stand_in(load_records(data, "test"), "right"), max_understanding=5,
                       max_generation=3, feature_net=random_features)
    assert m["understanding_accuracy"] == 1.0
    assert m["generation_accuracy"] is None and m["generation_per_attribute"] is None
    assert m["generation_n_images"] == 3 and m["fid"] is not None
    assert m["generation_reply_accuracy"] is None and m["generation_reply_n"] == 0  # no oracle vocabulary
    assert m["generation_reply_runaway"] is None


@pytest.mark.parametrize("bad", [{"max_generation": -3}, {"max_replies": -1}, {"max_understanding": -1},
                                 {"n_per_prompt": 0}])
def test_evaluate_model_rejects_bad_counts(shapes_dir, test_records, stand_in, bad):
    from vargpt.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        evaluate_model(None, shapes_dir, pipeline=stand_in(test_records, "right"), **bad)


def test_fid_against_references_small_counts():
    feats = lambda ims: np.arange(len(ims) * 2, dtype=float).reshape(-1, 2) ** 1.5  # noqa: E731
    r = fid_against_references(feats, ["g"], ["r1", "r2"])
    assert r["fid"] is None and r["fid_n_generated"] == 1
    r = fid_against_references(lambda ims: np.random.default_rng(0).normal(size=(len(ims), 2)), ["g"] * 3, ["r"] * 4)
    assert r["fid"] is not None and r["fid_reference"] is None  # 4 < 3 + 2 references: no floor


def test_parsers():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_eval_parser(sub)
    add_feature_net_parser(sub)
    a = p.parse_args(["eval", "--model", "m", "--data", "d", "--out", "o.json", "--feature-net", "fn"])
    assert (str(a.model), str(a.data), a.split, str(a.out), str(a.feature_net)) == ("m", "d", "test", "o.json", "fn")
    assert callable(a.func) and a.max_generation == 256
    a = p.parse_args(["feature-net", "--data", "d", "--out", "o", "--steps", "5"])
    assert a.steps == 5 and callable(a.func)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--data", "d"])
