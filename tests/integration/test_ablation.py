"""`vargpt ablate` end to end at toy size: a recipe run folder whose steps up to `assemble` are done (a tiny
random stage0, a 2-step feature net), 2 optimiser steps per stage run, a few evaluation samples."""

import dataclasses
import json

import pytest
import torch

from vargpt.ablation import PREFIX_STEPS, VARIANTS, run_ablation
from vargpt.cli import main
from vargpt.config import VARGPTConfig
from vargpt.pretrained import load_pretrained

EVAL = ["--max-steps", "2", "--max-understanding", "4", "--max-generation", "2"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, hf_tokenizer):
    """A `vargpt pipeline` run folder finished up to `assemble` and `feature_net` (markers written)."""
    from vargpt.data.shapesworld import write_dataset
    from vargpt.evaluation.feature_net import train_feature_net
    from vargpt.model import VARGPT
    from vargpt.pretrained import save_pretrained
    from vargpt.special_tokens import SpecialTokenIds

    run = tmp_path_factory.mktemp("ablation") / "run"
    write_dataset(run / "data", n_train=24, n_test=8, seed=0, progress=False)
    cfg = VARGPTConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=2),
                              visual_decoder=dataclasses.replace(cfg.visual_decoder, depth=2))
    torch.manual_seed(0)
    save_pretrained(VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer)), hf_tokenizer,
                    run / "stage0" / "model")
    train_feature_net(run / "data", run / "feature_net", steps=2, batch_size=8, progress=False)
    (run / "steps").mkdir()
    for name in PREFIX_STEPS:
        (run / "steps" / f"{name}.json").write_text(json.dumps({"result": {}, "wall_seconds": 0.0}))
    return run


def _weights(folder, prefix):
    model, _ = load_pretrained(folder)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ablation_variants_train_what_they_should_and_resume(run_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablation"
    result = run_ablation(out_dir=out, from_run=run_folder, max_steps=2, max_understanding=4, max_generation=2,
                          progress=False)
    st = out / "stages"
    assert sorted(p.name for p in st.iterdir()) == sorted(
        ["stage1", "stage1+stage2", "stage1+stage2+stage3", "stage2", "stage2+stage3",
         "stage1+stage2+stage3_decoder_only", "stage1+stage2+stage3_projectors_only"])
    # Frozen visual decoder: stage 3 leaves vargpt_gen bit-identical to its stage-2 input, moves the projectors.
    assert _same(_weights(st / "stage1+stage2+stage3_projectors_only", "vargpt_gen."),
                 _weights(st / "stage1+stage2", "vargpt_gen."))
    assert not _same(_weights(st / "stage1+stage2+stage3_projectors_only", "image_gen_projector"),
                     _weights(st / "stage1+stage2", "image_gen_projector"))
    # Frozen generation projectors: the other way round.
    assert _same(_weights(st / "stage1+stage2+stage3_decoder_only", "image_gen_projector"),
                 _weights(st / "stage1+stage2", "image_gen_projector"))
    assert not _same(_weights(st / "stage1+stage2+stage3_decoder_only", "vargpt_gen."),
                     _weights(st / "stage1+stage2", "vargpt_gen."))
    # The frozen variants split the preset's own stage-3 set (tiny: decoder blocks and head, output projector).
    assert result["stages"]["stage1+stage2+stage3_projectors_only"]["trainable"] == ["image_gen_projector_out.*"]
    assert result["stages"]["stage1+stage2+stage3_decoder_only"]["trainable"] == [
        "vargpt_gen.blocks.*", "vargpt_gen.head.*", "vargpt_gen.head_nm.*"]
    # W/o stage 1: the projectors stage 2 starts from are stage0's.
    assert _same(_weights(st / "stage2", "image_gen_projector"), _weights(run_folder / "stage0", "image_gen_projector"))
    # The recipe ran only its shared prefix in the run folder (its own stages are not trained).
    assert not (run_folder / "stage1").exists() and not (run_folder / "steps" / "stage1.json").exists()
    rows = {r["name"]: r for r in result["variants"]}
    assert list(rows) == [v.name for v in VARIANTS]
    assert rows["no_stage3"]["model"] == str(st / "stage1+stage2" / "model")
    assert rows["full"]["train_seconds"] == pytest.approx(rows["no_stage3"]["train_seconds"]
                                                          + result["stages"]["stage1+stage2+stage3"]["train_seconds"],
                                                          abs=0.02)
    for r in rows.values():
        assert 0 <= r["understanding_accuracy"] <= 1 and 0 <= r["generation_accuracy"] <= 1 and r["fid"] >= 0
    assert json.loads((out / "ablation.json").read_text())["table"] == result["table"]
    assert len(result["table"].splitlines()) == 2 + len(VARIANTS)

    # A rerun through the CLI trains and evaluates nothing, and prints the table and the command.
    def fail(*a, **k):
        """Stand-in for train_stage / evaluate_model (the CLI parser reads the docstring)."""
        raise AssertionError("finished work was redone")

    monkeypatch.setattr("vargpt.training.vargpt_trainer.train_stage", fail)
    monkeypatch.setattr("vargpt.evaluation.run.evaluate_model", fail)
    capsys.readouterr()
    assert main(["ablate", "--out", str(out), "--from-run", str(run_folder), *EVAL, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert result["table"] in printed
    assert f"vargpt ablate --preset tiny --out {out} --from-run {run_folder} {' '.join(EVAL)}" in printed
    # Other settings in the same folder are refused with a one-line error.
    assert main(["ablate", "--out", str(out), "--from-run", str(run_folder), "--max-steps", "3", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
    # So is a folder whose stage runs trained other parameters (e.g. one made before a recipe change).
    settings = json.loads((out / "settings.json").read_text())
    assert settings["trainable"]["stage1+stage2+stage3_projectors_only"] == ["image_gen_projector_out.*"]
    settings["trainable"]["stage1+stage2+stage3_projectors_only"] = ["image_gen_projector.*",
                                                                    "image_gen_projector_out.*"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert main(["ablate", "--out", str(out), "--from-run", str(run_folder), *EVAL, "--quiet"]) == 2
    assert "other settings (trainable" in capsys.readouterr().err
