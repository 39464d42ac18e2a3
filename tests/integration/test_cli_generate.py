"""`vargpt generate` and `vargpt chat` on a tiny checkpoint: files written, REPL, one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vargpt.cli import main


def _module() -> str:
    return "vargpt.cli"


def _main(argv: list[str]) -> int:
    return main(argv)


def test_generate_writes_images_index_and_previews(chat_model_dir, tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", _module(), "generate", "--model", str(chat_model_dir), "--prompt", "a red circle",
           "--prompt", "a <image_gen_start> square", "-n", "2", "--seed", "5", "--batch-size", "3", "--previews",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] == 4
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a <image_gen_start> square"] * 2
    assert len({r["seed"] for r in rows}) == 4 and {r["base_seed"] for r in rows} == {5}
    S = len(json.loads((chat_model_dir / "config.json").read_text())["vqvae"]["patch_nums"])
    for r in rows:
        img, strip = Image.open(out / r["file"]), Image.open(out / r["previews"])
        assert strip.size == (S * img.size[0], img.size[1])  # one tile per scale
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # same prompts, -n and --seed reproduce the images whatever the batch size (the codes exactly; the
    # VQ-VAE's convolutions may round differently at another batch size, hence +-1 in 8-bit pixels)
    again = tmp_path / "again"
    assert _main(["generate", "--model", str(chat_model_dir), "--prompt", "a red circle", "--prompt",
                  "a <image_gen_start> square", "-n", "2", "--seed", "5", "--batch-size", "1", "--out",
                  str(again)]) == 0
    for r in rows:
        a, b = (np.asarray(Image.open(d / r["file"]), dtype=np.int16) for d in (again, out))
        assert np.abs(a - b).max() <= 1


def test_chat_one_shot_saves_the_image_and_prints_its_path(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "chat"
    # seeded: the unseeded default draws other image codes each run, and the text after them can change
    assert _main(["chat", "--model", str(chat_model_dir), "--out", str(out), "--seed", "0",
                  "please draw a red circle"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("here") and "and more" in printed
    assert f"[image: {out / 'image_0000.png'}]" in printed and (out / "image_0000.png").is_file()


def test_chat_repl_attaches_images_and_keeps_history(chat_model_dir, tmp_path, capsys, monkeypatch):
    picture = tmp_path / "in.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(picture)
    script = (f"/image {tmp_path / 'missing.png'}\n/image {picture}\nplease draw a red circle\n"
              "please draw a red circle\n/bogus\n/reset\n/quit\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    out = tmp_path / "repl"
    assert _main(["chat", "--model", str(chat_model_dir), "--out", str(out), "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "not found" in captured.err and captured.err.count("\n") == 1  # the REPL survives a bad /image
    assert f"[attached {picture}]" in captured.out and "unknown command /bogus" in captured.out
    assert "[conversation cleared]" in captured.out
    assert (out / "image_0000.png").is_file()  # first reply drew an image; the second turn ran on the history


def test_errors_are_one_line_with_status_2(chat_model_dir, tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", _module(), "chat", "--model", str(chat_model_dir), "--image",
                          str(tmp_path / "nope.png"), "--out", str(tmp_path / "o"), "what is this"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "nope.png" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad_prompts = tmp_path / "empty.txt"
    bad_prompts.write_text("\n  \n")
    model = ["--model", str(chat_model_dir)]
    cases = {
        "not a folder": ["generate", *model, "--prompt", "a", "--out", str(blocker / "sub")],
        "no prompts": ["generate", *model, "--prompts-file", str(bad_prompts), "--out", str(tmp_path / "g")],
        "cannot read the prompts file": ["generate", *model, "--prompts-file", str(tmp_path / "x.txt"),
                                         "--out", str(tmp_path / "g")],
        "empty message": ["chat", *model, "--out", str(tmp_path / "c"), " "],
        "context holds": ["chat", *model, "--out", str(tmp_path / "c"), "draw a red circle " * 400],
        "cfg": ["generate", *model, "--prompt", "a", "--cfg", "-1", "--out", str(tmp_path / "g")],
        "checkpoint": ["chat", "--model", str(tmp_path), "hi"],
    }
    for needle, argv in cases.items():
        assert _main(argv) == 2, needle
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and err.count("\n") == 1, (needle, err)
    assert not (tmp_path / "g").exists() and not (tmp_path / "c").exists()  # nothing written on failure


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        _main([command, "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
