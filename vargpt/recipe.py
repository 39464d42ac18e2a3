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


def _step_tokenizer(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.tokenizer_trainer import train_tokenizer

    return train_tokenizer(data_dir=ctx.data_dir, out_dir=ctx.out / "tokenizer", preset=ctx.preset, resume=True,
                           seed=ctx.seed, progress=ctx.progress)


def _step_text_tokenizer(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_text import train_text_tokenizer

    return train_text_tokenizer(ctx.data_dir, ctx.out / "text_tokenizer", preset=ctx.preset)


def _step_llm(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_text import train_llm

    return train_llm(ctx.data_dir, ctx.out / "text_tokenizer", ctx.out / "llm", preset=ctx.preset,
                     progress=ctx.progress)


def _step_vision(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_vision import train_vision_tower

    return train_vision_tower(ctx.data_dir, ctx.out / "text_tokenizer", ctx.out / "vision", preset=ctx.preset,
                              progress=ctx.progress)


def _step_align(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_llava import train_alignment

    return train_alignment(ctx.data_dir, ctx.out / "llm", ctx.out / "vision", ctx.out / "llava_align",
                           preset=ctx.preset, progress=ctx.progress)


def _step_instruct(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.base_llava import train_instruct

    return train_instruct(ctx.data_dir, ctx.out / "llava_align", ctx.out / "llava", preset=ctx.preset,
                          progress=ctx.progress)


def _step_decoder(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.decoder_trainer import train_decoder

    return train_decoder(data_dir=ctx.data_dir, tokenizer_dir=ctx.out / "tokenizer", out_dir=ctx.out / "decoder",
                         preset=ctx.preset, resume=True, seed=ctx.seed, progress=ctx.progress)


def _step_assemble(ctx: RunContext) -> dict[str, Any]:
    from vargpt.training.assemble import assemble_vargpt

    return assemble_vargpt(llava_dir=ctx.out / "llava", vqvae_dir=ctx.out / "tokenizer",
                           decoder_dir=ctx.out / "decoder", out_dir=ctx.out / "stage0" / "model",
                           preset=ctx.preset, seed=ctx.seed)


def _stage(n: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        from vargpt.training.vargpt_trainer import train_stage

        return train_stage(f"stage{n}", from_dir=ctx.out / f"stage{n - 1}", data_dir=ctx.data_dir,
                           out_dir=ctx.out / f"stage{n}", preset=ctx.preset, resume=True, seed=ctx.seed,
                           progress=ctx.progress)

    return run


def _step_final(ctx: RunContext) -> dict[str, Any]:
    import shutil

    final = ctx.out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(ctx.out / "stage3" / "model", final)
    return {"model": str(final)}


def _step_feature_net(ctx: RunContext) -> dict[str, Any]:
    from vargpt.evaluation.feature_net import train_feature_net

    return train_feature_net(ctx.data_dir, ctx.out / "feature_net", seed=ctx.seed, progress=ctx.progress)


def _step_eval(ctx: RunContext) -> dict[str, Any]:
    import shutil

    from vargpt.evaluation.run import evaluate_model

    curves = sorted(ctx.out.glob("*/train/loss.png")) + sorted(ctx.out.glob("*/loss.png"))
    result = evaluate_model(ctx.out / "final", ctx.data_dir, out=ctx.out / "eval" / "metrics.json",
                            feature_net=ctx.out / "feature_net", seed=ctx.seed, loss_curves=curves)
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

    results = {k: v["result"] for k, v in steps.items()}
    ev, tok = results.get("eval", {}), results.get("tokenizer", {})
    return {
        "understanding_accuracy": ev.get("understanding_accuracy"),
        "generation_accuracy": ev.get("generation_accuracy"),
        "tokenizer_oracle_accuracy": tok.get("oracle_accuracy"),
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
