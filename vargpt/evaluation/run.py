"""``vargpt eval``: every metric of a model on a dataset split, as JSON plus an HTML report.

:func:`evaluate_model` runs, for any model directory and any dataset in the README format:

* understanding accuracy (exact match) overall, per ``qtype`` and per ``task``
  (:func:`vargpt.evaluation.understanding.evaluate_understanding`);
* generation: oracle accuracy per attribute, on seen and held-out colour x shape combinations
  (ShapesWorld only, recognised by ``world.json``; null otherwise) and FID of the generated images
  against the split's reference images, under the project's feature network when one is given
  (:mod:`vargpt.evaluation.feature_net`; null otherwise), with the real-vs-real FID at the same
  sample count as a floor;
* the tokenizer's ceiling: oracle colour+shape accuracy on its reconstructions of held-out one-object
  images (ShapesWorld only; :mod:`vargpt.evaluation.tokenizer`);
* a self-contained ``report.html`` (:func:`vargpt.evaluation.report.write_report`).

Heavy imports (torch, the model) happen inside the functions so that building the CLI parser is cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vargpt.files import write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["add_eval_parser", "add_feature_net_parser", "evaluate_model", "fid_against_references"]

MAX_REAL_FOR_FID = 2000
"""At most this many reference images enter the real-image statistics."""


def _reference_images(records: Sequence[Any]) -> list[Path]:
    """Distinct reference images of the generation records (the real side of FID)."""
    from vargpt.evaluation.generation import generation_items

    refs = [it.reference for it in generation_items(records) if it.reference is not None]
    return list(dict.fromkeys(refs))[:MAX_REAL_FOR_FID]


def fid_against_references(extractor: Any, generated: Sequence[Any], references: Sequence[Path], *, seed: int = 0
                           ) -> dict[str, Any]:
    """FID of ``generated`` images against ``references``, and the real-vs-real floor at the same count.

    The floor is the FID between ``len(generated)`` references and the other references (disjoint,
    shuffled with ``seed``): what a perfect generator would score with this many samples.

    Returns:
        ``{"fid", "fid_reference", "fid_n_generated", "fid_n_real", "fid_note"}``; values are None when
        there are fewer than 2 images on a side or the statistics are too degenerate for a real matrix
        square root (``fid_reference`` also when there are too few references); ``fid_note`` then
        says why (None when ``fid`` is a number).
    """
    from vargpt.evaluation.generation import fid_from_features

    n_gen, n_real = len(generated), len(references)
    out: dict[str, Any] = {"fid": None, "fid_reference": None, "fid_n_generated": n_gen, "fid_n_real": n_real,
                           "fid_note": None}
    if n_gen < 2 or n_real < 2:
        out["fid_note"] = (f"FID needs at least 2 generated and 2 reference images; got {n_gen} generated, "
                           f"{n_real} reference (the split's generation records)")
        return out
    real_feats = extractor(list(references))
    try:
        out["fid"] = round(fid_from_features(real_feats, extractor(list(generated))), 4)
    except ValueError as e:  # a significantly complex sqrtm: too few samples for the feature width
        out["fid_note"] = f"FID undefined on {n_gen} generated / {n_real} reference images: {e}"
        return out
    if n_real >= n_gen + 2:
        order = list(range(n_real))
        random.Random(seed).shuffle(order)
        a, b = real_feats[order[:n_gen]], real_feats[order[n_gen:]]
        out["fid_reference"] = round(fid_from_features(b, a), 4)
    return out


def _resolve_extractor(feature_net: Any) -> tuple[Any, str | None]:
    if feature_net is None:
        return None, None
    if callable(feature_net):
        return feature_net, getattr(feature_net, "name", type(feature_net).__name__)
    from vargpt.evaluation.feature_net import load_feature_net

    return load_feature_net(feature_net), f"project:{feature_net}"


def evaluate_model(
    model_dir: str | Path | None, data_dir: str | Path, *, split: str = "test", out: str | Path | None = None,
    feature_net: str | Path | Any = None, max_understanding: int | None = 500, max_generation: int | None = 256,
    max_replies: int | None = 128, n_per_prompt: int = 1, seed: int = 0, sampling: Any = None, batch_size: int = 16,
    report: bool = True, loss_curves: Sequence[str | Path] = (), pipeline: Any = None,
) -> dict[str, Any]:
    """Understanding and generation metrics of a model on ``data_dir``'s ``split`` (see module docstring).

    Args:
        model_dir: a directory written by ``save_pretrained`` (ignored when ``pipeline`` is given).
        data_dir: dataset folder in the README format.
        split: which split's records to evaluate.
        out: JSON file for the metrics; the report goes next to it (same name, ``.html``).
        feature_net: a feature-net directory (:func:`~vargpt.evaluation.feature_net.train_feature_net`)
            or any extractor ``images -> (N, D)``; None = no FID.
        max_understanding: evaluate at most this many questions (None = all).
        max_generation: generate for at most this many prompts (None = all).
        max_replies: check the model's own reply text for at most this many generation prompts
            (:func:`~vargpt.evaluation.generation.evaluate_replies`; ShapesWorld only; 0 = skip, None = all).
        n_per_prompt: images per generation prompt.
        seed: sampling seed (used when ``sampling`` is None) and FID subset seed.
        sampling: a ``SamplingConfig`` for image generation (default: the checkpoint's, with ``seed``).
        batch_size: questions / prompts per batch.
        report: write the HTML report (needs ``out``).
        loss_curves: PNG files to embed in the report.
        pipeline: an already-built pipeline (anything with ``answer`` and ``generate_images``).

    Returns:
        ``{"model", "data", "split", "seed", "understanding_accuracy", "understanding_n",
        "understanding_per_qtype", "understanding_per_task", "generation_accuracy" (oracle
        colour+shape; null without an oracle), "generation_per_attribute", "generation_seen",
        "generation_unseen", "generation_per_task", "generation_per_size" (per asked-for size, over the
        prompts that name one), "generation_per_size_n", "generation_n_prompts", "generation_n_images",
        "generation_reply_accuracy" (of the replies to generation prompts that name the asked-for colour,
        shape, size or position, the share naming only the asked-for ones; null without an oracle),
        "generation_reply_named" (share of replies naming any), "generation_reply_per_attribute",
        "generation_reply_seen", "generation_reply_unseen", "generation_reply_n",
        "generation_reply_runaway" (share of those replies that had not ended when the text budget ran out:
        the model did not stop after its image), "generation_reply_after_image" (share with text after
        the image), "generation_reply_forced_image" (share that had not started an image when the text
        budget ran out: asked to draw, the model only wrote),
        "fid", "fid_reference", "fid_n_generated", "fid_n_real", "fid_note" (why ``fid`` is null),
        "fid_features", "tokenizer_oracle_accuracy" (and the other keys of
        :func:`vargpt.evaluation.tokenizer.tokenizer_oracle_scores`; ShapesWorld only, else null),
        "seconds", "report"}``.

    Raises:
        ConfigError: a negative sample count (or ``n_per_prompt`` < 1).
    """
    from vargpt.config import ConfigError, SamplingConfig
    from vargpt.data.records import load_records
    from vargpt.data.shapesworld import load_world
    from vargpt.evaluation.generation import evaluate_generation, evaluate_replies
    from vargpt.evaluation.understanding import evaluate_understanding

    for name, value in (("max_understanding", max_understanding), ("max_generation", max_generation),
                        ("max_replies", max_replies)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0 (None = all), got {value}")
    if n_per_prompt < 1:
        raise ConfigError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    t0 = time.perf_counter()
    if pipeline is None:
        from vargpt.generation.pipeline import Pipeline

        pipeline = Pipeline.from_pretrained(model_dir)
    records = load_records(data_dir, split)
    world = load_world(data_dir) if (Path(data_dir) / "world.json").is_file() else None
    extractor, feature_name = _resolve_extractor(feature_net)
    t_load = time.perf_counter()
    und = evaluate_understanding(pipeline, records, batch_size=batch_size, max_records=max_understanding)
    t_und = time.perf_counter()
    if sampling is None:  # the checkpoint's sampling settings, seeded
        sampling = dataclasses.replace(getattr(pipeline, "default_sampling", None) or SamplingConfig(), seed=seed)
    gen = evaluate_generation(pipeline, records, world, n_per_prompt=n_per_prompt, sampling=sampling,
                              max_prompts=max_generation, batch_size=batch_size)
    t_gen = time.perf_counter()
    replies: dict[str, Any] = {"n": 0, "accuracy": {}, "named": {}, "seen": {}, "unseen": {}, "runaway": None,
                               "after_image": None, "forced_image": None, "samples": []}
    if world is not None and max_replies != 0:
        replies = evaluate_replies(pipeline, records, world, sampling=sampling, max_prompts=max_replies,
                                   batch_size=batch_size)
    t_rep = time.perf_counter()
    fid: dict[str, Any] = {"fid": None, "fid_reference": None, "fid_n_generated": None, "fid_n_real": None,
                           "fid_note": "no feature network given"}
    if extractor is not None:
        fid = fid_against_references(extractor, [s["image"] for s in gen["samples"]],
                                     _reference_images(records), seed=seed)
    t_fid = time.perf_counter()
    tok: dict[str, Any] = {"tokenizer_oracle_accuracy": None}
    vqvae = getattr(getattr(pipeline, "model", None), "vae_local", None)
    if world is not None and vqvae is not None:  # the ceiling the tokenizer sets on generation
        from vargpt.evaluation.tokenizer import tokenizer_oracle_scores

        tok = tokenizer_oracle_scores(vqvae, records, world)
    t_tok = time.perf_counter()
    metrics: dict[str, Any] = {
        "model": str(model_dir) if model_dir is not None else None, "data": str(data_dir), "split": split,
        "seed": seed,
        "understanding_accuracy": und["accuracy"], "understanding_n": und["n"],
        "understanding_per_qtype": und["per_qtype"], "understanding_per_task": und["per_task"],
        "generation_accuracy": (gen["accuracy"] or {}).get("colour+shape"),
        "generation_per_attribute": gen["accuracy"], "generation_seen": gen["seen"],
        "generation_unseen": gen["unseen"], "generation_per_task": gen["per_task"],
        "generation_per_size": gen["per_size"], "generation_per_size_n": gen["per_size_n"],
        "generation_n_prompts": gen["n_prompts"], "generation_n_images": gen["n_images"],
        "generation_reply_accuracy": replies["accuracy"].get("all"),
        "generation_reply_per_attribute": replies["accuracy"] or None,
        "generation_reply_named": replies["named"].get("all"),
        "generation_reply_seen": replies["seen"] or None, "generation_reply_unseen": replies["unseen"] or None,
        "generation_reply_n": replies["n"], "generation_reply_runaway": replies["runaway"],
        "generation_reply_after_image": replies["after_image"],
        "generation_reply_forced_image": replies["forced_image"],
        **fid, "fid_features": feature_name if extractor is not None else None, **tok,
        "seconds": {"load": round(t_load - t0, 2), "understanding": round(t_und - t_load, 2),
                    "generation": round(t_gen - t_und, 2), "replies": round(t_rep - t_gen, 2),
                    "fid": round(t_fid - t_rep, 2),
                    "tokenizer": round(t_tok - t_fid, 2)},
        "report": None,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if report:
            from vargpt.evaluation.report import write_report

            metrics["report"] = str(write_report(out.with_suffix(".html"), metrics=metrics,
                                                 understanding_samples=und["samples"],
                                                 generation_samples=gen["samples"],
                                                 reply_samples=replies["samples"], loss_curves=loss_curves))
        write_json_atomic(out, metrics)
    logger.info("evaluation of %s on %s/%s: understanding %s, generation %s, fid %s", model_dir, data_dir, split,
                metrics["understanding_accuracy"], metrics["generation_accuracy"], metrics["fid"])
    return metrics


# --------------------------------------------------------------------------------------------------
# Command line (wired into vargpt.cli by add_eval_parser / add_feature_net_parser)
# --------------------------------------------------------------------------------------------------


def _write_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _eval_command(a: argparse.Namespace) -> None:
    metrics = evaluate_model(a.model, a.data, split=a.split, out=a.out, feature_net=a.feature_net,
                             max_understanding=a.max_understanding, max_generation=a.max_generation,
                             max_replies=a.max_replies, n_per_prompt=a.n_per_prompt, seed=a.seed,
                             batch_size=a.batch_size, report=not a.no_report, loss_curves=a.loss_curves)
    _write_json(metrics)


def _feature_net_command(a: argparse.Namespace) -> None:
    from vargpt.evaluation.feature_net import train_feature_net

    _write_json(train_feature_net(a.data, a.out, steps=a.steps, batch_size=a.batch_size, image_size=a.image_size,
                                  seed=a.seed, progress=not a.quiet))


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vargpt eval --model DIR --data DIR [--split test] [--out FILE.json] [--feature-net DIR] ...``."""
    s = subparsers.add_parser("eval", help="understanding accuracy, generation oracle accuracy and FID of a model",
                              description=evaluate_model.__doc__.splitlines()[0])
    s.add_argument("--model", type=Path, required=True, help="model directory (save_pretrained)")
    s.add_argument("--data", type=Path, required=True, help="dataset folder (README format)")
    s.add_argument("--split", default="test", help="split to evaluate")
    s.add_argument("--out", type=Path, default=None, help="metrics JSON file; report.html goes next to it")
    s.add_argument("--feature-net", type=Path, default=None,
                   help="feature-net directory for FID (`vargpt feature-net`); no FID without it")
    s.add_argument("--max-understanding", type=int, default=500, help="questions to evaluate")
    s.add_argument("--max-generation", type=int, default=256, help="generation prompts to evaluate")
    s.add_argument("--max-replies", type=int, default=128,
                   help="generation prompts whose reply text is checked (ShapesWorld; 0 = skip)")
    s.add_argument("--n-per-prompt", type=int, default=1, help="images per generation prompt")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--loss-curves", type=Path, nargs="*", default=[], help="loss PNGs to embed in the report")
    s.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    s.set_defaults(func=_eval_command)
    return s


def add_feature_net_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vargpt feature-net --data DIR --out DIR [--steps N]`` (train the FID feature network)."""
    s = subparsers.add_parser("feature-net", help="train the project's FID feature network on a dataset's images")
    s.add_argument("--data", type=Path, required=True, help="dataset folder (README format)")
    s.add_argument("--out", type=Path, required=True, help="output folder (checkpoint/, feature_net.json)")
    s.add_argument("--steps", type=int, default=250)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--image-size", type=int, default=32, help="images are resized to this size")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_feature_net_command)
    return s
