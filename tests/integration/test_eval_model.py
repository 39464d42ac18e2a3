"""`vargpt eval` end to end on a tiny random checkpoint and a tiny ShapesWorld (runs, not quality)."""

from __future__ import annotations

import argparse
import json

from vargpt.evaluation.run import add_eval_parser, add_feature_net_parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vargpt")
    sub = p.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_feature_net_parser(sub)
    return p


def test_eval_command_end_to_end(chat_model_dir, tmp_path, capsys):
    from vargpt.data.shapesworld import write_dataset

    data = tmp_path / "data"
    write_dataset(data, n_train=16, n_test=12, seed=0, progress=False)
    p = _parser()
    a = p.parse_args(["feature-net", "--data", str(data), "--out", str(tmp_path / "fn"), "--steps", "2", "--quiet"])
    a.func(a)
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    out = tmp_path / "eval" / "metrics.json"
    a = p.parse_args(["eval", "--model", str(chat_model_dir), "--data", str(data), "--out", str(out),
                      "--feature-net", str(tmp_path / "fn"), "--max-understanding", "6", "--max-generation", "4",
                      "--batch-size", "3", "--loss-curves", str(tmp_path / "fn" / "loss.png")])
    a.func(a)
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads(out.read_text())
    assert printed == metrics
    assert metrics["understanding_n"] == 6 and 0.0 <= metrics["understanding_accuracy"] <= 1.0
    assert metrics["generation_n_images"] == 4 and 0.0 <= metrics["generation_accuracy"] <= 1.0
    assert metrics["fid"] is not None and metrics["fid"] >= 0
    page = (tmp_path / "eval" / "metrics.html").read_text()
    assert "scale 1" in page and page.count("data:image/png") >= 6 + 4 + 1
