"""Tokenizer quality benchmark: train the tiny multi-scale VQ-VAE on fresh ShapesWorld, print one JSON.

    python benchmarks/tokenizer.py --threads 2            # generate data in a temp dir, train, evaluate

Reported: held-out reconstruction ``psnr`` (dB), ``codebook_usage`` (fraction of the vocabulary used on
held-out images, overall and per scale), ``oracle_accuracy`` (ShapesWorld oracle colour+shape accuracy
on the *reconstructions* of held-out one-object images, against the record metadata; the same oracle on
the original images is ``oracle_accuracy_original``), ``psnr_by_scales`` (held-out PSNR of decoding the
running f_hat after each scale: where the image's information sits), ``shape_probe`` (a probe's shape accuracy
on small one-object images from the latent before and after quantization: shape the codes lost, which no decoder
can draw back; ``vargpt.evaluation.tokenizer.shape_probe_scores``), ``train_seconds`` (optimisation loops
only: the main phase plus the decoder finetuning, whose own numbers are under ``finetune``) and the thread
count. ``--tokenizer DIR`` evaluates an existing checkpoint instead of training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vargpt.data.records import image_to_tensor, load_image, load_records, unique_images
from vargpt.data.shapesworld.generate import load_world, write_dataset
from vargpt.evaluation.tokenizer import psnr_by_scales, shape_probe_scores, tokenizer_oracle_scores
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.tokenizer_trainer import train_tokenizer


def oracle_scores(model: MultiScaleVQVAE, data_dir: Path, limit: int) -> dict:
    """Oracle colour+shape accuracy on reconstructions and on originals of one-object test images."""
    scores = tokenizer_oracle_scores(model, load_records(data_dir, "test"), load_world(data_dir), limit=limit)
    return {
        "oracle_accuracy": scores["tokenizer_oracle_accuracy"],
        "oracle_colour_accuracy": scores["tokenizer_oracle_colour"],
        "oracle_shape_accuracy": scores["tokenizer_oracle_shape"],
        "oracle_accuracy_original": scores["tokenizer_oracle_original"],
        "oracle_images": scores["tokenizer_oracle_n"],
    }


def shape_probe(model: MultiScaleVQVAE, data_dir: Path) -> dict:
    """Small-object shape read by a probe from the latent before / after quantization (``shape_probe_scores``)."""
    return shape_probe_scores(model.eval(), load_records(data_dir, "train"), load_records(data_dir, "test"))


def _psnr_by_scales(model: MultiScaleVQVAE, data_dir: Path, limit: int) -> list[float]:
    paths = unique_images(load_records(data_dir, "test"))[:limit]
    x = torch.stack([image_to_tensor(load_image(p, model.cfg.image_size)) for p in paths])
    return psnr_by_scales(model, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="existing ShapesWorld folder (default: generate)")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint dir (default: temp)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--oracle-images", type=int, default=1000)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--replay-fraction", type=float, default=None,
                    help="hard-example replay share of each batch (default: the recipe's)")
    ap.add_argument("--edge-weight", type=float, default=None,
                    help="strength of the contrast-weighted pixel loss (default: the recipe's)")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="decoder finetuning steps after the main phase (default: the recipe's; 0 = none)")
    ap.add_argument("--finetune-replay-fraction", type=float, default=None,
                    help="hard-example replay share of each finetuning batch (default: the recipe's)")
    ap.add_argument("--adv-weight", type=float, default=None,
                    help="weight of the adversarial (VQGAN) term of the main phase (default: the recipe's; 0 = off)")
    ap.add_argument("--adv-start", type=int, default=None,
                    help="main-phase step from which the adversarial term counts (default: the recipe's)")
    ap.add_argument("--perceptual-weight", type=float, default=None,
                    help="weight of the perceptual distance (default: the recipe's; needs --perceptual-model)")
    ap.add_argument("--perceptual-model", type=Path, default=None,
                    help="local folder of a transformers vision model for the perceptual distance")
    ap.add_argument("--tokenizer", type=Path, default=None, help="evaluate this checkpoint (no training)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="vargpt-tokbench-") as tmp:
        data = args.data
        gen_seconds = 0.0
        if data is None:
            t0 = time.perf_counter()
            data = Path(tmp) / "shapesworld"
            write_dataset(data, n_train=args.n_train, n_test=args.n_test, seed=args.seed, progress=False)
            gen_seconds = time.perf_counter() - t0
        if args.tokenizer is not None:
            model = MultiScaleVQVAE.from_pretrained(args.tokenizer).eval()
            print(json.dumps({**oracle_scores(model, data, args.oracle_images),
                              "psnr_by_scales": _psnr_by_scales(model, data, args.oracle_images),
                              "shape_probe": shape_probe(model, data),
                              "patch_nums": list(model.cfg.patch_nums), "threads": args.threads}))
            return
        out = args.out or Path(tmp) / "tokenizer"
        metrics = train_tokenizer(data_dir=data, out_dir=out, preset="tiny", max_steps=args.steps,
                                  batch_size=args.batch_size, seed=args.seed, progress=args.progress,
                                  time_budget_s=args.time_budget, replay_fraction=args.replay_fraction,
                                  edge_weight=args.edge_weight, finetune_steps=args.finetune_steps,
                                  finetune_replay_fraction=args.finetune_replay_fraction,
                                  adv_weight=args.adv_weight, adv_start=args.adv_start,
                                  perceptual_weight=args.perceptual_weight, perceptual_model=args.perceptual_model)
        model = MultiScaleVQVAE.from_pretrained(out)
        result = {
            "psnr": metrics["psnr"],
            "codebook_usage": metrics["codebook_usage"],
            **oracle_scores(model, data, args.oracle_images),
            "psnr_by_scales": _psnr_by_scales(model, data, args.oracle_images),
            "shape_probe": shape_probe(model, data),
            "train_seconds": metrics["train_seconds"],
            "threads": args.threads,
            "steps": metrics["steps"],
            "batch_size": metrics["batch_size"],
            "images_per_second": metrics["images_per_second"],
            "train_loss": metrics["train_loss"],
            "codes_restarted": metrics["codes_restarted"],
            "replay_fraction": args.replay_fraction,
            "finetune_replay_fraction": args.finetune_replay_fraction,
            "edge_weight": metrics["edge_weight"],
            "adversarial": metrics["adversarial"],
            "perceptual": metrics["perceptual"],
            "finetune": metrics["finetune"],
            "vqvae": {k: v for k, v in vars(model.cfg).items()},
            "data_seconds": round(gen_seconds + metrics["load_seconds"], 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
