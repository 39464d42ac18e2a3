"""Class-conditional pretraining of the visual decoder (VAR, SPEC sections 2.8 and 5).

Every record of the dataset with a ``class`` (ShapesWorld: ``"{colour} {shape}"`` for one-object
images) gives an (image, class) pair; the class vocabulary is the sorted set of training classes and is
stored with the checkpoint. A dataset with more classes than the preset's ``num_classes`` keeps the
most frequent ones and trains the images of the others on the unconditional row; a dataset with no
``class`` at all trains unconditionally on every image of its train split (the unconditional row is
the condition VARGPT uses for every generated image, so this is the part of the decoder it needs).
Images are tokenized once by the frozen VQ-VAE and the codes and teacher-forcing inputs are kept in
memory. The model is trained with the shared loop (:func:`vargpt.training.loop.train`: AdamW with
VAR's no-decay groups, warm-up + decay, clipping, resumable safetensors checkpoints) on the plain
token-mean cross-entropy of SPEC 2.8 with class dropout ``cond_drop_rate`` for classifier-free guidance.

    >>> metrics = train_decoder(data_dir="data/sw", tokenizer_dir="runs/tok", out_dir="runs/dec")
    >>> decoder, classes = load_decoder("runs/dec")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vargpt.config import TrainConfig, VARGPTConfig, VisualDecoderConfig, VQVAEConfig
from vargpt.data.records import DatasetError, Record, image_to_tensor, load_image, load_records, unique_images
from vargpt.tokenizer.vqvae import MultiScaleVQVAE, vqvae_config_from_dict
from vargpt.training.checkpoint import is_checkpoint, load_checkpoint
from vargpt.training.loop import train
from vargpt.visual_decoder.decoder import VisualDecoder
from vargpt.visual_decoder.loss import code_loss

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoint"
"""The shared loop writes the checkpoint to ``out_dir/checkpoint``."""

RECIPES: dict[str, TrainConfig] = {
    # Tuned on ShapesWorld 32 px with 2 CPU threads (benchmarks/decoder.py): a ~6 minute budget. At the same
    # number of images (32k), more and smaller steps learn more: held-out CE / oracle colour+shape of samples
    # 1.122 / 0.087 at 500 x 64, 1.043 / 0.161 at 1000 x 32, 0.997 / 0.190 at 2000 x 16. Peak lr 3e-3 instead
    # of 2e-3 (2000 x 16): colour+shape 0.183 -> 0.234 over 56 classes x 32 samples (4e-3: 0.243), same CE.
    "tiny": TrainConfig(
        name="decoder-tiny", lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_ratio=0.05,
        schedule="cosine", min_lr_ratio=0.05, batch_size=16, max_steps=2000, grad_clip=2.0, save_every=400,
    ),
    # VAR-d30 recipe (SPEC 5): peak lr 8e-5 * 1024 / 256 = 3.2e-4, wd 0.05, betas (0.9, 0.95), clip 2.0;
    # per-process batch here, scale with the number of processes.
    "vargpt-v1-7b": TrainConfig(
        name="decoder-d30", lr=3.2e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_ratio=0.02,
        schedule="linear", min_lr_ratio=0.01, batch_size=32, max_steps=500_000, grad_clip=2.0,
        save_every=5_000,
    ),
}
"""Optimiser recipe per model preset."""

_EVAL_IMAGES = 512
"""Held-out images (test split, seen classes) for the held-out loss at the start and the end."""


@dataclass(frozen=True)
class ClassCodes:
    """A tokenized class-conditional dataset, held in memory.

    Attributes:
        classes: class names; label i is ``classes[i]``.
        labels_N: class index per image.
        gt_NL: ground-truth codes of all scales, concatenated (N, L).
        x_NlZ: teacher-forcing inputs (N, L - pn_0^2, Z).
    """

    classes: list[str]
    labels_N: torch.Tensor
    gt_NL: torch.Tensor
    x_NlZ: torch.Tensor

    def __len__(self) -> int:
        return self.labels_N.shape[0]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Batch of the given items: labels_B, gt_BL, x_BlZ."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"labels_B": self.labels_N[idx], "gt_BL": self.gt_NL[idx], "x_BlZ": self.x_NlZ[idx]}


def class_pairs(records: list[Record]) -> list[tuple[Path, str]]:
    """Distinct (image, class) pairs of the records that carry a class, in first-seen order.

    The image is the record's generated image when it has one (a class-to-image sample), else its
    first image. When some generation record carries a class, only generation records count: the
    class of a class-to-image sample is what the decoder is asked to draw, while an understanding
    record's class may say less about the same image (ShapesWorld's layout classes: a question's
    record is "red star", the drawing instruction "small red star left").
    """
    generation = [r for r in records if r.cls is not None and r.generated_images]
    pairs: dict[tuple[Path, str], None] = {}
    for rec in generation or records:
        if rec.cls is None or not rec.images:
            continue
        image = (rec.generated_images or list(rec.images))[0]
        pairs.setdefault((image, rec.cls), None)
    return list(pairs)


def decoder_pairs(records: list[Record], num_classes: int) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """Training pairs and class vocabulary for :func:`train_decoder` (see the module docstring).

    Returns:
        ``(pairs, classes)``: ``classes`` is the sorted vocabulary (at most ``num_classes``: the most
        frequent, ties by name); a pair whose class is None trains the unconditional row. Without
        any class, every distinct image of ``records`` is an unconditional pair.
    """
    pairs: list[tuple[Path, str | None]] = list(class_pairs(records))
    if not pairs:
        return [(p, None) for p in unique_images(records)], []
    counts = Counter(c for _, c in pairs)
    kept = set(sorted(counts, key=lambda c: (-counts[c], c))[:num_classes])
    if len(kept) < len(counts):
        logger.warning("%d classes but num_classes=%d: the %d most frequent are kept, the images of the others "
                       "train the unconditional row", len(counts), num_classes, num_classes)
    return [(p, c if c in kept else None) for p, c in pairs], sorted(kept)


@torch.no_grad()
def tokenize_pairs(
    vqvae: MultiScaleVQVAE, pairs: list[tuple[Path, str | None]], classes: list[str], batch_size: int = 256,
    uncond_label: int | None = None,
) -> ClassCodes:
    """Load and tokenize every image of ``pairs`` (only classes in ``classes`` are kept; pairs whose
    class is None get ``uncond_label`` when it is given)."""
    index: dict[str | None, int] = {c: i for i, c in enumerate(classes)}
    if uncond_label is not None:
        index[None] = uncond_label
    pairs = [(p, c) for p, c in pairs if c in index]
    size = vqvae.cfg.image_size
    gts, xs = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images_B3HW = torch.stack([image_to_tensor(load_image(p, size)) for p, _ in chunk])
        idx_list = vqvae.encode(images_B3HW)
        gts.append(torch.cat(idx_list, dim=1))
        xs.append(vqvae.quantize.teacher_forcing_input(idx_list))
    labels_N = torch.tensor([index[c] for _, c in pairs], dtype=torch.long)
    L, Z = vqvae.cfg.tokens_total, vqvae.cfg.z_channels
    gt_NL = torch.cat(gts) if gts else torch.zeros(0, L, dtype=torch.long)
    x_NlZ = torch.cat(xs) if xs else torch.zeros(0, L - vqvae.cfg.patch_nums[0] ** 2, Z)
    return ClassCodes(list(classes), labels_N, gt_NL, x_NlZ)


def concat_codes(a: ClassCodes, b: ClassCodes) -> ClassCodes:
    """Rows of ``a`` then rows of ``b`` (same class vocabulary)."""
    if a.classes != b.classes:
        raise ValueError("cannot concatenate codes over different class vocabularies")
    return ClassCodes(a.classes, torch.cat((a.labels_N, b.labels_N)), torch.cat((a.gt_NL, b.gt_NL)),
                      torch.cat((a.x_NlZ, b.x_NlZ)))


def decoder_loss(model: VisualDecoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy of teacher-forced logits (weighted as ``cfg.loss_weighting``; VAR's token mean,
    SPEC 2.8, by default), the plain token-mean ``token_ce`` and the token accuracy."""
    logits_BLK = model(batch["labels_B"], batch["x_BlZ"])
    loss = code_loss(logits_BLK, batch["gt_BL"], model.loss_weights_L)
    with torch.no_grad():
        token_ce = F.cross_entropy(logits_BLK.flatten(0, 1), batch["gt_BL"].flatten())
    acc = (logits_BLK.detach().argmax(-1) == batch["gt_BL"]).float().mean()
    return {"loss": loss, "token_ce": token_ce, "token_acc": acc}


def _vqvae_for_preset(vqvae: MultiScaleVQVAE, preset_vq: VQVAEConfig, preset: str) -> None:
    got, want = vqvae.cfg, preset_vq
    if (got.patch_nums, got.z_channels, got.vocab_size) != (want.patch_nums, want.z_channels, want.vocab_size):
        logger.warning("tokenizer config differs from preset %r (patch_nums %s vs %s); the decoder follows "
                       "the tokenizer", preset, got.patch_nums, want.patch_nums)


def train_decoder(
    *,
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    preset: str = "tiny",
    max_steps: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the preset's visual decoder class-conditionally (or unconditionally) on ``data_dir``.

    Args:
        data_dir: dataset folder; records with a ``class`` are used (``test`` split, if present, gives
            the held-out loss on classes seen in training); without any class, every image trains
            the unconditional row (see the module docstring).
        tokenizer_dir: a trained tokenizer checkpoint (``MultiScaleVQVAE.from_pretrained``); frozen.
        out_dir: receives ``checkpoint/`` (model.safetensors, config.json with the class vocabulary,
            trainer_state.pt), ``log.jsonl`` and ``loss.png``; load with :func:`load_decoder`.
        preset: model preset (``VARGPTConfig.from_name``) giving the decoder sizes and recipe.
        max_steps: optimiser steps (default: the recipe's).
        batch_size: images per step (default: the recipe's).
        resume: continue exactly from ``out_dir/checkpoint``.
        seed: seed of initialisation, data order and class dropout.
        progress: show a tqdm bar.

    Returns:
        Metrics: steps, train loss first/last, held-out loss before/after, ``train_seconds`` (loop),
        ``tokenize_seconds``, number of classes and images, checkpoint path.

    Raises:
        DatasetError: the train split has no image.
    """
    if preset not in RECIPES:
        raise ValueError(f"no decoder recipe for preset {preset!r}; choose one of {sorted(RECIPES)}")
    cfg = VARGPTConfig.from_name(preset)
    overrides = {k: v for k, v in (("max_steps", max_steps), ("batch_size", batch_size)) if v is not None}
    tc = dataclasses.replace(RECIPES[preset], seed=seed, **overrides)
    t0 = time.perf_counter()
    vqvae = MultiScaleVQVAE.from_pretrained(tokenizer_dir).requires_grad_(False)
    _vqvae_for_preset(vqvae, cfg.vqvae, preset)
    dc = cfg.visual_decoder
    train_pairs, classes = decoder_pairs(load_records(data_dir, "train"), dc.num_classes)
    if not train_pairs:
        raise DatasetError(f"{data_dir}: the train split has no image to pretrain the visual decoder on")
    if not classes:
        logger.info("%s: no record has a 'class'; the decoder trains unconditionally on %d images", data_dir,
                    len(train_pairs))
    train_codes = tokenize_pairs(vqvae, train_pairs, classes, uncond_label=dc.num_classes)
    eval_pairs: list[tuple[Path, str | None]] = []
    if (Path(data_dir) / "test.jsonl").is_file() or (Path(data_dir) / "test.json").is_file():
        test_records = load_records(data_dir, "test")
        eval_pairs = ([p for p in class_pairs(test_records) if p[1] in classes] if classes
                      else [(p, None) for p in unique_images(test_records)])[:_EVAL_IMAGES]
    # One in-memory table for both splits, so the shared loop's single collate serves both index ranges.
    codes = concat_codes(train_codes, tokenize_pairs(vqvae, eval_pairs, classes, uncond_label=dc.num_classes))
    n_train, n_eval = len(train_codes), len(codes) - len(train_codes)
    tokenize_seconds = time.perf_counter() - t0
    logger.info("tokenized %d training images of %d classes in %.1fs", n_train, len(classes),
                tokenize_seconds)

    dc = dataclasses.replace(dc, class_names=tuple(classes))
    model = VisualDecoder(dc, vqvae.cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    save_config = {
        "kind": "visual_decoder", "preset": preset, "classes": classes,
        "visual_decoder": dataclasses.asdict(dc), "vqvae": dataclasses.asdict(vqvae.cfg),
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()), "train": dataclasses.asdict(tc),
    }
    result = train(model, loss_fn=decoder_loss, train_data=range(n_train), collate=codes.collate, cfg=tc,
                   out_dir=out_dir, eval_data=range(n_train, n_train + n_eval) if n_eval else None,
                   save_config=save_config, resume=resume, progress=progress)
    return result.to_dict() | {
        "tokenize_seconds": round(tokenize_seconds, 2),
        "classes": len(classes),
        "unconditional_train_images": int((train_codes.labels_N == dc.num_classes).sum()),
        "train_images": n_train,
        "eval_images": n_eval,
        "threads": torch.get_num_threads(),
    }


def load_decoder(ckpt_dir: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[VisualDecoder, list[str]]:
    """Load a decoder written by :func:`train_decoder` (``out_dir`` or ``out_dir/checkpoint``), in eval mode.

    Returns:
        (decoder, classes): label i of the decoder is the class name ``classes[i]`` (also
        ``decoder.cfg.class_names``).
    """
    d = Path(ckpt_dir)
    if not is_checkpoint(d) and is_checkpoint(d / CHECKPOINT_SUBDIR):
        d = d / CHECKPOINT_SUBDIR
    state, config, _ = load_checkpoint(d, with_trainer_state=False)
    classes = list(config.get("classes", []))
    dc = VisualDecoderConfig(**{**config["visual_decoder"], "class_names": tuple(classes)})
    model = VisualDecoder(dc, vqvae_config_from_dict(config["vqvae"]))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), classes
