"""The end-to-end recipe behind ``vargpt pipeline`` / ``make demo``: every step from data to metrics.

Steps run in order; each writes its outputs under the run folder and, when it finishes, a marker
``RUN/steps/<name>.json`` holding its result and wall time. A rerun skips finished steps, so an
interrupted run resumes at the step it was in. ``RUN/metrics.json`` gathers every step's numbers.

``smoke=True`` (``vargpt pipeline --smoke``) runs every step with a handful of optimiser steps
(:data:`SMOKE`) and evaluates a few samples: it checks that a dataset goes through every step in well
under a minute, not that anything is learnt. Without ``--data`` it generates a small ShapesWorld.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _encoder_cache() -> Any:
    from vargpt.data.datasets import EncoderCache  # torch-heavy: imported when a run starts

    return EncoderCache()


@dataclass(frozen=True)
class RunContext:
    """What every step receives."""

    out: Path
    preset: str
    data_dir: Path
    seed: int
    progress: bool
    smoke: bool = False
    user_data: Path | None = None
    """The user's dataset (never written to); None: ShapesWorld is generated at ``data_dir``. Steps read
    ``data_dir``: the user's dataset itself, or in smoke mode a small copy of it under ``out``."""

    encoder_cache: Any = field(default_factory=_encoder_cache)
    """A :class:`vargpt.data.datasets.EncoderCache` shared by the steps of one call (stages 1-3 encode the
    same images with the same frozen encoders)."""

    def limits(self, step: str) -> dict[str, Any]:
        """The keyword overrides of ``step`` in smoke mode (:data:`SMOKE`), else none."""
        return dict(SMOKE.get(step, {})) if self.smoke else {}


SMOKE: dict[str, dict[str, Any]] = {
    "data": {"n_train": 48, "n_test": 16},  # ShapesWorld size when no data is given
    "subset": {"train": 256, "test": 64},  # records of user data copied to OUT/smoke_data (stratified)
    "tokenizer": {"max_steps": 3, "batch_size": 8, "finetune_steps": 3},
    "llm": {"max_steps": 3, "batch_size": 4},
    "vision": {"max_steps": 3, "batch_size": 8},
    "align": {"max_steps": 3, "batch_size": 8},
    "instruct": {"max_steps": 3, "batch_size": 8},
    "decoder": {"max_steps": 3, "batch_size": 8},
    "stage": {"max_steps": 3, "batch_size": 4, "max_eval": 8},
    "feature_net": {"steps": 3, "batch_size": 8},
    "eval": {"max_understanding": 8, "max_generation": 2, "max_replies": 2, "batch_size": 8},
}
"""Smoke-mode overrides per step (keyword arguments of the step's trainer; "stage" is stage1-3)."""


@dataclass(frozen=True)
class Step:
    """One resumable step: ``fn(ctx) -> dict`` of results (JSON-serialisable)."""

    name: str
    fn: Callable[[RunContext], dict[str, Any]]
    description: str


def _step_data(ctx: RunContext) -> dict[str, Any]:
    import shutil

    from vargpt.data.records import load_records
    from vargpt.data.shapesworld import write_dataset

    if ctx.user_data is not None:
        # native JSONL or LLaVA JSON, every record checked: a missing split or bad record raises DatasetError
        splits = {s: load_records(ctx.user_data, s) for s in ("train", "test")}
        result: dict[str, Any] = {"records": {s: len(r) for s, r in splits.items()}}
        if ctx.data_dir != ctx.user_data:  # smoke mode: later steps read a small copy
            result["smoke_subset"] = {s: _write_subset(r, ctx.user_data, ctx.data_dir, s, ctx.limits("subset")[s])
                                      for s, r in splits.items()}
            for side in ctx.user_data.glob("*.json"):  # side files (e.g. ShapesWorld's world.json), not splits
                if side.stem not in splits:
                    shutil.copyfile(side, ctx.data_dir / side.name)
        return result
    if (ctx.data_dir / "train.jsonl").is_file():  # ShapesWorld from an earlier run
        return {"records": {s: len(load_records(ctx.data_dir, s)) for s in ("train", "test")}}
    sizes = {"n_train": 4000, "n_test": 400} | ctx.limits("data")
    return write_dataset(ctx.data_dir, **sizes, seed=ctx.seed, progress=ctx.progress)


def _write_subset(records: list[Any], src: Path, dst: Path, split: str, n: int) -> int:
    """Write at most ``n`` of ``records`` to ``dst/{split}.jsonl`` (native format) with their images.

    Stratified: records are grouped by kind (generation / understanding / other, with or without a
    class) and the groups share ``n`` equally (a small group leaves the rest of its share to the others),
    each giving evenly spaced records, so every kind of record reaches every step.
    """
    import shutil
    from collections import defaultdict

    chosen = list(records)
    if len(records) > n:
        groups: dict[tuple[bool, bool, bool], list[Any]] = defaultdict(list)
        for r in records:
            groups[(r.is_generation, r.is_understanding, r.cls is not None)].append(r)
        quota, left = {}, n
        for i, key in enumerate(sorted(groups, key=lambda k: len(groups[k]))):
            quota[key] = min(len(groups[key]), left // (len(groups) - i))
            left -= quota[key]
        chosen = [g[i * len(g) // quota[k]] for k, g in groups.items() for i in range(quota[k])]
    root = src.resolve()
    lines = []
    for r in chosen:
        obj = r.to_json(root)
        for q in obj["images"]:
            (dst / q).parent.mkdir(parents=True, exist_ok=True)
            if not (dst / q).is_file():
                shutil.copyfile(root / q, dst / q)
        lines.append(json.dumps(obj) + "\n")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return len(lines)


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


def _step_tokenizer(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.tokenizer_trainer import train_tokenizer

    return train_tokenizer(data_dir=ctx.data_dir, out_dir=ctx.out / "tokenizer", preset=ctx.preset, resume=True,
                           seed=ctx.seed, progress=ctx.progress, **ctx.limits("tokenizer"))


def _step_text_tokenizer(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_text import train_text_tokenizer

    return train_text_tokenizer(ctx.data_dir, ctx.out / "text_tokenizer", preset=ctx.preset)


def _step_llm(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_text import train_llm

    return train_llm(ctx.data_dir, ctx.out / "text_tokenizer", ctx.out / "llm", preset=ctx.preset,
                     progress=ctx.progress, **ctx.limits("llm"))


def _step_vision(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_vision import train_vision_tower

    return train_vision_tower(ctx.data_dir, ctx.out / "text_tokenizer", ctx.out / "vision", preset=ctx.preset,
                              progress=ctx.progress, **ctx.limits("vision"))


def _step_align(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_llava import train_alignment

    return train_alignment(ctx.data_dir, ctx.out / "llm", ctx.out / "vision", ctx.out / "llava_align",
                           preset=ctx.preset, progress=ctx.progress, **ctx.limits("align"))


def _step_instruct(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_llava import train_instruct

    return train_instruct(ctx.data_dir, ctx.out / "llava_align", ctx.out / "llava", preset=ctx.preset,
                          progress=ctx.progress, **ctx.limits("instruct"))


def _step_decoder(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.decoder_trainer import train_decoder

    return train_decoder(data_dir=ctx.data_dir, tokenizer_dir=ctx.out / "tokenizer", out_dir=ctx.out / "decoder",
                         preset=ctx.preset, resume=True, seed=ctx.seed, progress=ctx.progress,
                         **ctx.limits("decoder"))


def _step_assemble(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.assemble import assemble_vargpt

    return assemble_vargpt(llava_dir=ctx.out / "llava", vqvae_dir=ctx.out / "tokenizer",
                           decoder_dir=ctx.out / "decoder", out_dir=ctx.out / "stage0" / "model",
                           preset=ctx.preset, seed=ctx.seed)


def _stage(n: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        import shutil

        from vargpt.data.records import load_records
        from vargpt.training.stages import vargpt_stages
        from vargpt.training.vargpt_trainer import MODEL_SUBDIR, train_stage

        spec = vargpt_stages(ctx.preset)[f"stage{n}"]
        if not spec.select(load_records(ctx.data_dir, "train"), ctx.seed):
            # e.g. stages 1 and 3 on data without generation records: the model passes through unchanged
            dst = ctx.out / f"stage{n}" / MODEL_SUBDIR
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ctx.out / f"stage{n - 1}" / MODEL_SUBDIR, dst)
            logger.warning("stage%d skipped: the dataset has no records for it (%s)", n, spec.description)
            return {"stage": f"stage{n}", "skipped": f"no training records for this stage ({spec.description})"}
        return train_stage(f"stage{n}", from_dir=ctx.out / f"stage{n - 1}", data_dir=ctx.data_dir,
                           out_dir=ctx.out / f"stage{n}", preset=ctx.preset, resume=True, seed=ctx.seed,
                           progress=ctx.progress, encoder_cache=ctx.encoder_cache, **ctx.limits("stage"))

    return run


def _step_final(ctx: RunContext) -> dict[str, Any]:
    import shutil

    final = ctx.out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(ctx.out / "stage3" / "model", final)
    return {"model": str(final)}


def _step_feature_net(ctx: RunContext) -> dict[str, Any]:
    from vargpt.evaluation.feature_net import train_feature_net

    return train_feature_net(ctx.data_dir, ctx.out / "feature_net", seed=ctx.seed, progress=ctx.progress,
                             **ctx.limits("feature_net"))


def _step_eval(ctx: RunContext) -> dict[str, Any]:
    import shutil

    from vargpt.evaluation.run import evaluate_model

    curves = sorted(ctx.out.glob("*/train/loss.png")) + sorted(ctx.out.glob("*/loss.png"))
    result = evaluate_model(ctx.out / "final", ctx.data_dir, out=ctx.out / "eval" / "metrics.json",
                            feature_net=ctx.out / "feature_net", seed=ctx.seed, loss_curves=curves,
                            **ctx.limits("eval"))
    shutil.copyfile(ctx.out / "eval" / "metrics.html", ctx.out / "report.html")
    return {k: v for k, v in result.items() if k != "samples"}


STEPS: tuple[Step, ...] = (
    Step("data", _step_data, "dataset (ShapesWorld is generated when no --data is given)"),
    Step("samples", _step_samples, "contact sheet of held-out images"),
    Step("tokenizer", _step_tokenizer, "multi-scale VQ-VAE"),
    Step("text_tokenizer", _step_text_tokenizer, "BPE text tokenizer"),
    Step("llm", _step_llm, "tiny LLM pretrained on the dataset's text"),
    Step("vision", _step_vision, "tiny vision tower pretrained contrastively"),
    Step("align", _step_align, "LLaVA alignment (projector)"),
    Step("instruct", _step_instruct, "LLaVA instruction tuning (projector + LLM)"),
    Step("decoder", _step_decoder, "class-conditional VAR visual decoder"),
    Step("assemble", _step_assemble, "VARGPT from its base models"),
    Step("stage1", _stage(1), "stage 1: generation projectors"),
    Step("stage2", _stage(2), "stage 2: LLM + projector on mixed instructions"),
    Step("stage3", _stage(3), "stage 3: visual decoder + generation projectors"),
    Step("final", _step_final, "the final model directory"),
    Step("feature_net", _step_feature_net, "feature network for FID"),
    Step("eval", _step_eval, "held-out understanding, generation and FID; report.html"),
)
"""The recipe, in order."""


def run_recipe(
    *, out_dir: str | Path, preset: str = "tiny", data_dir: str | Path | None = None, seed: int = 0,
    progress: bool = True, smoke: bool = False, only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step of the recipe and write ``out_dir/metrics.json``.

    Args:
        out_dir: run folder; finished steps found there are skipped.
        preset: config preset name.
        data_dir: a dataset in the README format; ``None`` generates ShapesWorld under ``out_dir/data``.
            In smoke mode the steps after ``data`` read a stratified copy of at most a few hundred of its
            records (``out_dir/smoke_data``); ``data`` still checks every record.
        seed: seed of every step.
        progress: show progress bars.
        smoke: check that the data goes through every step: a handful of optimiser steps per step and
            a few evaluation samples (:data:`SMOKE`); the numbers mean nothing.
        only: run only these steps (names of :data:`STEPS`, run in recipe order), e.g. the prefix up to
            ``assemble`` that ``vargpt ablate`` shares; finished steps outside it still enter ``metrics.json``.
            None runs every step.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    from vargpt.config import VARGPTConfig

    VARGPTConfig.from_name(preset)  # fail fast on an unknown preset
    unknown = set(only or ()) - {s.name for s in STEPS}
    if unknown:
        raise ValueError(f"unknown recipe steps {sorted(unknown)}; choose from {[s.name for s in STEPS]}")
    out = Path(out_dir)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    user_data = Path(data_dir) if data_dir is not None else None
    steps_data = out / "data" if user_data is None else out / "smoke_data" if smoke else user_data
    ctx = RunContext(out=out, preset=preset, data_dir=steps_data, seed=seed, progress=progress, smoke=smoke,
                     user_data=user_data)
    t_start = time.perf_counter()
    steps: dict[str, Any] = {}
    for step in STEPS:
        marker = out / "steps" / f"{step.name}.json"
        if marker.is_file():
            steps[step.name] = json.loads(marker.read_text())
            if steps[step.name].get("smoke", False) != smoke:
                raise ValueError(f"{out}: step {step.name!r} was run with smoke={not smoke}; "
                                 "use another run folder for smoke and full runs")
            logger.info("step %-10s already done (%.1f s), skipped", step.name, steps[step.name]["wall_seconds"])
            continue
        if only is not None and step.name not in only:
            continue
        logger.info("step %-10s %s", step.name, step.description)
        t0 = time.perf_counter()
        result = step.fn(ctx)
        steps[step.name] = {"result": result, "wall_seconds": round(time.perf_counter() - t0, 2), "smoke": smoke}
        marker.write_text(json.dumps(steps[step.name], indent=2, default=str) + "\n")
    metrics = _collect_metrics(steps, preset=preset, seed=seed,
                               total=round(time.perf_counter() - t_start, 2)) | {"smoke": smoke}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _collect_metrics(steps: dict[str, Any], *, preset: str, seed: int, total: float) -> dict[str, Any]:
    import torch

    import vargpt

    results = {k: v["result"] for k, v in steps.items()}
    ev, tok = results.get("eval", {}), results.get("tokenizer", {})
    return {
        "understanding_accuracy": ev.get("understanding_accuracy"),
        "generation_accuracy": ev.get("generation_accuracy"),
        "generation_reply_accuracy": ev.get("generation_reply_accuracy"),
        "generation_reply_runaway": ev.get("generation_reply_runaway"),
        "generation_reply_forced_image": ev.get("generation_reply_forced_image"),
        "tokenizer_oracle_accuracy": ev.get("tokenizer_oracle_accuracy", tok.get("oracle_accuracy")),
        "tokenizer_psnr": tok.get("psnr"),
        "fid": ev.get("fid"),
        "preset": preset,
        "seed": seed,
        "steps": {k: v["wall_seconds"] for k, v in steps.items()},
        "results": results,
        "total_wall_seconds_this_invocation": total,
        "total_wall_seconds": round(sum(v["wall_seconds"] for v in steps.values()), 2),
        "versions": {"vargpt": vargpt.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
