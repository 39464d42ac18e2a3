"""``vargpt ablate``: the paper's Table 4 pattern (which training stages matter) at any preset's scale.

Every variant is a chain of stage runs starting from the recipe's assembled ``stage0`` model, written
as data (:data:`VARIANTS`); a stage run is a recipe stage (:func:`vargpt.training.stages.vargpt_stages`),
optionally with its trainable parameters overridden (``train_stage(trainable=...)``):

| variant | chain | differs from ``full`` |
|---|---|---|
| ``full`` | stage1 -> stage2 -> stage3 | |
| ``no_stage1`` | stage2 -> stage3 | no generation-projector pre-training |
| ``no_stage3`` | stage1 -> stage2 | no generation instruction tuning (full's stage-2 model, evaluated directly) |
| ``frozen_gen_projectors`` | stage1 -> stage2 -> stage3 (its decoder globs only) | stage 3 keeps the gen projectors |
| ``frozen_decoder`` | stage1 -> stage2 -> stage3 (its projector globs only) | stage 3 keeps the visual decoder |

The two frozen variants split the preset's own stage-3 trainable set (``StageRun.without``), so together
they train exactly what ``full``'s stage 3 trains, whatever the preset freezes there (``tiny`` keeps the
decoder's embeddings and the input projector frozen in every stage-3 run).

Identical chain prefixes are trained once and shared (five variants, seven stage runs instead of
thirteen): ``OUT/stages/<tag+tag+...>/`` holds each trained prefix (a ``train_stage`` output folder),
e.g. ``OUT/stages/stage1+stage2`` is the stage-2 input of three variants and the ``no_stage3`` model.

Layout of ``OUT``: ``settings.json`` (what the folder was run with; a rerun with other settings is an
error), ``stages/``, ``variants/<name>/eval.json`` (+ ``eval.html``: :func:`vargpt.evaluation.run.evaluate_model`
with a pinned seed and the run's feature net for FID), ``ablation.json`` and ``ablation.md`` (the
table). Everything is resumable: finished stage runs (``metrics.json`` present) and evaluations
(``eval.json`` present) are skipped; an interrupted stage run resumes from its checkpoint.

The shared prefix (data ... ``assemble``, plus ``feature_net`` for FID) is the recipe's own
(:func:`vargpt.recipe.run_recipe` with ``only=``): ``OUT/run`` by default, or an existing
``vargpt pipeline`` run folder given as ``from_run`` (its finished steps are reused, missing ones run).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from vargpt.config import ConfigError
from vargpt.files import write_json_atomic
from vargpt.recipe import STEPS
from vargpt.training.stages import vargpt_stages

logger = logging.getLogger(__name__)

__all__ = ["StageRun", "Variant", "VARIANTS", "UNTIL_ASSEMBLE", "PREFIX_STEPS", "plan", "chain_key", "run_ablation",
           "markdown_table", "ablation_command"]


@dataclass(frozen=True)
class StageRun:
    """One stage of a variant: a recipe stage, optionally with its trainable globs overridden."""

    tag: str
    """Folder-name piece; unique per (stage, trainable)."""
    stage: str
    """``stage1`` | ``stage2`` | ``stage3`` (its data, loss weights and optimiser are the recipe's)."""
    trainable: tuple[str, ...] | None = None
    """Parameter globs that train instead of the stage's own (None = the stage's own)."""
    without: tuple[str, ...] = ()
    """Patterns (:func:`fnmatch.fnmatchcase`) of the stage's own trainable globs to leave out: with
    ``("vargpt_gen.*",)`` every decoder glob of the preset's stage freezes, whatever it lists."""

    def __post_init__(self) -> None:
        if self.trainable is not None and self.without:
            raise ConfigError(f"ablation stage run {self.tag!r}: give trainable or without, not both")

    def resolve_trainable(self, preset: str) -> tuple[str, ...] | None:
        """The globs this run trains at ``preset`` (None = the stage's own, unchanged).

        Raises:
            ConfigError: ``without`` leaves none of the stage's globs (or the preset is unknown).
        """
        if not self.without:
            return self.trainable
        own = vargpt_stages(preset)[self.stage].train.trainable
        kept = tuple(g for g in own if not any(fnmatchcase(g, p) for p in self.without))
        if not kept:
            raise ConfigError(f"ablation stage run {self.tag!r}: leaving out {list(self.without)} from "
                              f"{self.stage}'s trainable {list(own)} at preset {preset!r} leaves nothing to train")
        return kept


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: a chain of stage runs from ``stage0``."""

    name: str
    label: str
    stages: tuple[StageRun, ...]
    description: str = ""


STAGE1 = StageRun("stage1", "stage1")
STAGE2 = StageRun("stage2", "stage2")
STAGE3 = StageRun("stage3", "stage3")
STAGE3_DECODER_ONLY = StageRun("stage3_decoder_only", "stage3", without=("image_gen_projector*",))
"""Stage 3 with frozen generation projectors: only the stage's visual-decoder globs train."""
STAGE3_PROJECTORS_ONLY = StageRun("stage3_projectors_only", "stage3", without=("vargpt_gen.*",))
"""Stage 3 with a frozen visual decoder: only the stage's generation-projector globs train."""

VARIANTS: tuple[Variant, ...] = (
    Variant("full", "full (stage 1 -> 2 -> 3)", (STAGE1, STAGE2, STAGE3), "the recipe's three stages"),
    Variant("no_stage1", "w/o stage 1", (STAGE2, STAGE3), "stage0 -> stage2 -> stage3"),
    Variant("no_stage3", "w/o stage 3", (STAGE1, STAGE2), "full's stage-2 model, evaluated directly"),
    Variant("frozen_gen_projectors", "stage 3, frozen gen projectors", (STAGE1, STAGE2, STAGE3_DECODER_ONLY),
            "stage 3 trains only its visual-decoder parameters"),
    Variant("frozen_decoder", "stage 3, frozen visual decoder", (STAGE1, STAGE2, STAGE3_PROJECTORS_ONLY),
            "stage 3 trains only its generation-projector parameters"),
)
"""The ablation's variants (paper Table 4 pattern), in table order."""

UNTIL_ASSEMBLE: tuple[str, ...] = tuple(s.name for s in STEPS[:[s.name for s in STEPS].index("assemble") + 1])
"""The recipe's steps up to ``assemble`` (the ``stage0`` model every variant starts from)."""
PREFIX_STEPS: tuple[str, ...] = tuple(dict.fromkeys((*UNTIL_ASSEMBLE, "feature_net")))
"""Recipe steps every variant shares: :data:`UNTIL_ASSEMBLE` and the FID feature net."""


def chain_key(chain: Sequence[StageRun]) -> str:
    """Folder name of a trained chain prefix under ``OUT/stages``."""
    return "+".join(s.tag for s in chain)


def plan(variants: Sequence[Variant] = VARIANTS) -> list[tuple[StageRun, ...]]:
    """The distinct chain prefixes to train, each after its parent (shared prefixes appear once)."""
    tags: dict[str, StageRun] = {}
    out: dict[str, tuple[StageRun, ...]] = {}
    for v in variants:
        if not v.stages:
            raise ConfigError(f"ablation variant {v.name!r} has no stages")
        for s in v.stages:
            if tags.setdefault(s.tag, s) != s:
                raise ConfigError(f"ablation stage tag {s.tag!r} names two different stage runs")
        for k in range(1, len(v.stages) + 1):
            out.setdefault(chain_key(v.stages[:k]), v.stages[:k])
    return list(out.values())


def ablation_command(*, out_dir: str | Path, preset: str = "tiny", data_dir: str | Path | None = None,
                     from_run: str | Path | None = None, max_steps: int | None = None, seed: int = 0,
                     max_understanding: int | None = 500, max_generation: int | None = 64) -> str:
    """The ``vargpt ablate`` command line equivalent to these arguments (defaults left out)."""
    argv = ["vargpt", "ablate", "--preset", preset, "--out", str(out_dir)]
    for flag, value, default in (("--data", data_dir, None), ("--from-run", from_run, None),
                                 ("--max-steps", max_steps, None), ("--seed", seed, 0),
                                 ("--max-understanding", max_understanding, 500),
                                 ("--max-generation", max_generation, 64)):
        if value != default:
            argv += [flag, str(value)]
    return shlex.join(argv)


def _fmt(x: Any, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """``variant | understanding | generation colour+shape | generation colour | FID | train seconds`` as a
    markdown table."""
    lines = ["| variant | understanding | generation colour+shape | generation colour | FID | train seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r['understanding_accuracy'], 3)} | "
                     f"{_fmt(r['generation_accuracy'], 3)} | {_fmt(r.get('generation_colour'), 3)} | "
                     f"{_fmt(r['fid'], 1)} | {_fmt(r['train_seconds'], 1)} |")
    return "\n".join(lines) + "\n"


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if diff:
            raise ConfigError(f"{out} holds an ablation run with other settings ({', '.join(diff)}: "
                              f"{[old.get(k) for k in diff]} there, {[settings.get(k) for k in diff]} now); "
                              "rerun with the same settings to resume, or choose another --out")
    else:
        write_json_atomic(path, settings)


def run_ablation(
    *, out_dir: str | Path, preset: str = "tiny", data_dir: str | Path | None = None,
    from_run: str | Path | None = None, max_steps: int | None = None, seed: int = 0,
    max_understanding: int | None = 500, max_generation: int | None = 64,
    variants: Sequence[Variant] = VARIANTS, progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every variant (see module docstring); write ``ablation.json`` / ``ablation.md``.

    Args:
        out_dir: ablation folder (resumable; a rerun with other settings, the stage runs' resolved trainable
            globs included, is a ``ConfigError``).
        preset: config and stage preset.
        data_dir: dataset in the README format; None = the run's ``data/`` (ShapesWorld, generated if absent).
        from_run: a ``vargpt pipeline`` run folder whose steps up to ``assemble`` (and ``feature_net``) are
            reused (missing ones are run there); None = run them under ``out_dir/run``.
        max_steps: optimiser steps of every stage run (None = the stage recipe's).
        seed: seed of the recipe prefix, every stage run and every evaluation (sampling and FID subset).
        max_understanding / max_generation: evaluation sizes (``evaluate_model``).
        variants: which variants (default :data:`VARIANTS`).
        progress: progress bars.

    Returns:
        The ``ablation.json`` dict: ``{"variants": [{"name", "label", "stages", "model",
        "understanding_accuracy", "generation_accuracy", "generation_colour", "fid", "fid_reference",
        "train_seconds", ...}],
        "stages": {key: stage metrics}, "table", "command", ...}``. A variant's ``train_seconds`` is the
        sum of its chain's stage training loops (shared prefixes count in every variant using them).
    """
    from vargpt.evaluation.run import evaluate_model
    from vargpt.recipe import run_recipe
    from vargpt.training.vargpt_trainer import train_stage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(from_run) if from_run is not None else out / "run"
    data = Path(data_dir) if data_dir is not None else run / "data"
    command = ablation_command(out_dir=out_dir, preset=preset, data_dir=data_dir, from_run=from_run,
                               max_steps=max_steps, seed=seed, max_understanding=max_understanding,
                               max_generation=max_generation)
    nodes = plan(variants)  # validates the variants before any work
    trainable = {chain_key(c): c[-1].resolve_trainable(preset) for c in nodes}
    # The resolved globs are part of the settings: a folder made under another recipe's stage-3 set is refused
    # rather than resumed with stage runs that trained other parameters.
    _check_settings(out, {"preset": preset, "run": str(run.resolve()), "data": str(data.resolve()),
                          "max_steps": max_steps, "seed": seed, "max_understanding": max_understanding,
                          "max_generation": max_generation,
                          "trainable": {k: None if v is None else list(v) for k, v in trainable.items()}})

    logger.info("ablation: shared recipe prefix (%s) in %s", ", ".join(PREFIX_STEPS), run)
    run_recipe(out_dir=run, preset=preset, data_dir=data_dir, seed=seed, progress=progress, only=PREFIX_STEPS)
    if not (data / "train.jsonl").is_file():
        raise ConfigError(f"no dataset at {data} (the run was made with --data elsewhere?); pass --data DIR")
    stage0 = run / "stage0"

    from vargpt.data.datasets import EncoderCache

    cache = EncoderCache()  # every variant's stages encode the same images with stage0's frozen encoders
    stages: dict[str, dict[str, Any]] = {}
    for chain in nodes:
        key, node = chain_key(chain), out / "stages" / chain_key(chain)
        parent = out / "stages" / chain_key(chain[:-1]) if len(chain) > 1 else stage0
        if (node / "metrics.json").is_file():  # written last by train_stage: the run finished
            logger.info("ablation: %s already trained, skipped", key)
            metrics = json.loads((node / "metrics.json").read_text())
        else:
            logger.info("ablation: training %s from %s", key, parent)
            s = chain[-1]
            metrics = train_stage(s.stage, from_dir=parent, data_dir=data, out_dir=node, preset=preset,
                                  max_steps=max_steps, trainable=trainable[key], resume=True, seed=seed,
                                  progress=progress, encoder_cache=cache)
        stages[key] = {"from": str(parent), **metrics}

    rows = []
    for v in variants:
        keys = [chain_key(v.stages[:k]) for k in range(1, len(v.stages) + 1)]
        model = out / "stages" / keys[-1] / "model"
        eval_json = out / "variants" / v.name / "eval.json"
        if eval_json.is_file():
            logger.info("ablation: %s already evaluated, skipped", v.name)
            ev = json.loads(eval_json.read_text())
        else:
            logger.info("ablation: evaluating %s (%s)", v.name, model)
            ev = evaluate_model(model, data, out=eval_json, feature_net=run / "feature_net", seed=seed,
                                max_understanding=max_understanding, max_generation=max_generation)
        rows.append({
            "name": v.name, "label": v.label, "description": v.description, "stages": keys, "model": str(model),
            "understanding_accuracy": ev["understanding_accuracy"], "generation_accuracy": ev["generation_accuracy"],
            "generation_colour": (ev.get("generation_per_attribute") or {}).get("colour"),
            "generation_seen": ev.get("generation_seen"), "generation_unseen": ev.get("generation_unseen"),
            "fid": ev["fid"], "fid_reference": ev.get("fid_reference"),
            "train_seconds": round(sum(stages[k]["train_seconds"] for k in keys), 2),
            "train_seconds_by_stage": {k: stages[k]["train_seconds"] for k in keys},
            "trainable": {k: stages[k].get("trainable") for k in keys},
            "eval": str(eval_json),
        })
    table = markdown_table(rows)
    refs = {r["fid_reference"] for r in rows if r["fid_reference"] is not None}
    notes = (f"FID floor (real vs real at the same sample count): {_fmt(min(refs), 1)}\n" if refs else "")
    result = {"preset": preset, "seed": seed, "max_steps": max_steps, "run": str(run), "data": str(data),
              "feature_net": str(run / "feature_net"), "command": command, "table": table, "variants": rows,
              "stages": stages}
    write_json_atomic(out / "ablation.json", result, default=str)
    (out / "ablation.md").write_text(f"{table}\n{notes}\nReproduce: `{command}`\n")
    return result
