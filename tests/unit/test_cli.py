import subprocess
import sys

import pytest

from vargpt.cli import build_parser, main


def test_subcommand_table():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert {"data", "config", "pipeline", "train", "chat", "generate", "eval"} <= set(sub.choices)


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["pipeline", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["data", "validate", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no train.jsonl" in err and "Traceback" not in err
    assert main(["config", "--preset", "nope"]) == 2


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "vargpt.cli", "config", "--preset", "tiny"],
                         capture_output=True, text=True, check=True).stdout
    assert '"name": "tiny"' in out


def test_train_stage_without_from_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "stage1", "--out", str(tmp_path / "o"), "--data", str(tmp_path)]) == 2
    assert "needs --from DIR" in capsys.readouterr().err


def test_train_tokenizer_from_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path),
                 "--from", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "not a tokenizer checkpoint" in err and "Traceback" not in err


def test_train_tokenizer_loss_flags_reach_the_trainer(tmp_path, capsys, monkeypatch):
    import vargpt.training.tokenizer_trainer as tt

    seen = {}
    monkeypatch.setattr(tt, "train_tokenizer", lambda **kw: seen.update(kw) or {"steps": 0})
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path), "--quiet",
                 "--adv-weight", "0.5", "--adv-start", "100", "--perceptual-weight", "0.1",
                 "--perceptual-model", str(tmp_path / "convnext")]) == 0
    assert seen["adv_weight"] == 0.5 and seen["adv_start"] == 100
    assert seen["perceptual_weight"] == 0.1 and seen["perceptual_model"] == tmp_path / "convnext"


def test_train_tokenizer_negative_adversarial_weight_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path),
                 "--adv-weight", "-1"]) == 2
    err = capsys.readouterr().err
    assert "adv_weight=-1" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_train_tokenizer_perceptual_errors_are_clear(tmp_path, capsys):
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path),
                 "--perceptual-weight", "1"]) == 2
    assert "needs perceptual_model" in capsys.readouterr().err
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--data", str(tmp_path),
                 "--perceptual-weight", "1", "--perceptual-model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_pipeline_workers_must_be_positive(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--workers", "0", "--quiet"]) == 2
    assert "workers=0: must be >= 1" in capsys.readouterr().err


def test_pipeline_set_parses_step_arguments(tmp_path, capsys):
    from vargpt.cli import _step_overrides

    assert _step_overrides(["decoder.max_steps=500", "stage3.lr=5e-4", "decoder.batch_size=8", "x.name=abc"]) == {
        "decoder": {"max_steps": 500, "batch_size": 8}, "stage3": {"lr": 5e-4}, "x": {"name": "abc"}}
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--set", "decoder=5"]) == 2
    assert "STEP.ARGUMENT=VALUE" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--set", "decodr.max_steps=5"]) == 2
    assert "not recipe steps" in capsys.readouterr().err and not (tmp_path / "run").exists()
