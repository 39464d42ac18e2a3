"""Run one VARGPT stage: load a model directory, select the stage's data, train, save a model directory.

Output layout of ``out_dir``: ``model/`` (a :func:`vargpt.pretrained.load_pretrained` directory, the
input of the next stage and of the inference ``Pipeline``), ``train/`` (``checkpoint/`` for
``--resume``, ``log.jsonl``, ``loss.png``) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vargpt.config import replace_fields
from vargpt.data.collate import IGNORE_INDEX
from vargpt.data.datasets import EncoderCache, VARGPTDataset, collate_vargpt_groups
from vargpt.data.records import load_records
from vargpt.files import write_json_atomic
from vargpt.pretrained import load_pretrained, save_pretrained
from vargpt.training.loop import train
from vargpt.training.stages import vargpt_stages

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"


def stage_loss_fn(text_weight: float, image_weight: float, align_weight: float = 0.0):  # noqa: ANN201
    """``loss_fn(model, batch)`` for :func:`vargpt.training.loop.train`.

    ``batch`` is a :class:`vargpt.model.VARGPTBatch` or a list of them (the sub-batches of one batch,
    :func:`vargpt.data.datasets.collate_vargpt_groups`). For a list the loss is exactly the whole batch's:
    the text CE is a mean over all assistant tokens, so each sub-batch's text weight is scaled by its share
    of them; image and alignment losses are means over generated images, so they must all sit in one
    sub-batch (a ValueError otherwise).
    """

    def loss_fn(model, batch) -> dict[str, torch.Tensor]:  # noqa: ANN001
        device = next(model.parameters()).device
        parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        n_text = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in parts]
        with_gen = [b.gen_codes is not None for b in parts]
        if sum(with_gen) > 1:
            raise ValueError("generated images are spread over several sub-batches; the image loss is a mean "
                             "over images, so they must be in one (use collate_vargpt_groups)")
        total_text = max(1, sum(n_text))
        outs = [model(b.to(device), text_weight=text_weight * n / total_text if len(parts) > 1 else text_weight,
                      image_weight=image_weight, align_weight=align_weight) for b, n in zip(parts, n_text, strict=True)]
        gen = next((o for o, g in zip(outs, with_gen, strict=True) if g), outs[0])
        text_tokens = max(1, sum(o.text_tokens for o in outs))
        metrics = {"loss": sum(o.loss for o in outs),
                   "text_loss": sum(o.text_loss * o.text_tokens for o in outs) / text_tokens,
                   "image_loss": gen.image_loss, "image_acc": gen.image_accuracy}
        if align_weight > 0:
            metrics["align_loss"] = gen.align_loss
        return metrics

    return loss_fn


@torch.no_grad()
def heldout_metrics(model, dataset: VARGPTDataset, *, batch_size: int = 32,  # noqa: ANN001
                    shuffle_prompts: bool = False, seed: int = 0,
                    weights: tuple[float, float, float] | None = None) -> dict[str, float]:
    """Mean text CE, image CE and image-code accuracy (teacher forced) over ``dataset``.

    Means are over tokens (text CE over assistant tokens, image CE and accuracy over generated image
    codes), batches collated as in training (understanding and generation samples padded apart).
    With ``weights`` = (text, image, alignment) loss weights the result also has ``loss``, the stage's
    objective on the held-out data (``align_loss``, a mean over generated images, when its weight is
    not 0). With ``shuffle_prompts`` the target images of each batch are permuted among its generation
    slots, so every image is scored under another sample's prompt: the gap between this image CE and
    the true one measures how much the model uses the prompt (0 = not at all).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    align_w = weights[2] if weights is not None else 0.0
    sums = {"text_loss": 0.0, "image_loss": 0.0, "image_code_accuracy": 0.0, "align_loss": 0.0}
    n_text = n_img = n_gen = 0
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(dataset), batch_size):
        groups = collate_vargpt_groups([dataset[j] for j in range(i, min(len(dataset), i + batch_size))],
                                       dataset.token_ids.pad)
        for batch in groups:
            if shuffle_prompts and batch.gen_codes is not None:
                perm = torch.randperm(batch.gen_codes[0].shape[0], generator=gen)
                batch.gen_codes = [c[perm] for c in batch.gen_codes]
                if batch.gen_labels is not None:
                    batch.gen_labels = batch.gen_labels[perm]
            out = model(batch.to(device), align_weight=align_w)
            sums["text_loss"] += float(out.text_loss) * out.text_tokens
            sums["image_loss"] += float(out.image_loss) * out.image_tokens
            sums["image_code_accuracy"] += float(out.image_accuracy) * out.image_tokens
            n_text, n_img = n_text + out.text_tokens, n_img + out.image_tokens
            if batch.gen_codes is not None:
                k = batch.gen_codes[0].shape[0]
                sums["align_loss"] += float(out.align_loss) * k
                n_gen += k
    model.train(was_training)
    result = {"text_loss": sums["text_loss"] / max(1, n_text), "image_loss": sums["image_loss"] / max(1, n_img),
              "image_code_accuracy": sums["image_code_accuracy"] / max(1, n_img)}
    if weights is not None:
        text_w, image_w, _ = weights
        result["loss"] = text_w * result["text_loss"] + image_w * result["image_loss"]
        if align_w:
            result["align_loss"] = sums["align_loss"] / max(1, n_gen)
            result["loss"] += align_w * result["align_loss"]
    return result


def train_stage(
    stage: str,
    *,
    from_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    max_steps: int | None = None,
    batch_size: int | None = None,
    trainable: Sequence[str] | None = None,
    resume: bool = False,
    seed: int = 0,
    max_eval: int = 256,
    progress: bool = True,
    encoder_cache: EncoderCache | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``stage`` ("stage1" | "stage2" | "stage3") of :func:`vargpt.training.stages.vargpt_stages`.

    Args:
        stage: which stage.
        from_dir: the model to start from (a model directory or a previous stage's output folder).
        data_dir: dataset in the README format (train split trains, test split gives held-out losses).
        out_dir: output folder (see module docstring).
        preset: stage recipe ("tiny" or "vargpt-v1-7b").
        max_steps: override the recipe's step count.
        batch_size: override the recipe's micro-batch.
        trainable: override the stage's trainable parameter globs (``fnmatch`` over
            :class:`vargpt.model.VARGPT` parameter names), e.g. for ablations (:mod:`vargpt.ablation`);
            None keeps the stage's own set. Data, loss weights and optimiser stay the stage's.
        resume: continue an interrupted run from ``out_dir/train/checkpoint``.
        seed: data order and dropout seed.
        max_eval: held-out records used for the held-out loss.
        progress: progress bars.
        encoder_cache: reuse the vision features and VQ codes of images that an earlier stage of this
            process encoded with the same frozen encoders (e.g. one cache for stages 1-3 of a run).
        overrides: fields of the stage's :class:`~vargpt.config.TrainConfig` to replace, e.g. ``lr=5e-4``.

    Returns:
        Metrics: train seconds, held-out loss before/after, image-code accuracy, trainable parameters.

    Raises:
        ConfigError: an override names no :class:`~vargpt.config.TrainConfig` field.
    """
    specs = vargpt_stages(preset)
    if stage not in specs:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(specs)}")
    spec = specs[stage]
    cfg = dataclasses.replace(spec.train, seed=seed, **({"max_steps": max_steps, "epochs": 0.0} if max_steps else {}))
    if batch_size:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if trainable is not None:
        cfg = dataclasses.replace(cfg, trainable=tuple(trainable))
    cfg = replace_fields(cfg, overrides, f"{stage} TrainConfig")
    out = Path(out_dir)
    model, tokenizer = load_pretrained(from_dir)
    if cfg.image_min_scale_share is not None:  # this stage's floor on the scales' loss shares (not saved)
        dec = model.vargpt_gen
        dec.loss_weights_L = dec.code_loss_weights(cfg.image_min_scale_share).to(dec.loss_weights_L.device)
    train_recs = spec.select(load_records(data_dir, "train"), seed)
    test_recs = spec.select(load_records(data_dir, "test"), seed)
    # A seeded sample, not the head: a stage's selection is grouped by kind (understanding first).
    test_recs = random.Random(seed).sample(test_recs, min(max_eval, len(test_recs)))
    if not train_recs:
        raise ValueError(f"{stage}: the dataset has no records for this stage ({spec.description})")
    logger.info("%s: %d train / %d held-out records", stage, len(train_recs), len(test_recs))
    train_ds = VARGPTDataset(train_recs, tokenizer, model, progress=progress, cache=encoder_cache)
    eval_ds = (VARGPTDataset(test_recs, tokenizer, model, progress=progress, cache=encoder_cache)
               if test_recs else None)
    weights = (cfg.text_loss_weight, cfg.image_loss_weight, cfg.cond_align_weight)
    loss_fn = stage_loss_fn(*weights)
    # The held-out evaluation is heldout_metrics itself, so its last one is the stage's final metrics.
    result = train(model, loss_fn=loss_fn, train_data=train_ds,
                   collate=partial(collate_vargpt_groups, pad_id=model.token_ids.pad), cfg=cfg, out_dir=out / "train",
                   eval_data=eval_ds, save_config=model.cfg.to_dict(), resume=resume, progress=progress,
                   eval_fn=partial(heldout_metrics, batch_size=cfg.batch_size, weights=weights))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(True)
    model.vae_local.requires_grad_(False)
    save_pretrained(model, tokenizer, out / MODEL_SUBDIR)
    metrics = {"stage": stage, **result.to_dict(), "trainable": list(cfg.trainable),
               "image_min_scale_share": cfg.image_min_scale_share,
               "trainable_parameters": n_trainable, "train_records": len(train_recs)}
    if eval_ds is not None:
        heldout = {k: v for k, v in result.eval_metrics.get(result.steps, {}).items() if k != "loss"}
        if "image_loss" not in heldout:  # a run resumed from a checkpoint whose log holds only losses
            heldout = heldout_metrics(model, eval_ds, batch_size=cfg.batch_size, weights=weights)
            heldout.pop("loss")
        metrics["heldout"] = heldout
        if sum(len(r.generated_images) for r in test_recs) > 1:
            shuffled = heldout_metrics(model, eval_ds, batch_size=cfg.batch_size, shuffle_prompts=True, seed=seed)
            metrics["heldout"]["image_loss_shuffled_prompts"] = shuffled["image_loss"]
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence marks the stage as finished
    return metrics
