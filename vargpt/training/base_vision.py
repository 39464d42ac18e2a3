"""Contrastive (CLIP) pretraining of the tiny vision tower on a dataset's own image-text pairs.

Each image is paired with the text of every record that shows it: the record's message contents with
placeholders removed (a caption, a question and its answer, a generation request, ...). Dataset
agnostic: nothing beyond the record format is used. See :mod:`vargpt.understanding.contrastive` for
the model and the multi-positive loss. No augmentation (a horizontal flip would break "left"/"right").

    >>> train_vision_tower("data/sw", "runs/base/tokenizer", "runs/base/vision", preset="tiny")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vargpt.config import TrainConfig, VARGPTConfig, VisionTowerConfig, replace_fields
from vargpt.data.records import DatasetError, Record, load_image
from vargpt.training.base_text import (
    captioning_records,
    load_split,
    load_text_tokenizer,
    run_metrics,
    strip_placeholders,
)
from vargpt.training.checkpoint import load_checkpoint
from vargpt.training.loop import SAMPLE_LOSSES, train
from vargpt.understanding.contrastive import ContrastiveModel, TextEncoder
from vargpt.understanding.vision_tower import ImageProcessor, VisionTower

logger = logging.getLogger(__name__)

VISION_TRAIN = TrainConfig(name="base-vision", lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_ratio=0.1,
                           min_lr_ratio=0.1, batch_size=128, max_steps=450, grad_clip=1.0)
"""Default recipe of :func:`train_vision_tower`. Hard-example replay (``replay_fraction=0.5``) raises the base
LLaVA's held-out colour+shape accuracy (0.635 / 0.706 / 0.709 -> 0.740 / 0.715 / 0.746 over three LLaVA seeds)
but lowered generation in all three whole-recipe comparisons (colour+shape -0.01 / -0.03 / -0.12), so it is
off (README, ``replay_fraction``)."""


@dataclass(frozen=True)
class Pair:
    """One training example: indices into the image and text tables (-1 = none)."""

    image: int
    text: int
    question: int = -1
    answer: int = -1


@dataclass(frozen=True)
class PairData:
    """Image-text pairs over deduplicated tables of images and texts."""

    pixels_N3HW: torch.Tensor
    """Processed images (float32, normalised)."""
    text_ids_MT: torch.Tensor
    """Right-padded token ids of the distinct texts (pair texts, questions and answers)."""
    text_mask_MT: torch.Tensor
    """1 = token."""
    pairs: list[Pair]
    """The examples."""
    vocab_size: int
    """Text vocabulary size (width of the multi-hot answers)."""
    image_questions: Mapping[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    """Every distinct ``(question, answer)`` text pair asked about each image (image index -> pairs)."""
    every_question: bool = False
    """:meth:`collate`: a pair's answer loss covers every question about its image
    (:attr:`image_questions`), not only the pair's own."""

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]

    def subset(self, pairs: list[Pair]) -> PairData:
        """Same tables, other pairs."""
        return dataclasses.replace(self, pairs=pairs)

    def _texts(self, idx_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if idx_B.numel() == 0:
            return torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long)
        mask_BT = self.text_mask_MT[idx_B.clamp_min(0)] * (idx_B[:, None] >= 0)
        T = max(1, int(mask_BT.sum(1).max()))
        return self.text_ids_MT[idx_B.clamp_min(0), :T], mask_BT[:, :T]

    def collate(self, batch: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """Pixels, texts and the multi-positive matrix of a batch of B pairs, and its M questions: the distinct
        question texts ``question_ids`` (U, each encoded once), for each question its text's row
        ``question_index`` and its pair ``question_pair``, and multi-hot ``answers`` (M, V)."""
        img_B = torch.tensor([p.image for p in batch])
        txt_B = torch.tensor([p.text for p in batch])
        ids, mask = self._texts(txt_B)
        if self.every_question:
            rows = [(j, q, a) for j, p in enumerate(batch) for q, a in self.image_questions.get(p.image, ())]
        else:
            rows = [(j, p.question, p.answer) for j, p in enumerate(batch) if p.question >= 0]
        distinct = sorted({q for _, q, _ in rows})
        row_of = {q: u for u, q in enumerate(distinct)}
        q_ids, q_mask = self._texts(torch.tensor(distinct, dtype=torch.long))
        a_ids, a_mask = self._texts(torch.tensor([a for _, _, a in rows], dtype=torch.long))
        answers_MV = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool)
        answers_MV.scatter_(1, a_ids, a_mask.bool())  # padding ids only ever receive False
        positives_BB = (img_B[:, None] == img_B[None, :]) | (txt_B[:, None] == txt_B[None, :])
        return {"pixels": self.pixels_N3HW[img_B], "ids": ids, "mask": mask, "positives": positives_BB,
                "question_ids": q_ids, "question_mask": q_mask, "answers": answers_MV,
                "question_index": torch.tensor([row_of[q] for _, q, _ in rows], dtype=torch.long),
                "question_pair": torch.tensor([j for j, _, _ in rows], dtype=torch.long)}


def record_text(record: Record) -> str:
    """The text paired with a record's images: its message contents, placeholders removed."""
    return " ".join(strip_placeholders(m.content).strip() for m in record.messages).strip()


def question_answer(record: Record) -> tuple[str, str] | None:
    """The first user question and the assistant answer right after it, if the record has them."""
    msgs = [m for m in record.messages if m.role != "system"]
    for user, reply in zip(msgs, msgs[1:], strict=False):
        if user.role == "user" and reply.role == "assistant":
            q, a = strip_placeholders(user.content).strip(), strip_placeholders(reply.content).strip()
            return (q, a) if q and a else None
    return None


def build_pairs(
    records: Sequence[Record], eval_records: Sequence[Record], tokenizer: Any, processor: ImageProcessor, *,
    max_text_len: int, max_eval_pairs: int = 256, every_question: bool = True,
) -> tuple[PairData, PairData]:
    """Train and held-out pairs sharing one image/text table (each image loaded, each text tokenized once).

    Every input image (``<image>``) of a record is paired with the record's text; records whose images are
    only generation targets are skipped, unless no record has an input image (text-to-image data): then
    each generated image is paired with its prompt (:func:`~vargpt.training.base_text.captioning_records`).
    The held-out pairs are an evenly spaced subset of ``eval_records``' pairs, or of the train pairs when
    ``eval_records`` is empty. With ``every_question`` a pair's answer loss covers every question asked about
    its image in any record (:attr:`PairData.every_question`), not only its own record's.
    """
    images: dict[Path, int] = {}
    texts: dict[str, int] = {}
    questions: dict[int, list[tuple[int, int]]] = {}

    def pairs_of(recs: Sequence[Record]) -> list[Pair]:
        out: list[Pair] = []
        for record in recs:
            text, qa = record_text(record), question_answer(record)
            if not record.input_images or not text:
                continue
            t = texts.setdefault(text, len(texts))
            q, a = (texts.setdefault(qa[0], len(texts)), texts.setdefault(" " + qa[1], len(texts))) if qa else (-1, -1)
            for path in record.input_images:
                out.append(Pair(images.setdefault(path, len(images)), t, q, a))
                if q >= 0 and (q, a) not in questions.setdefault(out[-1].image, []):
                    questions[out[-1].image].append((q, a))
        return out

    train_pairs, eval_pairs = pairs_of(records), pairs_of(eval_records)
    if not train_pairs:  # text-to-image data: pair each generated image with its prompt
        train_pairs, eval_pairs = pairs_of(captioning_records(records)), pairs_of(captioning_records(eval_records))
    if not train_pairs:
        raise DatasetError("no record pairs an input <image> with text; cannot pretrain the vision tower")
    eval_pairs = eval_pairs or train_pairs
    eval_pairs = eval_pairs[:: max(1, len(eval_pairs) // max_eval_pairs)][:max_eval_pairs]
    pixels = torch.stack([processor.process_one(load_image(p)) for p in images])
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_text_len] for t in texts]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, :len(e)] = 1
    data = PairData(pixels, ids, mask, train_pairs, len(tokenizer),
                    image_questions={i: tuple(qa) for i, qa in questions.items()}, every_question=every_question)
    return data, data.subset(eval_pairs)


def _make_loss(answer_weight: float, contrastive_weight: float = 1.0):  # noqa: ANN202
    def loss_fn(model: ContrastiveModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = model(batch["pixels"], batch["ids"], batch["mask"], batch["positives"],
                      question_ids_UQ=batch["question_ids"], question_mask_UQ=batch["question_mask"],
                      answer_targets_MV=batch["answers"], question_index_M=batch["question_index"],
                      question_pair_M=batch["question_pair"])
        per_sample = contrastive_weight * parts.pop("contrastive_per_sample")
        if "answer_per_sample" in parts:
            per_sample = per_sample + answer_weight * parts.pop("answer_per_sample")
        loss = contrastive_weight * parts["contrastive"] + answer_weight * parts.get("answer", 0.0)
        return {"loss": loss, **parts, "scale": model.logit_scale.detach().exp(), SAMPLE_LOSSES: per_sample}
    return loss_fn


def train_vision_tower(
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    text_width: int = 128,
    text_depth: int = 2,
    max_text_len: int = 64,
    answer_loss_weight: float = 4.0,
    every_question: bool = True,
    train_cfg: TrainConfig | None = None,
    tower_overrides: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain the preset's vision tower (CLIP ViT or ResNet) contrastively against a small text encoder.

    Args:
        data_dir: dataset folder; held-out loss on the ``test`` split when present.
        tokenizer_dir: the text tokenizer (:func:`~vargpt.training.base_text.train_text_tokenizer`).
        out_dir: receives ``checkpoint/`` (whole contrastive model; :func:`load_vision_tower` extracts
            the tower) and logs.
        text_width / text_depth / max_text_len: the text encoder's size.
        answer_loss_weight: weight of the auxiliary question-conditioned answer loss (0 = pure CLIP;
            see :mod:`vargpt.understanding.contrastive`). 4 measured best on ShapesWorld (tiny LLaVA
            held-out position accuracy 0.31 at weight 1 -> 0.53 at 4; colour 0.77 -> 0.79).
        every_question: the answer loss of each pair in a batch covers every question asked about its image
            (ShapesWorld: all five, about 640 questions a step instead of the about 107 pairs that carry one),
            not only the pair's own. The tower reads the image once for all of them and each distinct
            question text is encoded once per batch. Why: the signal the tower lacked was the hard
            attribute's (shape); asked once per image among other questions it is ~1/6 of each batch.
            On ShapesWorld (session 17, same data, 2 threads) a linear probe of the features reads
            one-object shape 0.90 instead of 0.72 (an attention probe: colour-by-shape 0.95 vs 0.88,
            shape-by-colour 0.89 vs 0.72), and the base LLaVA built on it answers held-out colour and shape
            questions 0.749 / 0.815 / 0.844 (LLaVA seeds 0 / 1 / 2) instead of 0.741 / 0.785 / 0.789, for
            ~20 % more tower time (README).
        train_cfg / overrides: optimiser recipe (default :data:`VISION_TRAIN`) and field overrides.
        tower_overrides: replace fields of the preset's :class:`~vargpt.config.VisionTowerConfig`
            (stored in the checkpoint, so later steps follow).

    Returns:
        Metrics: held-out ``loss_before/after``, train loss first/last, steps, seconds.

    Raises:
        ConfigError: an override names no field of :class:`~vargpt.config.TrainConfig` (``overrides``) or
            :class:`~vargpt.config.VisionTowerConfig` (``tower_overrides``).
    """
    t0 = time.perf_counter()
    vt_cfg = replace_fields(VARGPTConfig.from_name(preset).vision_tower, tower_overrides or {},
                            "train_vision_tower tower_overrides")
    tcfg = replace_fields(train_cfg or VISION_TRAIN, overrides, "train_vision_tower")
    tokenizer = load_text_tokenizer(tokenizer_dir)
    processor = ImageProcessor.from_config(vt_cfg)
    train_data, eval_data = build_pairs(load_split(data_dir, "train"), load_split(data_dir, "test"),
                                        tokenizer, processor, max_text_len=max_text_len,
                                        every_question=every_question)
    torch.manual_seed(tcfg.seed)
    text_encoder = TextEncoder(len(tokenizer), width=text_width, depth=text_depth, max_len=max_text_len)
    model = ContrastiveModel(VisionTower.from_config(vt_cfg), text_encoder, vt_cfg.projection_dim,
                             answer_head=answer_loss_weight > 0)
    save_config = {
        "kind": "vision_contrastive", "preset": preset, "vision_tower": dataclasses.asdict(vt_cfg),
        "hf_config": model.vision_tower.hf_config_dict(),
        "text_encoder": {"vocab_size": len(tokenizer), "width": text_width, "depth": text_depth,
                         "max_len": max_text_len},
        "answer_loss_weight": answer_loss_weight, "every_question": every_question,
    }
    result = train(model, loss_fn=_make_loss(answer_loss_weight), train_data=train_data,
                   collate=train_data.collate, cfg=tcfg, out_dir=out_dir, eval_data=eval_data,
                   save_config=save_config, resume=resume, progress=progress)
    return run_metrics(result, t0, n_train=len(train_data), unit="pairs")


def load_vision_tower(run_dir: str | Path) -> tuple[VisionTower, ImageProcessor, VisionTowerConfig]:
    """The pretrained tower, its image processor and config from a :func:`train_vision_tower` run."""
    state, config, _ = load_checkpoint(Path(run_dir) / "checkpoint", with_trainer_state=False)
    if config.get("kind") != "vision_contrastive":
        raise ValueError(f"{run_dir} is not a vision-tower run (kind={config.get('kind')!r})")
    vt_cfg = VisionTowerConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config["vision_tower"].items()})
    tower = VisionTower.from_hf_config(config["hf_config"], feature_layer=vt_cfg.feature_layer,
                                       drop_cls=vt_cfg.drop_cls)
    prefix = "vision_tower."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return tower.eval(), ImageProcessor.from_config(vt_cfg), vt_cfg
