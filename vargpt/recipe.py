"""The end-to-end recipe behind ``vargpt pipeline`` / ``make demo``: every step from data to metrics.

Steps run in order; each writes its outputs under the run folder and, when it finishes, a marker
``RUN/steps/<name>.json`` holding its result and wall time. A rerun skips finished steps, so an
interrupted run resumes at the step it was in. ``RUN/metrics.json`` gathers every step's numbers.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every step receives."""

    out: Path
    preset: str
    data_dir: Path
    seed: int
    progress: bool


@dataclass(frozen=True)
class Step:
    """One resumable step: ``fn(ctx) -> dict`` of results (JSON-serialisable)."""

    name: str
    fn: Callable[[RunContext], dict[str, Any]]
    description: str


def _step_data(ctx: RunContext) -> dict[str, Any]:
    from vargpt.data.records import load_records
    from vargpt.data.shapesworld import write_dataset

    if (ctx.data_dir / "train.jsonl").is_file():  # user data, or ShapesWorld from an earlier run
        return {"records": {s: len(load_records(ctx.data_dir, s)) for s in ("train", "test")}}
    return write_dataset(ctx.data_dir, n_train=4000, n_test=400, seed=ctx.seed, progress=ctx.progress)


def _step_samples(ctx: RunContext) -> dict[str, Any]:
    from vargpt.data.records import load_image, load_records, unique_images
    from vargpt.evaluation.report import contact_sheet

    records = load_records(ctx.data_dir, "test")
    paths = unique_images(records)[:32]
    captions = {}
    for r in records:
        for p in r.images:
            captions.setdefault(p, r.messages[-1].content[:40])
    sheet = contact_sheet([load_image(p) for p in paths], [captions[p] for p in paths], columns=8)
    sheet.save(ctx.out / "samples.png")
    return {"samples": str(ctx.out / "samples.png"), "n": len(paths)}


STEPS: tuple[Step, ...] = (
    Step("data", _step_data, "dataset (ShapesWorld is generated when no --data is given)"),
    Step("samples", _step_samples, "contact sheet of held-out images"),
)
"""The recipe, in order."""


def run_recipe(
    *, out_dir: str | Path, preset: str = "tiny", data_dir: str | Path | None = None, seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every step of the recipe and write ``out_dir/metrics.json``.

    Args:
        out_dir: run folder; finished steps found there are skipped.
        preset: config preset name.
        data_dir: a dataset in the README format; ``None`` generates ShapesWorld under ``out_dir/data``.
        seed: seed of every step.
        progress: show progress bars.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    from vargpt.config import VARGPTConfig

    VARGPTConfig.from_name(preset)  # fail fast on an unknown preset
    out = Path(out_dir)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out=out, preset=preset, data_dir=Path(data_dir) if data_dir else out / "data",
                     seed=seed, progress=progress)
    t_start = time.perf_counter()
    steps: dict[str, Any] = {}
    for step in STEPS:
        marker = out / "steps" / f"{step.name}.json"
        if marker.is_file():
            steps[step.name] = json.loads(marker.read_text())
            logger.info("step %-10s already done (%.1f s), skipped", step.name, steps[step.name]["wall_seconds"])
            continue
        logger.info("step %-10s %s", step.name, step.description)
        t0 = time.perf_counter()
        result = step.fn(ctx)
        steps[step.name] = {"result": result, "wall_seconds": round(time.perf_counter() - t0, 2)}
        marker.write_text(json.dumps(steps[step.name], indent=2, default=str) + "\n")
    metrics = _collect_metrics(steps, preset=preset, seed=seed,
                               total=round(time.perf_counter() - t_start, 2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _collect_metrics(steps: dict[str, Any], *, preset: str, seed: int, total: float) -> dict[str, Any]:
    import torch

    import vargpt

    return {
        "preset": preset,
        "seed": seed,
        "steps": {k: v["wall_seconds"] for k, v in steps.items()},
        "results": {k: v["result"] for k, v in steps.items()},
        "total_wall_seconds_this_invocation": total,
        "total_wall_seconds": round(sum(v["wall_seconds"] for v in steps.values()), 2),
        "versions": {"vargpt": vargpt.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
