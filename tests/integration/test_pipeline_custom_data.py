"""`vargpt pipeline --smoke` end to end on made-up data unlike ShapesWorld (stripes and gradients).

The dataset is written here in the README's native JSONL format: non-square images, captions and QA
about stripe direction and colour, generation records (``<image_gen>``) with prompts, some with a
``class`` and some without (and a variant with no class at all), free-form ``meta``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vargpt.recipe import PLAN, STEPS, run_recipe

COLOURS = {"crimson": (200, 20, 60), "teal": (0, 128, 128), "gold": (230, 180, 0), "navy": (20, 20, 110)}
PATTERNS = ("horizontal stripes", "vertical stripes", "gradient")


def draw(pattern: str, colour: str, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A non-square picture of stripes (every 8 px, 4 px wide) or a left-to-right gradient."""
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    d, c = ImageDraw.Draw(img), COLOURS[colour]
    if pattern == "horizontal stripes":
        for y in range(0, h, 8):
            d.rectangle([0, y, w, y + 3], fill=c)
    elif pattern == "vertical stripes":
        for x in range(0, w, 8):
            d.rectangle([x, 0, x + 3, h], fill=c)
    else:
        for x in range(w):
            t = x / (w - 1)
            d.line([x, 0, x, h], fill=tuple(round(255 * (1 - t) + v * t) for v in c))
    return img


def write_stripes(root: Path, *, classes: bool, n_train: int = 24, n_test: int = 8) -> Path:
    """The made-up dataset: per image a caption, two questions and (every other image) a generation record."""
    combos = [(p, c) for p in PATTERNS for c in COLOURS]
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            pattern, colour = combos[(5 * i + (split == "test")) % len(combos)]
            kind = "gradient" if pattern == "gradient" else "stripes"
            rel = f"images/{split}/{i:03d}.png"
            draw(pattern, colour).save(root / rel)
            records += [
                {"messages": [{"role": "user", "content": "<image>\nDescribe the picture."},
                              {"role": "assistant", "content": f"A {colour} {pattern} pattern."}],
                 "images": [rel]},
                {"messages": [{"role": "user", "content": "<image>\nWhich colour dominates?"},
                              {"role": "assistant", "content": colour}],
                 "images": [rel], "meta": {"qtype": "colour", "objects": [colour]}},  # not ShapesWorld objects
                {"messages": [{"role": "system", "content": "You look at patterns."},
                              {"role": "user", "content": "Are these stripes or a gradient?\n<image>"},
                              {"role": "assistant", "content": kind}],
                 "images": [rel], "meta": {"qtype": "pattern"}},
            ]
            if i % 2 == 0:
                gen = {"messages": [{"role": "user", "content": f"Paint {colour} {pattern}, please."},
                                    {"role": "assistant", "content": f"Sure, {colour} {pattern}:<image_gen>"}],
                       "images": [rel], "meta": {"task": "paint"}}
                if classes and i % 4 == 0:
                    gen["class"] = f"{colour} {kind}"
                records.append(gen)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    data = write_stripes(root / "data", classes=True)
    metrics = run_recipe(out_dir=root / "run", data_dir=data, smoke=True, progress=False, workers=2)
    return root, data, metrics


def _markers(run: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run / "steps").glob("*.json")}


def test_independent_steps_ran_side_by_side(smoke_run):
    """workers=2: the middle phase's two lanes ran in two processes of their own, the rest here."""
    root, _, m = smoke_run
    markers, here = _markers(root / "run"), os.getpid()
    lanes = next(phase for phase in PLAN if len(phase) == 2)
    pids = []
    for i, lane in enumerate(lanes):
        assert {markers[n]["lane"] for n in lane} == {i}
        assert {markers[n]["threads"] for n in lane} == {max(1, torch.get_num_threads() // 2)}
        (pid,) = {markers[n]["pid"] for n in lane}
        pids.append(pid)
    assert len({*pids, here}) == 3
    alone = [n for phase in PLAN if len(phase) == 1 for n in phase[0]]
    assert {markers[n]["pid"] for n in alone} == {here} and {markers[n]["lane"] for n in alone} == {None}
    serial_sum = sum(m["steps"].values())
    assert m["total_wall_seconds"] < serial_sum  # the lanes' time overlaps
    assert m["step_threads"]["eval"] == torch.get_num_threads()


def test_a_failing_lane_stops_the_run_with_its_error(tmp_path):
    """A step failing in a lane is raised here (the user error itself), and no lane process is left."""
    import multiprocessing

    from vargpt.training.checkpoint import CheckpointError

    data = write_stripes(tmp_path / "data", classes=True, n_train=8, n_test=4)
    run = tmp_path / "run"
    run_recipe(out_dir=run, data_dir=data, smoke=True, progress=False, only=["data", "tokenizer"])
    for f in (run / "tokenizer_main").iterdir():  # the codes' checkpoint is gone: the lanes cannot go on
        f.unlink()
    with pytest.raises(CheckpointError):
        run_recipe(out_dir=run, data_dir=data, smoke=True, progress=False, workers=2)
    assert not multiprocessing.active_children()
    assert not (run / "steps" / "assemble.json").exists()
    # Any other failure comes back as a RuntimeError naming the step, with the lane's traceback.
    run_recipe(out_dir=run / "again", data_dir=data, smoke=True, progress=False, only=["data", "tokenizer"])
    with pytest.raises(RuntimeError, match=r"step 'llm' failed in its lane: TypeError(.|\n)*Traceback"):
        run_recipe(out_dir=run / "again", data_dir=data, smoke=True, progress=False, workers=2,
                   step_overrides={"llm": {"seq_len": "long"}})
    assert not multiprocessing.active_children()


def test_smoke_pipeline_on_custom_data(smoke_run):
    root, data, m = smoke_run
    run = root / "run"
    assert json.loads((run / "metrics.json").read_text())["understanding_accuracy"] == m["understanding_accuracy"]
    assert m["smoke"] is True and set(m["steps"]) == {s.name for s in STEPS}
    acc = m["understanding_accuracy"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert m["generation_accuracy"] is None  # no ShapesWorld oracle for this data
    ev = m["results"]["eval"]
    if m["fid"] is None:
        assert ev["fid_note"], "a null FID must say why"
    else:
        assert math.isfinite(m["fid"]) and ev["fid_n_generated"] == 2
    assert ev["generation_n_images"] == 2 and ev["understanding_n"] == 8
    assert (run / "report.html").stat().st_size > 1000 and not (data / "world.json").exists()
    # the data step checks every record; later steps read a stratified copy (here all of it: small data)
    assert m["results"]["data"]["records"] == m["results"]["data"]["smoke_subset"] == {"train": 84, "test": 28}
    assert (run / "smoke_data" / "images" / "train" / "000.png").is_file()
    dec = m["results"]["decoder"]
    assert dec["classes"] == 2 and dec["steps"] == 3  # "crimson stripes", "teal stripes" in train
    assert dec["unconditional_train_images"] == 0
    assert all(m["results"][f"stage{n}"]["steps"] == 3 for n in (1, 2, 3))


def test_final_model_answers_and_generates(smoke_run):
    from vargpt.config import SamplingConfig
    from vargpt.generation.pipeline import Pipeline

    root, data, _ = smoke_run
    pipe = Pipeline.from_pretrained(root / "run" / "final")
    (answer,) = pipe.answer([Image.open(data / "images" / "test" / "000.png")], ["Which colour dominates?"],
                            max_new_tokens=4)
    assert isinstance(answer, str)
    (img,) = pipe.generate_images(["Paint teal vertical stripes, please."], sampling=SamplingConfig(seed=0))
    assert img.image.size == (32, 32)


def test_rerun_skips_finished_steps(smoke_run):
    root, data, first = smoke_run
    markers = {p.name: p.stat().st_mtime_ns for p in (root / "run" / "steps").glob("*.json")}
    assert len(markers) == len(STEPS)
    again = run_recipe(out_dir=root / "run", data_dir=data, smoke=True, progress=False)  # nothing retrains:
    assert {p.name: p.stat().st_mtime_ns for p in (root / "run" / "steps").glob("*.json")} == markers
    assert again["steps"] == first["steps"] and again["fid"] == first["fid"]
    with pytest.raises(ValueError, match="smoke"):  # a full run may not reuse smoke steps
        run_recipe(out_dir=root / "run", data_dir=data, smoke=False, progress=False)


def test_smoke_pipeline_without_any_class(tmp_path):
    data = write_stripes(tmp_path / "data", classes=False, n_train=12, n_test=6)
    m = run_recipe(out_dir=tmp_path / "run", data_dir=data, smoke=True, progress=False, workers=1,
                   step_overrides={"decoder": {"max_steps": 2}, "stage3": {"max_steps": 4, "lr": 1e-9}})
    assert set(m["steps"]) == {s.name for s in STEPS}
    r = m["results"]  # the overrides reach their step only, over smoke mode's 3 steps
    assert (r["decoder"]["steps"], r["stage3"]["steps"], r["stage1"]["steps"], r["stage2"]["steps"]) == (2, 4, 3, 3)
    def lrs(stage):  # noqa: E306 - the learning rates a stage's log shows
        lines = (tmp_path / "run" / stage / "train" / "log.jsonl").read_text().splitlines()
        return [e["lr"] for e in map(json.loads, lines) if "lr" in e]
    assert lrs("stage3") and max(lrs("stage3")) <= 1e-9 < max(lrs("stage2"))  # a TrainConfig field of one stage
    markers = _markers(tmp_path / "run")  # one worker: every step here, one after another
    assert {v["pid"] for v in markers.values()} == {os.getpid()} and {v["lane"] for v in markers.values()} == {None}
    assert m["total_wall_seconds"] == pytest.approx(sum(m["steps"].values()), abs=0.05)
    dec = m["results"]["decoder"]
    assert dec["classes"] == 0 and dec["unconditional_train_images"] == dec["train_images"] == 12
    assert m["results"]["stage1"]["train_records"] == 6  # no class prompts: every generation record
    assert m["generation_accuracy"] is None and 0.0 <= m["understanding_accuracy"] <= 1.0
    assert (tmp_path / "run" / "report.html").is_file()


def test_cli_has_smoke():
    from vargpt.cli import build_parser

    a = build_parser().parse_args(["pipeline", "--out", "o", "--data", "d", "--smoke"])
    assert a.smoke is True
    assert build_parser().parse_args(["pipeline", "--out", "o"]).smoke is False


def test_smoke_subset_keeps_every_kind_of_record(tmp_path):
    from vargpt.data.records import load_records
    from vargpt.recipe import _write_subset

    data = write_stripes(tmp_path / "data", classes=True, n_train=8, n_test=2)  # 24 QA/captions, 2+2 generation
    assert _write_subset(load_records(data, "train"), data, tmp_path / "sub", "train", 10) == 10
    kinds = [(r.is_generation, r.cls is not None) for r in load_records(tmp_path / "sub", "train")]
    assert kinds.count((True, True)) == 2 and kinds.count((True, False)) == 2 and kinds.count((False, False)) == 6
