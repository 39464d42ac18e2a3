"""The end-to-end recipe behind ``vargpt pipeline`` / ``make demo``: every step from data to metrics.

Steps run phase by phase (:data:`PLAN`); inside a phase, chains of steps that read nothing of each
other run side by side in their own processes (``workers``), each splitting the CPU threads. Each
step writes its outputs under the run folder and, when it finishes, a marker ``RUN/steps/<name>.json``
holding its result, wall time, threads and process. A rerun skips finished steps, so an interrupted
run resumes at the step(s) it was in. ``RUN/metrics.json`` gathers every step's numbers.

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

from vargpt.files import write_json_atomic

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

    step_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per step name for its trainer (``run_recipe(step_overrides=...)``)."""

    def limits(self, *keys: str) -> dict[str, Any]:
        """The keyword overrides of a step: its :data:`SMOKE` entries in smoke mode, then the user's
        ``step_overrides``, for each of ``keys`` in turn (later keys win)."""
        out: dict[str, Any] = {}
        for key in keys:
            out |= (SMOKE.get(key, {}) if self.smoke else {}) | self.step_overrides.get(key, {})
        return out


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
    after: tuple[str, ...] = ()
    """The steps whose outputs this one reads (:func:`check_plan` holds :data:`PLAN` to them)."""
    takes: str | None = None
    """``"module:function"`` that receives the step's ``step_overrides`` as keyword arguments (None: the
    step takes none); :func:`override_names` reads what it accepts."""


_SET_BY_THE_RECIPE = frozenset({
    "stage", "data_dir", "out_dir", "tokenizer_dir", "llm_dir", "vision_dir", "align_dir", "from_dir", "model_dir",
    "init_from", "out", "feature_net", "loss_curves", "preset", "seed", "resume", "progress", "encoder_cache",
    "train_cfg", "data", "pipeline",
})
"""Arguments the steps pass themselves (the run's folders, preset, seed, ...) or that are no setting (``data``,
``pipeline``: objects already built), so not overridable."""


def override_names(step: Step) -> frozenset[str]:
    """The ``step_overrides`` keys ``step`` accepts: its trainer's keyword arguments but those the recipe
    sets itself, and the :class:`~vargpt.config.TrainConfig` fields where the trainer forwards ``**overrides``
    to its optimiser recipe."""
    import dataclasses
    import importlib
    import inspect

    from vargpt.config import TrainConfig

    if step.takes is None:
        return frozenset()
    module, name = step.takes.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        names |= {f.name for f in dataclasses.fields(TrainConfig)} - {"name"}
    return frozenset(names - _SET_BY_THE_RECIPE)


def _check_train_values(step: str, kwargs: dict[str, Any]) -> None:
    """Check the values of a step's overrides that are :class:`~vargpt.config.TrainConfig` fields (``lr``,
    ``max_steps``, ``replay_fraction``, ...) by its own rules, each field on its own, so a bad value fails
    before any step runs rather than when this step's turn comes.

    Raises:
        ConfigError: a value :class:`~vargpt.config.TrainConfig` refuses (its message names field and rule).
    """
    import dataclasses

    from vargpt.config import ConfigError, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in kwargs.items():
        if key not in fields or value is None:  # None: the step's own default
            continue
        try:  # key is a field, so only TrainConfig's value rules can refuse it
            dataclasses.replace(TrainConfig(), **{key: value})
        except ConfigError as e:
            raise ConfigError(f"step_overrides[{step!r}]: {e}") from None
        except TypeError:  # e.g. a string where a number goes
            raise ConfigError(f"step_overrides[{step!r}]: {key}={value!r} has the wrong type; TrainConfig.{key} "
                              f"takes {type(getattr(TrainConfig(), key)).__name__}") from None


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

    limits = ctx.limits("tokenizer") | {"finetune_steps": 0}  # the main phase: the codes (RUN/tokenizer_main)
    return train_tokenizer(data_dir=ctx.data_dir, out_dir=ctx.out / "tokenizer_main", preset=ctx.preset,
                           resume=True, seed=ctx.seed, progress=ctx.progress, **limits)


def _step_tokenizer_finetune(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.tokenizer_trainer import train_tokenizer

    # The recipe's decoder finetuning on a copy of the main phase (RUN/tokenizer, the tokenizer the model
    # ships). The codes stay the main phase's, so the visual decoder can pretrain on them meanwhile.
    return train_tokenizer(data_dir=ctx.data_dir, out_dir=ctx.out / "tokenizer", preset=ctx.preset, resume=True,
                           init_from=ctx.out / "tokenizer_main", seed=ctx.seed, progress=ctx.progress,
                           **ctx.limits("tokenizer", "tokenizer_finetune"))


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

    return train_decoder(data_dir=ctx.data_dir, tokenizer_dir=ctx.out / "tokenizer_main", out_dir=ctx.out / "decoder",
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
                           progress=ctx.progress, encoder_cache=ctx.encoder_cache,
                           **ctx.limits("stage", f"stage{n}"))

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
    Step("data", _step_data, "dataset (ShapesWorld is generated when no --data is given)",
         takes="vargpt.data.shapesworld.generate:write_dataset"),
    Step("samples", _step_samples, "contact sheet of held-out images", after=("data",)),
    Step("text_tokenizer", _step_text_tokenizer, "BPE text tokenizer", after=("data",)),
    Step("tokenizer", _step_tokenizer, "multi-scale VQ-VAE: the codes", after=("data",),
         takes="vargpt.training.tokenizer_trainer:train_tokenizer"),
    Step("vision", _step_vision, "tiny vision tower pretrained contrastively", after=("text_tokenizer",),
         takes="vargpt.training.base_vision:train_vision_tower"),
    Step("decoder", _step_decoder, "class-conditional VAR visual decoder", after=("tokenizer",),
         takes="vargpt.training.decoder_trainer:train_decoder"),
    Step("llm", _step_llm, "tiny LLM pretrained on the dataset's text", after=("text_tokenizer",),
         takes="vargpt.training.base_text:train_llm"),
    Step("align", _step_align, "LLaVA alignment (projector)", after=("llm", "vision"),
         takes="vargpt.training.base_llava:train_alignment"),
    Step("instruct", _step_instruct, "LLaVA instruction tuning (projector + LLM)", after=("align",),
         takes="vargpt.training.base_llava:train_instruct"),
    Step("tokenizer_finetune", _step_tokenizer_finetune, "the VQ-VAE's pixel decoder on its frozen codes",
         after=("tokenizer",), takes="vargpt.training.tokenizer_trainer:train_tokenizer"),
    Step("feature_net", _step_feature_net, "feature network for FID", after=("data",),
         takes="vargpt.evaluation.feature_net:train_feature_net"),
    Step("assemble", _step_assemble, "VARGPT from its base models",
         after=("instruct", "tokenizer_finetune", "decoder")),
    Step("stage1", _stage(1), "stage 1: generation projectors", after=("assemble",),
         takes="vargpt.training.vargpt_trainer:train_stage"),
    Step("stage2", _stage(2), "stage 2: LLM + projector on mixed instructions", after=("stage1",),
         takes="vargpt.training.vargpt_trainer:train_stage"),
    Step("stage3", _stage(3), "stage 3: visual decoder + generation projectors", after=("stage2",),
         takes="vargpt.training.vargpt_trainer:train_stage"),
    Step("final", _step_final, "the final model directory", after=("stage3",)),
    Step("eval", _step_eval, "held-out understanding, generation and FID; report.html",
         after=("final", "feature_net"), takes="vargpt.evaluation.run:evaluate_model"),
)
"""The recipe, in the order one worker runs it (:data:`PLAN` flattened)."""

STEP_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}

PLAN: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("data", "samples", "text_tokenizer", "tokenizer", "vision"),),
    (("decoder",), ("llm", "align", "instruct", "tokenizer_finetune")),
    (("feature_net", "assemble", "stage1", "stage2", "stage3", "final", "eval"),),
)
"""Phases, one after another; a phase is lanes of steps that may run side by side (``workers >= 2``).

The middle phase holds two independent chains: the visual decoder's pretraining on the VQ-VAE's codes,
and the LLM, the LLaVA built on it and the VQ-VAE's decoder finetuning. On 2 CPU cores two one-thread
processes do more work per second than one two-thread process (these small models gain 1.3-1.7x from
a second thread), and in the tiny preset the two lanes take about equally long (456 and 444 s at one
thread each). The lanes hold steps whose numbers do not depend on the thread count (the LLM, LLaVA
and visual decoder train bit for bit alike on 1 and 2 threads; the finetuning to ~1e-6): a run with
``workers=2`` trains the same models as one with ``workers=1``. The convolutional vision tower and FID
feature net do depend on it (oneDNN's convolution weight gradients and LayerNorm's affine gradients
are summed per thread), so they run outside the lanes, with every thread.
"""


def check_plan(plan: tuple[tuple[tuple[str, ...], ...], ...] = PLAN,
               steps: tuple[Step, ...] = STEPS) -> None:
    """Raise ``ValueError`` unless ``plan`` runs every step once, each after the steps it reads.

    A step's ``after`` must be in an earlier phase or earlier in its own lane, so that lanes never wait
    on each other and one worker can run the plan flattened.
    """
    seen: set[str] = set()
    flat = [name for phase in plan for lane in phase for name in lane]
    if sorted(flat) != sorted(s.name for s in steps):
        raise ValueError(f"the plan must hold every step exactly once: {flat} vs {[s.name for s in steps]}")
    by_name = {s.name: s for s in steps}
    for phase in plan:
        for lane in phase:
            ready = set(seen)
            for name in lane:
                missing = set(by_name[name].after) - ready
                if missing:
                    raise ValueError(f"step {name!r} reads {sorted(missing)}, which the plan does not finish "
                                     "before it (in an earlier phase or earlier in its lane)")
                ready.add(name)
        seen.update(name for lane in phase for name in lane)


def default_workers() -> int:
    """Lanes run side by side by default on a CPU with at least 2 threads (one thread each); with CUDA,
    or one thread, steps run one after another."""
    import torch

    return 1 if torch.cuda.is_available() or torch.get_num_threads() < 2 else 2


def run_recipe(
    *, out_dir: str | Path, preset: str = "tiny", data_dir: str | Path | None = None, seed: int = 0,
    progress: bool = True, smoke: bool = False, only: Collection[str] | None = None, workers: int | None = None,
    step_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step of the recipe and write ``out_dir/metrics.json``.

    Args:
        out_dir: run folder; finished steps found there are skipped.
        preset: config preset name.
        data_dir: a dataset in the README format; ``None`` generates ShapesWorld under ``out_dir/data``.
            In smoke mode the steps after ``data`` read a stratified copy of at most a few hundred of its
            records (``out_dir/smoke_data``); ``data`` still checks every record.
        seed: seed of every step.
        progress: show progress bars (side-by-side lanes show one bar per phase, their steps none).
        smoke: check that the data goes through every step: a handful of optimiser steps per step and
            a few evaluation samples (:data:`SMOKE`); the numbers mean nothing.
        only: run only these steps (names of :data:`STEPS`, run in recipe order), e.g. the prefix up to
            ``assemble`` that ``vargpt ablate`` shares; finished steps outside it still enter ``metrics.json``.
            None runs every step.
        workers: how many lanes of a :data:`PLAN` phase run side by side, each in its own process with
            ``torch.get_num_threads() // lanes`` threads (default :func:`default_workers`); a phase with
            more lanes than workers joins them (:func:`group_lanes`), so it never starts more. 1 runs every
            step in this process, one after another, with all threads. The recipe's lanes hold only
            steps whose training does not depend on the thread count (:data:`PLAN`), so ``workers=1``
            and ``2`` train the same models (the VQ-VAE's finetuned decoder to ~1e-6); a run repeats to
            the last digit on the same machine. Lanes are spawned processes: a script that calls this
            with ``workers >= 2`` needs the usual ``if __name__ == "__main__":`` guard of
            :mod:`multiprocessing`.
        step_overrides: keyword arguments of a step's trainer by step name, over the recipe's (and smoke
            mode's), e.g. ``{"decoder": {"max_steps": 500}, "stage3": {"lr": 5e-4}}`` (``vargpt pipeline
            --set decoder.max_steps=500``), checked before any step runs (:func:`override_names`). Keys
            under ``"tokenizer"`` reach ``tokenizer_finetune`` too (its main phase must match);
            ``"tokenizer_finetune": {"finetune_steps": N}`` sets the finetuning. They apply to the steps
            this call runs; finished steps are not redone.

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        ValueError: an unknown preset or step name, or a run folder made in the other (smoke / full) mode.
        ConfigError: ``workers < 1``, or ``step_overrides`` naming no step or an argument its step does not
            take (:func:`override_names`), or giving a :class:`~vargpt.config.TrainConfig` field a value it
            refuses; all checked before any step runs.
    """
    import torch

    from vargpt.config import ConfigError, VARGPTConfig

    VARGPTConfig.from_name(preset)  # fail fast on an unknown preset
    check_plan()
    unknown = set(only or ()) - set(STEP_BY_NAME)
    if unknown:
        raise ValueError(f"unknown recipe steps {sorted(unknown)}; choose from {[s.name for s in STEPS]}")
    step_overrides = {k: dict(v) for k, v in (step_overrides or {}).items()}
    if bad := sorted(set(step_overrides) - set(STEP_BY_NAME)):
        raise ConfigError(f"step_overrides for {bad}: not recipe steps; choose from {list(STEP_BY_NAME)}")
    for name, kwargs in step_overrides.items():  # before any step runs, not when the step's turn comes
        known = override_names(STEP_BY_NAME[name])
        if bad := sorted(set(kwargs) - known):
            raise ConfigError(f"step_overrides[{name!r}]: {bad} not accepted by this step; "
                              + (f"choose from {sorted(known)}" if known else "it takes no overrides"))
        _check_train_values(name, kwargs)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers={workers}: must be >= 1 (1 runs the steps one after another)")
    out = Path(out_dir)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    user_data = Path(data_dir) if data_dir is not None else None
    steps_data = out / "data" if user_data is None else out / "smoke_data" if smoke else user_data
    ctx = RunContext(out=out, preset=preset, data_dir=steps_data, seed=seed, progress=progress, smoke=smoke,
                     user_data=user_data, step_overrides=step_overrides)
    t_start = time.perf_counter()
    steps: dict[str, Any] = {}
    for name in STEP_BY_NAME:  # finished steps, from this or an earlier call
        marker = out / "steps" / f"{name}.json"
        if marker.is_file():
            steps[name] = json.loads(marker.read_text())
            if steps[name].get("smoke", False) != smoke:
                raise ValueError(f"{out}: step {name!r} was run with smoke={not smoke}; "
                                 "use another run folder for smoke and full runs")
            logger.info("step %-18s already done (%.1f s), skipped", name, steps[name]["wall_seconds"])
    migrate_split_tokenizer(out, steps)
    for i, phase in enumerate(PLAN):
        lanes = [todo for lane in phase
                 if (todo := [n for n in lane if n not in steps and (only is None or n in only)])]
        if workers >= 2 and len(lanes) >= 2:
            lanes = group_lanes(lanes, workers)
            threads = max(1, torch.get_num_threads() // len(lanes))
            steps |= _run_lanes(lanes, ctx, threads=threads, progress=progress,
                                desc=f"phase {i + 1}/{len(PLAN)}")
        else:
            for name in (n for lane in lanes for n in lane):
                logger.info("step %-18s %s", name, STEP_BY_NAME[name].description)
                steps[name] = _run_step(STEP_BY_NAME[name], ctx)
    metrics = _collect_metrics(steps, preset=preset, seed=seed,
                               total=round(time.perf_counter() - t_start, 2)) | {"smoke": smoke}
    write_json_atomic(out / "metrics.json", metrics, default=str)
    return metrics


def group_lanes(lanes: list[list[str]], workers: int) -> list[list[str]]:
    """``lanes`` joined into at most ``workers`` lanes, one process each: lane ``i`` goes after the lanes
    before it in group ``i % workers``. Lanes of one phase read nothing of each other, so any order of
    them in one process is valid, and a phase never starts more processes than ``workers``.

    >>> group_lanes([["a", "b"], ["c"], ["d"]], 2)
    [['a', 'b', 'd'], ['c']]
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    groups: list[list[str]] = [[] for _ in range(min(workers, len(lanes)))]
    for i, lane in enumerate(lanes):
        groups[i % len(groups)].extend(lane)
    return groups


def migrate_split_tokenizer(out: Path, done: Collection[str]) -> bool:
    """Bring a run folder from before the tokenizer step's split up to date; True if it changed anything.

    Earlier versions of the recipe trained the VQ-VAE's main phase and its decoder finetuning in one step,
    into ``RUN/tokenizer/``; now the main phase (``tokenizer``, whose codes the visual decoder reads) writes
    ``RUN/tokenizer_main/`` and the finetuning (``tokenizer_finetune``) ``RUN/tokenizer/``. The finetuning
    changes neither the encoder nor the codebook, so the old checkpoint gives exactly the main phase's codes:
    it is copied to ``RUN/tokenizer_main/``, and the finetuning step then finds its work already done there.
    """
    import shutil

    from vargpt.training.checkpoint import is_checkpoint

    main, combined = out / "tokenizer_main", out / "tokenizer"
    if "tokenizer" not in done or main.exists() or not is_checkpoint(combined):
        return False
    tmp = out / ".tokenizer_main.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(combined, tmp)
    tmp.replace(main)
    logger.info("%s: tokenizer/ from before the tokenizer step's split copied to tokenizer_main/ (same codes)", out)
    return True


def _run_step(step: Step, ctx: RunContext, lane: int | None = None) -> dict[str, Any]:
    """Run one step and write its marker (atomically): the result, wall time, threads and when it ran."""
    import os

    import torch

    started, t0 = time.time(), time.perf_counter()
    result = step.fn(ctx)
    entry = {"result": result, "wall_seconds": round(time.perf_counter() - t0, 2), "smoke": ctx.smoke,
             "threads": torch.get_num_threads(), "lane": lane, "pid": os.getpid(), "started": round(started, 3),
             "finished": round(time.time(), 3)}
    write_json_atomic(ctx.out / "steps" / f"{step.name}.json", entry, default=str)
    return entry


def _lane_worker(fields: dict[str, Any], names: list[str], lane: int, threads: int, conn: Any,
                 log_level: int) -> None:
    """Body of a lane's process (spawned): run ``names`` in order at ``threads`` threads, sending
    ("start" / "done" / "error", step, payload) tuples through ``conn`` (its end of a pipe)."""
    import pickle
    import traceback

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format=f"%(levelname)s [lane {lane + 1}] %(name)s: %(message)s")
    ctx = RunContext(**fields)
    try:
        for name in names:
            conn.send(("start", name, lane))
            try:
                entry = _run_step(STEP_BY_NAME[name], ctx, lane=lane)
            except KeyboardInterrupt:
                return
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
                try:
                    error: Any = pickle.loads(pickle.dumps(e))
                except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                    error = None
                conn.send(("error", name, (error, f"{type(e).__name__}: {e}", traceback.format_exc())))
                return
            conn.send(("done", name, entry))
    finally:
        conn.close()


def _run_lanes(lanes: list[list[str]], ctx: RunContext, *, threads: int, progress: bool,
               desc: str) -> dict[str, Any]:
    """Run ``lanes`` side by side, one spawned process each (``threads`` threads); return their markers.

    A failing step stops the other lanes (their finished steps keep their markers, an interrupted step
    resumes from its last checkpoint on rerun) and is raised here: the step's own exception when it
    pickles (so a ``ConfigError`` still reads as one line), else a ``RuntimeError`` with its traceback.
    A lane process that dies without a word (killed, e.g. for memory) is a ``RuntimeError`` too.
    """
    import dataclasses
    import multiprocessing as mp
    import os
    import signal
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    from vargpt.errors import USER_ERRORS

    spawn = mp.get_context("spawn")  # fork would copy this process's OpenMP thread pool
    # Every field of the context but the (per-process) encoder cache travels; the lanes show no bars of their own.
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name != "encoder_cache"}
    fields["progress"] = False
    level = logging.getLogger().getEffectiveLevel()
    pipes = [spawn.Pipe(duplex=False) for _ in lanes]  # one pipe a lane: EOF when its process ends
    procs = [spawn.Process(target=_lane_worker, args=(fields, lane, i, threads, pipes[i][1], level),
                           name=f"vargpt-lane-{i + 1}") for i, lane in enumerate(lanes)]
    pending = {n for lane in lanes for n in lane}
    running: dict[str, float] = {}
    done: dict[str, Any] = {}
    logger.info("%s: %d lanes side by side, %d thread(s) each: %s", desc, len(lanes), threads,
                " | ".join(", ".join(lane) for lane in lanes))
    bar = tqdm(total=len(pending), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    finished = False
    try:
        for p, (_, send) in zip(procs, pipes, strict=True):
            p.start()
            send.close()  # the child holds the only writing end now
        readers = {recv: i for i, (recv, _) in enumerate(pipes)}
        while pending:
            for recv in wait(list(readers), timeout=1.0):
                i = readers[recv]
                try:
                    kind, name, payload = recv.recv()
                except EOFError:  # the lane's process has ended
                    del readers[recv]
                    left = [n for n in lanes[i] if n in pending]
                    if left:
                        procs[i].join()
                        raise RuntimeError(f"{procs[i].name} exited with code {procs[i].exitcode} before "
                                           f"finishing {left} (killed, e.g. out of memory? see the log above); "
                                           "rerun to resume") from None
                    continue
                if kind == "start":
                    running[name] = time.perf_counter()
                    logger.info("step %-18s %s (lane %d)", name, STEP_BY_NAME[name].description, payload + 1)
                elif kind == "done":
                    running.pop(name, None)
                    pending.discard(name)
                    done[name] = payload
                    logger.info("step %-18s done in %.1f s", name, payload["wall_seconds"])
                    bar.update(1)
                else:
                    error, text, trace = payload
                    if isinstance(error, USER_ERRORS):
                        logger.debug("step %s failed:\n%s", name, trace)
                        raise error
                    raise RuntimeError(f"step {name!r} failed in its lane: {text}\n{trace}") from error
            bar.set_postfix_str(", ".join(f"{n} {time.perf_counter() - t:.0f}s" for n, t in running.items()))
        finished = True
    finally:
        bar.close()
        if not finished:  # stop what still runs as Ctrl-C would: it exits cleanly (checkpoints are atomic)
            grace = time.monotonic() + 3.0  # after a Ctrl-C in the terminal the lanes have had theirs already
            for p in procs:
                p.join(timeout=max(0.0, grace - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
        for recv, _ in pipes:
            recv.close()
    return done


def _collect_metrics(steps: dict[str, Any], *, preset: str, seed: int, total: float) -> dict[str, Any]:
    import torch

    import vargpt

    results = {k: v["result"] for k, v in steps.items()}
    ev = results.get("eval", {})
    tok = results.get("tokenizer_finetune") or results.get("tokenizer", {})  # the tokenizer the model ships
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
        "step_threads": {k: v.get("threads") for k, v in steps.items()},
        "results": results,
        "total_wall_seconds_this_invocation": total,
        "total_wall_seconds": _critical_wall_seconds(steps),
        "versions": {"vargpt": vargpt.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }


def _critical_wall_seconds(steps: dict[str, Any]) -> float:
    """The whole recipe's wall time from its steps' markers: per :data:`PLAN` phase, the steps run one
    after another plus the longest of the lanes that ran side by side (markers with a ``lane``)."""
    total = 0.0
    for phase in PLAN:
        serial, lanes = 0.0, {}
        for name in (n for lane in phase for n in lane if n in steps):
            entry = steps[name]
            if entry.get("lane") is None:
                serial += entry["wall_seconds"]
            else:
                lanes[entry["lane"]] = lanes.get(entry["lane"], 0.0) + entry["wall_seconds"]
        total += serial + max(lanes.values(), default=0.0)
    return round(total, 2)
