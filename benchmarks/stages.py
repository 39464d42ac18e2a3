"""VARGPT stages 1-3 benchmark: train the three stages from a recipe run's ``stage0``, print one JSON object.

    OMP_NUM_THREADS=2 python benchmarks/stages.py --run runs/tiny --threads 2            # the recipe's step counts
    OMP_NUM_THREADS=1 python benchmarks/stages.py --run RUN --threads 1 --max-steps 2    # a quick check

``--run`` (default ``runs/tiny``) is a ``vargpt pipeline`` run folder; its assembled model
``RUN/stage0/model`` is the start. When it is missing, the recipe's steps up to ``assemble`` are run in
``RUN`` first (:func:`vargpt.recipe.run_recipe` with ``only=``; resumable, slow: tokenizer, base models
and decoder at the preset's step counts). The stages are written under ``--out`` (default: a temporary
folder, deleted afterwards), never into the run folder, with a fresh start (no resume).

Reported (one JSON object on stdout):

* ``train_seconds``: per stage (the optimisation loop of :func:`vargpt.training.loop.train`, held-out
  evaluations at its start/cadence/end included, dataset encoding excluded) and ``total``;
  ``wall_seconds``: per stage, everything (loading, encoding the data through the VQ-VAE, saving, the
  final held-out metrics) and ``total``.
* ``heldout_loss_before`` / ``heldout_loss_after``: per stage, the stage's own held-out loss (its loss
  weights) before the first and after the last step.
* ``image_code_accuracy``: stage 3's teacher-forced held-out image-code accuracy; ``heldout`` has every
  stage's final text CE, image CE and image-code accuracy, and ``image_loss_shuffled_prompts`` (the image
  CE with the target images permuted among the prompts of each batch); ``prompt_gap`` is that minus the
  true image CE per stage: 0 means the prompt does not reach the visual decoder.
* ``steps``, ``trainable_parameters``, ``train_records`` per stage; ``threads``, ``torch`` version.
* ``generation_by_stage`` (with ``--generation``): the held-out generation of the model after each stage
  (``stage0`` = the assembled model, then stages 1-3) at every ``--eval-seeds`` sampling seed: oracle
  colour+shape, colour and shape, seen and unseen colour x shape pairs
  (:func:`vargpt.evaluation.run.evaluate_model`, no understanding, no FID; ShapesWorld data). Shows which
  stage teaches the model to follow the prompt. With ``--existing`` nothing is trained: the run's own
  ``RUN/stage0`` ... ``RUN/stage3`` are evaluated.

    python benchmarks/stages.py --run runs/tiny --existing --generation --eval-seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vargpt.data.datasets import EncoderCache
from vargpt.training.vargpt_trainer import train_stage

STAGES = ("stage1", "stage2", "stage3")


def ensure_stage0(run: Path, *, preset: str, data: Path | None, seed: int) -> Path:
    """``run/stage0``, building it with the recipe up to ``assemble`` when its model is missing."""
    if not (run / "stage0" / "model").is_dir():
        from vargpt.ablation import UNTIL_ASSEMBLE
        from vargpt.recipe import run_recipe

        run_recipe(out_dir=run, preset=preset, data_dir=data, seed=seed, progress=False, only=UNTIL_ASSEMBLE)
    return run / "stage0"


def stage_generation(model_dir: Path, data: Path, seeds: list[int]) -> dict:
    """Held-out generation of one stage's model at each sampling seed: per-seed values and their means."""
    from vargpt.evaluation.run import evaluate_model
    from vargpt.generation.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir)
    rows = []
    for seed in seeds:
        e = evaluate_model(None, data, pipeline=pipe, seed=seed, max_understanding=0, max_replies=0, report=False)
        if e["generation_accuracy"] is None:
            return {"note": "no oracle for this data (ShapesWorld only)"}
        attrs = e["generation_per_attribute"]
        rows.append({"colour+shape": e["generation_accuracy"], "colour": attrs["colour"], "shape": attrs["shape"],
                     "seen": (e["generation_seen"] or {}).get("colour+shape"),
                     "unseen": (e["generation_unseen"] or {}).get("colour+shape")})
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0] if None not in [r[k] for r in rows]}
    return mean | {"per_seed": rows, "seeds": seeds}


def _seed_list(text: str) -> list[int]:
    """``--eval-seeds``: comma-separated integers, at least one."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0")
    return seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="recipe run folder (stage0 is the start)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: RUN/data)")
    p.add_argument("--out", type=Path, default=None, help="where the stages are written (default: a temp folder)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="steps per stage (default: the stage recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation", action="store_true", help="also evaluate held-out generation after each stage")
    p.add_argument("--eval-seeds", type=_seed_list, default=[0], help="sampling seeds of --generation, comma-separated")
    p.add_argument("--existing", action="store_true",
                   help="train nothing: evaluate the run's own stage folders (needs --generation)")
    a = p.parse_args()
    if a.existing and not a.generation:
        p.error("--existing evaluates the run's stages: add --generation")
    seeds = a.eval_seeds
    torch.set_num_threads(a.threads)
    if a.existing:
        data = a.data or a.run / "data"
        missing = [s for s in ("stage0", *STAGES) if not (a.run / s / "model").is_dir()]
        if missing:
            p.error(f"--existing: {a.run} has no model in {missing} (run the pipeline first)")
        print(json.dumps({"run": str(a.run), "data": str(data), "threads": a.threads, "generation_by_stage": {
            s: stage_generation(a.run / s / "model", data, seeds) for s in ("stage0", *STAGES)}}, indent=2))
        return
    t_all = time.perf_counter()
    stage0 = ensure_stage0(a.run, preset=a.preset, data=a.data, seed=a.seed)
    data = a.data or a.run / "data"
    gen0 = stage_generation(stage0 / "model", data, seeds) if a.generation else None
    tmp = None if a.out is not None else Path(tempfile.mkdtemp(prefix="vargpt_stages_"))
    out = a.out or tmp
    try:
        per: dict[str, dict] = {}
        prev = stage0
        cache = EncoderCache()  # as in a pipeline run: each image is encoded once for the three stages
        for stage in STAGES:
            t0 = time.perf_counter()
            m = train_stage(stage, from_dir=prev, data_dir=data, out_dir=out / stage, preset=a.preset,
                            max_steps=a.max_steps, seed=a.seed, progress=False, encoder_cache=cache)
            per[stage] = {**m, "wall_seconds": round(time.perf_counter() - t0, 2)}
            prev = out / stage
            if a.generation:
                per[stage]["generation"] = stage_generation(prev / "model", data, seeds)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def by_stage(key: str, total: bool = False) -> dict:
        d = {s: per[s][key] for s in STAGES}
        return d | ({"total": round(sum(d.values()), 2)} if total else {})

    print(json.dumps({
        "preset": a.preset, "run": str(a.run), "data": str(data), "out": str(a.out) if a.out else None,
        "threads": a.threads, "max_steps": a.max_steps, "seed": a.seed,
        "train_seconds": by_stage("train_seconds", total=True),
        "wall_seconds": by_stage("wall_seconds", total=True),
        "heldout_loss_before": by_stage("heldout_loss_before"),
        "heldout_loss_after": by_stage("heldout_loss_after"),
        "image_code_accuracy": per["stage3"].get("heldout", {}).get("image_code_accuracy"),
        "heldout": {s: per[s].get("heldout") for s in STAGES},
        "prompt_gap": {s: round(h["image_loss_shuffled_prompts"] - h["image_loss"], 4)
                       for s in STAGES if "image_loss_shuffled_prompts" in (h := per[s].get("heldout") or {})},
        "steps": by_stage("steps"),
        "trainable_parameters": by_stage("trainable_parameters"),
        "train_records": by_stage("train_records"),
        **({"generation_by_stage": {"stage0": gen0} | {s: per[s]["generation"] for s in STAGES}}
           if a.generation else {}),
        "total_seconds": round(time.perf_counter() - t_all, 2),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
