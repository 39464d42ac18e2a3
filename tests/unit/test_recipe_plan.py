"""The recipe's plan: every step once, each after the steps whose outputs it reads."""

from __future__ import annotations

import pytest

from vargpt.config import ConfigError
from vargpt.recipe import (
    PLAN,
    STEP_BY_NAME,
    STEPS,
    Step,
    _critical_wall_seconds,
    check_plan,
    group_lanes,
    override_names,
    run_recipe,
)


def test_the_recipe_plan_is_valid():
    check_plan()
    assert [s.name for s in STEPS] == [n for phase in PLAN for lane in phase for n in lane]
    assert all(dep in STEP_BY_NAME for s in STEPS for dep in s.after)
    # the two side-by-side chains of the middle phase read nothing of each other
    (a, b) = next(phase for phase in PLAN if len(phase) == 2)
    assert not {d for n in a for d in STEP_BY_NAME[n].after} & set(b)
    assert not {d for n in b for d in STEP_BY_NAME[n].after} & set(a)


def _steps(*spec: tuple[str, tuple[str, ...]]) -> tuple[Step, ...]:
    return tuple(Step(name, lambda ctx: {}, name, after=after) for name, after in spec)


def test_check_plan_rejects_bad_plans():
    steps = _steps(("a", ()), ("b", ("a",)), ("c", ("a",)), ("d", ("b", "c")))
    check_plan(((("a",),), (("b",), ("c",)), (("d",),)), steps)
    with pytest.raises(ValueError, match="exactly once"):
        check_plan(((("a",),), (("b",), ("c",))), steps)
    with pytest.raises(ValueError, match="'b' reads"):  # b before a, in one lane
        check_plan(((("b", "a"),), (("c", "d"),)), steps)
    with pytest.raises(ValueError, match="'d' reads"):  # d beside the lane of b, which it reads
        check_plan(((("a",),), (("b",), ("c", "d"))), steps)


def test_a_phase_never_starts_more_lane_processes_than_workers():
    lanes = [["a", "b"], ["c"], ["d", "e"]]
    assert group_lanes(lanes, 2) == [["a", "b", "d", "e"], ["c"]]
    assert group_lanes(lanes, 3) == lanes
    assert group_lanes(lanes, 8) == lanes  # never more processes than lanes either
    assert group_lanes(lanes, 1) == [["a", "b", "c", "d", "e"]]
    for workers in (1, 2, 3):  # every step once, each lane whole and in its order inside one group
        groups = group_lanes(lanes, workers)
        assert sorted(n for g in groups for n in g) == sorted(n for lane in lanes for n in lane)
        for lane in lanes:
            (g,) = [g for g in groups if lane[0] in g]
            assert g[g.index(lane[0]):g.index(lane[0]) + len(lane)] == lane
    with pytest.raises(ValueError, match="workers=0"):
        group_lanes(lanes, 0)


def test_wall_time_of_side_by_side_lanes_is_the_longest_lane():
    first, middle, last = PLAN
    steps = {n: {"wall_seconds": 1.0, "lane": None} for n in first[0]}
    steps |= {n: {"wall_seconds": 10.0, "lane": 0} for n in middle[0]}
    steps |= {n: {"wall_seconds": 1.0, "lane": 1} for n in middle[1]}
    steps |= {n: {"wall_seconds": 2.0, "lane": None} for n in last[0]}
    expected = len(first[0]) + max(10.0 * len(middle[0]), len(middle[1])) + 2.0 * len(last[0])
    assert _critical_wall_seconds(steps) == expected
    serial = {n: {"wall_seconds": 1.0} for n in STEP_BY_NAME}  # markers of one worker: plain sum
    assert _critical_wall_seconds(serial) == len(STEPS)


def test_step_overrides_are_checked_before_any_step_runs(tmp_path):
    """A misspelt ``--set`` fails at once with what the step takes, not when its turn comes minutes later."""
    assert {"max_steps", "batch_size"} <= override_names(STEP_BY_NAME["decoder"])
    assert {"lr", "max_steps", "max_eval", "image_min_scale_share"} <= override_names(STEP_BY_NAME["stage3"])
    assert {"n_train", "n_test"} <= override_names(STEP_BY_NAME["data"])
    assert {"finetune_steps"} <= override_names(STEP_BY_NAME["tokenizer_finetune"])
    assert override_names(STEP_BY_NAME["assemble"]) == frozenset()
    for step in STEPS:  # the run's own folders, preset and seed are never a step's override
        assert not {"out_dir", "data_dir", "preset", "seed", "progress", "resume"} & override_names(step)
    cases = [({"stage3": {"learning_rate": 1e-3}}, r"'stage3'.*\['learning_rate'\].*choose from .*'lr'"),
             ({"decoder": {"max_steps": 5, "lr": 1e-3}}, r"'decoder'.*\['lr'\]"),
             ({"assemble": {"seed": 1}}, r"'assemble'.*takes no overrides"),
             ({"stage3": {"out_dir": "x"}}, r"'stage3'.*\['out_dir'\]"),
             # values too, where they are TrainConfig fields
             ({"stage3": {"lr": -1.0}}, r"'stage3'.*lr.*-1.0.*must be > 0"),
             ({"stage3": {"lr": "fast"}}, r"'stage3'.*lr='fast' has the wrong type.*takes float"),
             ({"decoder": {"max_steps": -5}}, r"'decoder'.*max_steps=-5: must be a positive")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_recipe(out_dir=tmp_path / "run", smoke=True, progress=False, step_overrides=overrides)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
