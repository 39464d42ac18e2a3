"""The tiny "LLaVA-1.5" the VARGPT stages start from: projector alignment, then instruction tuning.

LLaVA-1.5 (Liu et al. 2023) trains in two steps, and so does the tiny preset:

1. :func:`train_alignment`: only the understanding projector trains; LLM and vision tower are frozen.
2. :func:`train_instruct`: the projector and the LLM train; the vision tower stays frozen.

Both use the dataset's understanding conversations (records with at least one input ``<image>`` and no
``<image_gen>``), tokenized by :func:`vargpt.data.collate.encode_record` (each image expanded to P
slots, loss on assistant tokens and ``</s>`` only). The vision tower is frozen in both steps, so its
features are computed once per image (:func:`tower_features`) and the training forward starts at the
projector. With ``TrainConfig.prefix_pack`` (the tiny instruction tuning) the conversations about one image
are packed into one sequence that holds their shared prefix once (:func:`pack_shared_prefixes`).

Output directory of either step: ``checkpoint/`` (the whole :class:`~vargpt.understanding.llava.Llava`
state, ``config.json`` with everything needed to rebuild it, trainer state), ``tokenizer/``, logs.
:func:`load_llava` rebuilds the model.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vargpt.config import ProjectorConfig, TrainConfig, VARGPTConfig, VisionTowerConfig, replace_fields
from vargpt.data.collate import IGNORE_INDEX, encode_record, pad_samples
from vargpt.data.records import DatasetError, Record, load_image
from vargpt.llm.backbone import LLMBackbone
from vargpt.special_tokens import SpecialTokenIds
from vargpt.training.base_text import (
    captioning_records,
    load_llm,
    load_split,
    load_text_tokenizer,
    run_metrics,
    supervised_next_token_losses,
)
from vargpt.training.base_vision import load_vision_tower
from vargpt.training.checkpoint import load_checkpoint
from vargpt.training.loop import SAMPLE_LOSSES, train
from vargpt.understanding.llava import Llava
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import ImageProcessor, VisionTower

logger = logging.getLogger(__name__)

ALIGN_TRAIN = TrainConfig(name="base-align", trainable=("projector.*",), lr=3e-3, weight_decay=0.0,
                          warmup_ratio=0.1, batch_size=32, max_steps=300, grad_clip=1.0)
"""Default recipe of :func:`train_alignment` (LLaVA-1.5 stage 1: projector only, high lr). Adding
``"vision_tower.*"`` to ``trainable`` trains the tower too (on pixels, through the frozen LLM); on the tiny
preset that measured worse (held-out colour accuracy 0.80 -> 0.34 at lr 2e-3, shape unchanged)."""
INSTRUCT_TRAIN = TrainConfig(name="base-instruct", trainable=("projector.*", "llm.*"), lr=1e-3,
                             weight_decay=0.0, warmup_ratio=0.05, min_lr_ratio=0.05, batch_size=8,
                             max_steps=700, grad_clip=1.0, prefix_pack=8)
"""Default recipe of :func:`train_instruct` (LLaVA-1.5 stage 2: projector + LLM): batches of 8 shared-prefix
packs (``prefix_pack=8``: all questions about one image in one sequence, about 48 conversations a step).
On the tiny preset that is 500 steps in the time 300 unpacked steps of 32 took, and more learning: held-out
colour+shape 0.676 / 0.643 -> 0.784 / 0.729 (seeds 0 / 1; 800 packed steps 0.773 / 0.750), at lr 2e-3 then.
Peak lr 1e-3 instead of 2e-3: at 2e-3 two of five tiny LLMs (other seeds, step counts or corpora; same data
and tower) got stuck on one attribute (held-out colour+shape 0.355 with colour 0.155, 0.466 with shape 0.13;
instruction loss plateaued at 0.42-0.47 where the others reach 0.19-0.21); at 1e-3 those read 0.699 / 0.634
and the other three 0.734 / 0.749 / 0.751 (0.705 / 0.768 / 0.714 at 2e-3): mean 0.602 -> 0.713.
700 steps instead of 500 (session 17, with the tower that answers every question about an image): held-out
colour+shape 0.749 / 0.815 / 0.844 -> 0.803 / 0.829 / 0.849 (LLaVA seeds 0 / 1 / 2), about 20 s more."""


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnderstandingSample:
    """One tokenized understanding conversation and the indices of its images in the feature table."""

    input_ids: list[int]
    labels: list[int]
    image_rows: list[int]


@dataclass(frozen=True)
class PrefixPack:
    """Several :class:`UnderstandingSample` that share a token prefix, as one sequence: the prefix once,
    then each sample's remaining tokens (a branch). ``segments``: 0 on the prefix, ``b`` on branch b;
    ``positions``: each branch's RoPE positions continue the prefix's, as in its own sequence."""

    input_ids: list[int]
    labels: list[int]
    image_rows: list[int]
    segments: list[int]
    positions: list[int]
    num_samples: int


def _shared_prefix_length(group: Sequence[UnderstandingSample], image_token_id: int) -> int:
    """Tokens the samples of ``group`` (same images) can share: their common prefix, cut so that it holds
    no supervised token and every branch starts with an unsupervised one (a branch's first token would
    otherwise be predicted from another branch's last); 0 when that prefix does not hold every image slot
    or would leave a sample without a branch."""
    n = min(len(s.input_ids) for s in group)
    first = group[0].input_ids
    for i in range(n):
        if any(s.input_ids[i] != first[i] for s in group) or any(s.labels[i] != IGNORE_INDEX for s in group):
            n = i
            break
    while n > 0 and any(n >= len(s.input_ids) or s.labels[n] != IGNORE_INDEX for s in group):
        n -= 1
    slots = sum(t == image_token_id for t in first)
    if n == 0 or sum(t == image_token_id for t in first[:n]) != slots:
        return 0
    return n


def pack_shared_prefixes(samples: Sequence[UnderstandingSample], max_branches: int,
                         image_token_id: int) -> list[PrefixPack]:
    """Pack samples about the same images (equal ``image_rows``) into :class:`PrefixPack` sequences of at
    most ``max_branches`` branches, in order of first appearance; a sample with no partner, or whose group
    shares no prefix holding all image slots, becomes a pack of one (its plain sequence).

    LLaVA-1.5 merges the questions about one image into one multi-turn conversation, which lets later
    answers read earlier questions and answers; here each branch sees only the shared prefix and itself,
    so the loss (a mean over supervised tokens) and its gradients equal those of the samples apart, while
    the image slots and the text before the question are computed once per pack.
    """
    if max_branches < 1:
        raise ValueError(f"max_branches must be >= 1, got {max_branches}")
    groups: dict[tuple[int, ...], list[UnderstandingSample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.image_rows), []).append(s)
    packs = []
    for rows, group in groups.items():
        for i in range(0, len(group), max_branches):
            chunk = group[i:i + max_branches]
            n = _shared_prefix_length(chunk, image_token_id) if rows and len(chunk) > 1 else 0
            if n == 0:
                packs.extend(PrefixPack(s.input_ids, s.labels, s.image_rows, [0] * len(s.input_ids),
                                        list(range(len(s.input_ids))), 1) for s in chunk)
                continue
            ids, labels = list(chunk[0].input_ids[:n]), list(chunk[0].labels[:n])
            segments, positions = [0] * n, list(range(n))
            for b, s in enumerate(chunk, start=1):
                rest = len(s.input_ids) - n
                ids += s.input_ids[n:]
                labels += s.labels[n:]
                segments += [b] * rest
                positions += range(n, n + rest)
            packs.append(PrefixPack(ids, labels, list(rows), segments, positions, len(chunk)))
    return packs


@dataclass(frozen=True)
class UnderstandingData:
    """Samples over a shared image table: frozen vision-tower features ``(N, P, F)``, or preprocessed
    pixels ``(N, 3, H, W)`` when the tower trains (``pixels=True``)."""

    samples: list[UnderstandingSample] | list[PrefixPack]
    feats_NPF: torch.Tensor
    pad_id: int
    pixels: bool = False

    @property
    def num_conversations(self) -> int:
        """Conversations held (a :class:`PrefixPack` holds several)."""
        return sum(getattr(s, "num_samples", 1) for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> UnderstandingSample:
        return self.samples[i]

    def subset(self, samples: list[UnderstandingSample]) -> UnderstandingData:
        """Same feature table, other samples."""
        return dataclasses.replace(self, samples=samples)

    def collate(self, batch: Sequence[UnderstandingSample] | Sequence[PrefixPack]) -> dict[str, torch.Tensor]:
        """Right-padded ids/labels/mask and the features of the batch's images in order; for packs also
        ``segments`` (-1 on padding) and ``positions``."""
        padded = pad_samples(batch, self.pad_id)  # duck-typed: needs .input_ids and .labels
        rows = torch.tensor([r for s in batch for r in s.image_rows], dtype=torch.long)
        out = {"ids": padded.input_ids, "labels": padded.labels, "mask": padded.attention_mask,
               ("pixels" if self.pixels else "feats"): self.feats_NPF[rows]}
        if batch and isinstance(batch[0], PrefixPack):
            segments = torch.full_like(padded.input_ids, -1)
            positions = torch.zeros_like(padded.input_ids)
            for i, s in enumerate(batch):
                segments[i, :len(s.segments)] = torch.tensor(s.segments)
                positions[i, :len(s.positions)] = torch.tensor(s.positions)
            out |= {"segments": segments, "positions": positions}
        return out

    def packed(self, max_branches: int, image_token_id: int) -> UnderstandingData:
        """The same conversations as :class:`PrefixPack` sequences (:func:`pack_shared_prefixes`)."""
        if self.samples and isinstance(self.samples[0], PrefixPack):
            raise ValueError("the data is packed already")
        return self.subset(pack_shared_prefixes(self.samples, max_branches, image_token_id))


def understanding_records(records: Sequence[Record]) -> list[Record]:
    """Records whose images are all inputs (at least one ``<image>``, no ``<image_gen>``); on data with
    none (text-to-image data), the captioning records made from its generation records
    (:func:`~vargpt.training.base_text.captioning_records`)."""
    return [r for r in records if r.is_understanding and not r.is_generation] or captioning_records(records)


@torch.no_grad()
def tower_features(tower: VisionTower, processor: ImageProcessor, paths: Sequence[Path],
                   batch_size: int = 256) -> torch.Tensor:
    """Frozen vision-tower features ``(N, P, F)`` of the images at ``paths``."""
    tower.eval()
    chunks = []
    for i in range(0, len(paths), batch_size):
        pixels = processor([load_image(p) for p in paths[i:i + batch_size]])
        chunks.append(tower(pixels))
    return torch.cat(chunks) if chunks else torch.zeros(0, tower.num_patches, tower.hidden_size)


def build_understanding_data(
    records: Sequence[Record], eval_records: Sequence[Record], tokenizer: Any, tower: VisionTower,
    processor: ImageProcessor, *, system_prompt: str, max_length: int, max_eval: int = 128, pixels: bool = False,
) -> tuple[UnderstandingData, UnderstandingData]:
    """Tokenize train and held-out understanding records and compute the features of their images once
    (or, with ``pixels=True``, only preprocess them: for a run that trains the tower)."""
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    rows: dict[Path, int] = {}
    memo: dict[str, list[int]] = {}  # recurring text pieces are tokenized once

    def encode(recs: Sequence[Record]) -> list[UnderstandingSample]:
        out = []
        for r in understanding_records(recs):
            enc = encode_record(r, tokenizer, ids, image_tokens=tower.num_patches, gen_tokens=1,
                                system_prompt=system_prompt, max_length=max_length, memo=memo)
            out.append(UnderstandingSample(enc.input_ids, enc.labels,
                                           [rows.setdefault(p, len(rows)) for p in enc.input_images]))
        return out

    train_samples = encode(records)
    if not train_samples:
        raise DatasetError("the dataset has no understanding records (a user <image> and no <image_gen>)")
    eval_samples = encode(eval_records) or train_samples
    eval_samples = eval_samples[:: max(1, len(eval_samples) // max_eval)][:max_eval]
    if pixels:
        paths = list(rows)
        feats = torch.cat([processor([load_image(p) for p in paths[i:i + 256]]) for i in range(0, len(paths), 256)])
    else:
        feats = tower_features(tower, processor, list(rows))
    data = UnderstandingData(train_samples, feats, ids.pad, pixels=pixels)
    return data, data.subset(eval_samples)


def _loss(model: Llava, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask, positions = batch["mask"], None
    if "segments" in batch:  # shared-prefix packs
        mask, positions = model.shared_prefix_mask(batch["ids"], batch["segments"]), batch["positions"]
    out = model(batch["ids"], image_feats_NPF=batch.get("feats"), pixels_N3HW=batch.get("pixels"),
                attention_mask=mask, position_ids=positions, compute_logits=False)
    loss, per_sample = supervised_next_token_losses(out.hidden_BTD, batch["labels"], model.llm.logits)
    return {"loss": loss, SAMPLE_LOSSES: per_sample.detach()}  # per-sample losses: hard-example replay


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def build_llava(llm_dir: str | Path, vision_dir: str | Path, *, preset: str = "tiny", seed: int = 0,
                image_attention: str | None = None) -> tuple[Llava, Any, ImageProcessor, VisionTowerConfig]:
    """Pretrained LLM (+ tokenizer) and vision tower joined by a freshly initialised projector.

    ``image_attention`` (default: the preset's ``LLMConfig.image_attention``) is kept by every later step."""
    llm, tokenizer = load_llm(llm_dir)
    tower, processor, vt_cfg = load_vision_tower(vision_dir)
    torch.manual_seed(seed)
    projector = UnderstandingProjector(tower.hidden_size, llm.hidden_size,
                                       VARGPTConfig.from_name(preset).projector)
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    llava = Llava(tower, projector, llm, image_token_id=ids.image,
                  image_attention=image_attention or VARGPTConfig.from_name(preset).llm.image_attention)
    return llava, tokenizer, processor, vt_cfg


def train_alignment(
    data_dir: str | Path, llm_dir: str | Path, vision_dir: str | Path, out_dir: str | Path, *,
    preset: str = "tiny", train_cfg: TrainConfig | None = None, resume: bool = True, progress: bool = True,
    data: tuple[UnderstandingData, UnderstandingData] | None = None, image_attention: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """LLaVA stage 1: train only the projector on understanding conversations.

    Args:
        data_dir: dataset folder (``train``; held-out loss on ``test`` when present).
        llm_dir / vision_dir: outputs of ``train_llm`` / ``train_vision_tower``.
        out_dir: receives ``checkpoint/``, ``tokenizer/``, logs.
        train_cfg / overrides: recipe (default :data:`ALIGN_TRAIN`) and field overrides.
        data: precomputed ``(train, held-out)`` data (reuses tower features across steps).
        image_attention: ``"causal"`` or ``"separate"`` (``LLMConfig.image_attention``; default the
            preset's); saved with the model, so instruction tuning keeps it.

    Returns:
        Metrics: held-out answer-token ``loss_before/after``, train losses, steps, seconds.

    Raises:
        ConfigError: an override names no :class:`~vargpt.config.TrainConfig` field.
    """
    t0 = time.perf_counter()
    tcfg = replace_fields(train_cfg or ALIGN_TRAIN, overrides, "train_alignment")
    model, tokenizer, processor, vt_cfg = build_llava(llm_dir, vision_dir, preset=preset, seed=tcfg.seed,
                                                      image_attention=image_attention)
    return _run(model, tokenizer, processor, vt_cfg, data_dir, out_dir, Path(llm_dir) / "tokenizer", tcfg,
                preset=preset, resume=resume, progress=progress, data=data, t0=t0)


def train_instruct(
    data_dir: str | Path, align_dir: str | Path, out_dir: str | Path, *, preset: str = "tiny",
    train_cfg: TrainConfig | None = None, resume: bool = True, progress: bool = True,
    data: tuple[UnderstandingData, UnderstandingData] | None = None, **overrides: Any,
) -> dict[str, Any]:
    """LLaVA stage 2: train the projector and the LLM (vision tower frozen), starting from alignment.

    Arguments as :func:`train_alignment`, with ``align_dir`` its output. The result is the tiny
    "LLaVA-1.5" that VARGPT's stages start from.
    """
    t0 = time.perf_counter()
    tcfg = replace_fields(train_cfg or INSTRUCT_TRAIN, overrides, "train_instruct")
    model, tokenizer, processor, vt_cfg = load_llava(align_dir)
    return _run(model, tokenizer, processor, vt_cfg, data_dir, out_dir, Path(align_dir) / "tokenizer", tcfg,
                preset=preset, resume=resume, progress=progress, data=data, t0=t0)


def _run(model: Llava, tokenizer: Any, processor: ImageProcessor, vt_cfg: VisionTowerConfig,
         data_dir: str | Path, out_dir: str | Path, tokenizer_dir: Path, tcfg: TrainConfig, *, preset: str,
         resume: bool, progress: bool, data: tuple[UnderstandingData, UnderstandingData] | None,
         t0: float) -> dict[str, Any]:
    cfg = VARGPTConfig.from_name(preset)
    tower_trains = any(g.startswith("vision_tower") for g in tcfg.trainable)
    if data is not None and data[0].pixels != tower_trains:
        data = None  # precomputed features cannot train the tower (and pixels would waste time)
    if data is None:
        data = build_understanding_data(
            load_split(data_dir, "train"), load_split(data_dir, "test"), tokenizer, model.vision_tower,
            processor, system_prompt=cfg.chat.system_prompt,
            max_length=model.llm.model.config.max_position_embeddings, pixels=tower_trains)
    train_data, eval_data = data
    if tcfg.prefix_pack:
        train_data = train_data.packed(tcfg.prefix_pack, model.image_token_id)
    result = train(model, loss_fn=_loss, train_data=train_data, collate=train_data.collate, cfg=tcfg,
                   out_dir=out_dir, eval_data=eval_data, save_config=llava_config(model, vt_cfg, preset),
                   resume=resume, progress=progress)
    dst = Path(out_dir) / "tokenizer"
    if tokenizer_dir.resolve() != dst.resolve():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(tokenizer_dir, dst)
    return run_metrics(result, t0, n_train=train_data.num_conversations, unit="conversations") | {
        "replay_fraction": tcfg.replay_fraction, "prefix_pack": tcfg.prefix_pack, "train_sequences": len(train_data)}


def llava_config(model: Llava, vt_cfg: VisionTowerConfig, preset: str) -> dict[str, Any]:
    """Everything :func:`load_llava` needs to rebuild ``model`` (JSON-serialisable)."""
    act = model.projector.act
    hidden_act = "silu" if isinstance(act, torch.nn.SiLU) else (
        "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu")
    return {
        "kind": "llava", "preset": preset, "image_token_id": model.image_token_id,
        "image_attention": model.image_attention,
        "llm_hf_config": model.llm.hf_config_dict(), "vision_hf_config": model.vision_tower.hf_config_dict(),
        "vision_tower": dataclasses.asdict(vt_cfg), "projector": {"hidden_act": hidden_act},
        "system_prompt": VARGPTConfig.from_name(preset).chat.system_prompt,
    }


def load_llava(run_dir: str | Path) -> tuple[Llava, Any, ImageProcessor, VisionTowerConfig]:
    """``(model, tokenizer, processor, vision config)`` from a :func:`train_alignment`/:func:`train_instruct` run."""
    run = Path(run_dir)
    state, config, _ = load_checkpoint(run / "checkpoint", with_trainer_state=False)
    if config.get("kind") != "llava":
        raise ValueError(f"{run} is not a LLaVA run (kind={config.get('kind')!r})")
    vt_cfg = VisionTowerConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config["vision_tower"].items()})
    tower = VisionTower.from_hf_config(config["vision_hf_config"], feature_layer=vt_cfg.feature_layer,
                                       drop_cls=vt_cfg.drop_cls)
    llm = LLMBackbone.from_hf_config(config["llm_hf_config"])
    projector = UnderstandingProjector(tower.hidden_size, llm.hidden_size,
                                       ProjectorConfig(**config["projector"]))
    model = Llava(tower, projector, llm, image_token_id=int(config["image_token_id"]),
                  image_attention=config.get("image_attention", "causal"))
    model.load_state_dict(state)
    return model.eval(), load_text_tokenizer(run / "tokenizer"), ImageProcessor.from_config(vt_cfg), vt_cfg
