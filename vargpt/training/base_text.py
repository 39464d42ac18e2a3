"""Base text models of the tiny preset: a BPE tokenizer and a small causal LM pretrained on the corpus.

The released VARGPT starts from Vicuna-7B (via LLaVA-1.5); the tiny preset starts from these two,
trained on nothing but the text a dataset folder provides (any dataset in the format of
:mod:`vargpt.data.records`): every conversation rendered with the chat template
(:mod:`vargpt.data.conversation`), with the image placeholders removed.

* :func:`train_text_tokenizer`: byte-level BPE (HF ``tokenizers``), so any text round-trips exactly;
  ``<pad> <s> </s> <unk>`` get ids 0-3 and :data:`vargpt.special_tokens.ADDED_TOKENS` follow the
  learned vocabulary, each a single id; saved as a ``PreTrainedTokenizerFast`` directory.
* :func:`train_llm`: Llama/Qwen2 of the preset's :class:`~vargpt.config.LLMConfig`, next-token loss on
  packed sequences, trained with :func:`vargpt.training.loop.train` (checkpoint + exact resume).

    >>> train_text_tokenizer("data/sw", "runs/base/tokenizer")
    >>> train_llm("data/sw", "runs/base/tokenizer", "runs/base/llm", preset="tiny")
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vargpt.config import TrainConfig, VARGPTConfig, replace_fields
from vargpt.data.conversation import render_segments
from vargpt.data.records import DatasetError, Message, Record, load_records
from vargpt.llm.backbone import LLMBackbone
from vargpt.special_tokens import ADDED_TOKENS, BOS, EOS, IMAGE, IMAGE_GEN, PAD
from vargpt.training.checkpoint import load_checkpoint
from vargpt.training.loop import train

logger = logging.getLogger(__name__)

UNK = "<unk>"
BASE_SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
"""Special tokens with ids 0..3 of the tiny tokenizer (LLaMA's order after <pad>)."""
_PLACEHOLDER_RE = re.compile(f"(?:{re.escape(IMAGE_GEN)}|{re.escape(IMAGE)})\n?")


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def strip_placeholders(text: str) -> str:
    """Remove ``<image>``/``<image_gen>`` placeholders (and a newline right after one)."""
    return _PLACEHOLDER_RE.sub("", text)


def conversation_segments(record: Record, system_prompt: str) -> list[str]:
    """The record rendered by the chat template, as separately tokenized pieces, placeholders removed."""
    pieces = render_segments(record.messages, system_prompt=system_prompt, trusted=True)
    return [strip_placeholders(text) for text, _ in pieces]


def corpus_texts(records: Iterable[Record], system_prompt: str) -> list[str]:
    """One rendered conversation per record (the tokenizer's and the LLM's training text)."""
    return ["".join(conversation_segments(r, system_prompt)) for r in records]


CAPTION_QUESTION = "Describe the image."
"""The question of :func:`captioning_records`."""


def captioning_records(records: Iterable[Record]) -> list[Record]:
    """Image-to-text records made from generation records, for data with no input image at all.

    Each generation record (a user prompt, an ``<image_gen>`` with its target image) becomes the
    reverse conversation: user ``<image>`` + :data:`CAPTION_QUESTION`, assistant the prompt text, the
    generated image as input. The base vision tower and LLaVA steps fall back to these on text-to-image
    data, so the understanding path still learns to tie images to the data's text.
    """
    out = []
    for r in records:
        users = [m for m in r.messages if m.role == "user"]
        targets = r.generated_images
        text = strip_placeholders(users[-1].content).strip() if users else ""
        if targets and text:
            out.append(Record((Message("user", f"{IMAGE}\n{CAPTION_QUESTION}"), Message("assistant", text)),
                              (targets[0],), cls=r.cls, meta=dict(r.meta), source=r.source))
    return out


def load_split(data_dir: str | Path, split: str) -> list[Record]:
    """Records of ``split`` (images not checked); a missing non-train split gives ``[]``."""
    try:
        return load_records(data_dir, split, check_images=False)
    except DatasetError:
        if split == "train":
            raise
        return []


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_text_tokenizer(
    data_dir: str | Path, out_dir: str | Path, *, vocab_size: int | None = None, preset: str = "tiny",
) -> dict[str, Any]:
    """Train a byte-level BPE text tokenizer on a dataset's conversations and save it.

    Args:
        data_dir: dataset folder (``train.jsonl`` or LLaVA ``train.json``).
        out_dir: receives the ``PreTrainedTokenizerFast`` files (``tokenizer.json`` ...).
        vocab_size: total size including special tokens (default: the preset's LLM vocabulary).
            The corpus may support fewer merges, giving a smaller vocabulary.
        preset: config preset (vocabulary size and system prompt).

    Returns:
        ``{"vocab_size", "chars_per_token", "round_trip", "train_seconds"}``.
    """
    t0 = time.perf_counter()
    cfg = VARGPTConfig.from_name(preset)
    vocab_size = vocab_size or cfg.llm.vocab_size
    texts = corpus_texts(load_records(data_dir, "train", check_images=False), cfg.chat.system_prompt)
    tok = build_bpe_tokenizer(texts, vocab_size)
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    sample = texts[: min(len(texts), 2000)]
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in sample)
    round_trip = all(tok.decode(tok.encode(t, add_special_tokens=False)) == t for t in sample[:200])
    metrics = {"vocab_size": len(tok), "chars_per_token": round(sum(map(len, sample)) / max(1, n_tokens), 3),
               "round_trip": round_trip, "train_seconds": round(time.perf_counter() - t0, 2)}
    logger.info("text tokenizer -> %s: %s", out, metrics)
    return metrics


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts`` with the project's special tokens as single ids (pure, no IO)."""
    n_learned = vocab_size - len(ADDED_TOKENS)
    if n_learned < 256 + len(BASE_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= "
                         f"{256 + len(BASE_SPECIAL_TOKENS) + len(ADDED_TOKENS)})")
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned, special_tokens=list(BASE_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    core.add_special_tokens(list(ADDED_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(ADDED_TOKENS), clean_up_tokenization_spaces=False,
    )


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer directory (offline)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# --------------------------------------------------------------------------------------------------
# LLM pretraining
# --------------------------------------------------------------------------------------------------


def group_by_image(records: Iterable[Record]) -> list[Record]:
    """Records reordered so that those sharing their first image are adjacent (stable otherwise)."""
    groups: dict[object, list[Record]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.images[0] if r.images else i, []).append(r)
    return [r for g in groups.values() for r in g]


def pack_token_stream(
    records: Iterable[Record], tokenizer: Any, *, seq_len: int, system_prompt: str,
) -> list[torch.Tensor]:
    """Tokenize every conversation (pieces separately, as the fine-tuning data), concatenate, and cut
    into ``seq_len`` chunks (the last partial chunk is dropped).

    Records about the same image are made adjacent (grouped by their first image, in order of first
    appearance), so a chunk often holds a caption and questions about the same scene: the LM learns to
    answer from a description in its context, which the understanding projector later exploits.
    """
    stream: list[int] = []
    for record in group_by_image(records):
        for piece in conversation_segments(record, system_prompt):
            stream.extend(tokenizer.encode(piece, add_special_tokens=False))
    n = len(stream) // seq_len
    return list(torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)) if n else []


def next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of position t predicting ``labels[t + 1]`` (ignored labels skipped)."""
    return F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(),
                           ignore_index=ignore_index)


def supervised_next_token_losses(
    hidden_BTD: torch.Tensor, labels_BT: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, per_sample)`` next-token cross-entropy from final hidden states: the mean over all labelled
    next tokens of the batch (as :func:`next_token_loss` on the logits) and ``(B,)`` each sample's mean over
    its own (0 where it has none). The LM ``head`` is applied only where a next token is supervised (in
    understanding conversations about a tenth of the tokens), so the vocabulary projection and softmax of
    the others are never computed."""
    labels_BT = labels_BT[:, 1:]
    sel_BT = labels_BT != ignore_index
    ce_N = F.cross_entropy(head(hidden_BTD[:, :-1][sel_BT]).float(), labels_BT[sel_BT], reduction="none")
    n_B = sel_BT.sum(1)
    rows_N = torch.arange(labels_BT.shape[0], device=labels_BT.device)[:, None].expand_as(sel_BT)[sel_BT]
    per_sample_B = torch.zeros(labels_BT.shape[0], dtype=ce_N.dtype, device=ce_N.device).index_add(0, rows_N, ce_N)
    return ce_N.sum() / n_B.sum().clamp_min(1), per_sample_B / n_B.clamp_min(1)


def _lm_loss(model: LLMBackbone, ids_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss": next_token_loss(model(model.embed(ids_BT)).logits_BTV, ids_BT)}


LLM_TRAIN = TrainConfig(name="base-llm", lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_ratio=0.1,
                        min_lr_ratio=0.1, batch_size=16, max_steps=300, grad_clip=1.0)
"""Default recipe of :func:`train_llm` (tiny model, high lr, short cosine)."""


def train_llm(
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seq_len: int = 128,
    train_cfg: TrainConfig | None = None,
    llm_overrides: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain the preset's LLM from scratch on the dataset's text (next-token loss on everything).

    Args:
        data_dir: dataset folder; the held-out loss uses its ``test`` split when present.
        tokenizer_dir: output of :func:`train_text_tokenizer` (copied into ``out_dir/tokenizer``).
        out_dir: receives ``checkpoint/`` (weights, config, trainer state), ``tokenizer/``, logs.
        preset: config preset (LLM sizes, system prompt).
        seq_len: packed sequence length.
        train_cfg: optimiser recipe (default :data:`LLM_TRAIN`); ``overrides`` replace its fields
            (e.g. ``max_steps=50``).
        llm_overrides: replace fields of the preset's :class:`~vargpt.config.LLMConfig` (sizes).
        resume: continue from ``out_dir/checkpoint`` if present.

    Returns:
        Metrics: ``loss_before/after`` (held-out), train loss first/last, steps, train_seconds.

    Raises:
        ConfigError: an override names no field of :class:`~vargpt.config.TrainConfig` (``overrides``) or
            :class:`~vargpt.config.LLMConfig` (``llm_overrides``).
    """
    t0 = time.perf_counter()
    cfg = VARGPTConfig.from_name(preset)
    tcfg = replace_fields(train_cfg or LLM_TRAIN, overrides, "train_llm")
    llm_cfg = replace_fields(cfg.llm, llm_overrides or {}, "train_llm llm_overrides")
    tokenizer = load_text_tokenizer(tokenizer_dir)
    llm_cfg = dataclasses.replace(llm_cfg, vocab_size=max(llm_cfg.vocab_size, len(tokenizer)))
    torch.manual_seed(tcfg.seed)
    model = LLMBackbone.from_config(llm_cfg)
    pack = dict(tokenizer=tokenizer, seq_len=seq_len, system_prompt=cfg.chat.system_prompt)
    train_data = pack_token_stream(load_split(data_dir, "train"), **pack)
    if not train_data:
        raise DatasetError(f"{data_dir}: not enough text for one sequence of {seq_len} tokens")
    eval_data = pack_token_stream(load_split(data_dir, "test"), **pack)[:64] or train_data[:64]
    save_config = {"kind": "llm", "preset": preset, "hf_config": model.hf_config_dict()}
    result = train(model, loss_fn=_lm_loss, train_data=train_data, collate=torch.stack, cfg=tcfg,
                   out_dir=out_dir, eval_data=eval_data, save_config=save_config, resume=resume,
                   progress=progress)
    _copy_tokenizer(tokenizer_dir, Path(out_dir) / "tokenizer")
    return run_metrics(result, t0, n_train=len(train_data), unit="sequences")


def load_llm(run_dir: str | Path) -> tuple[LLMBackbone, PreTrainedTokenizerFast]:
    """The pretrained LLM and its tokenizer from a :func:`train_llm` output directory."""
    run = Path(run_dir)
    state, config, _ = load_checkpoint(run / "checkpoint", with_trainer_state=False)
    if config.get("kind") != "llm":
        raise ValueError(f"{run} is not an LLM run (kind={config.get('kind')!r})")
    model = LLMBackbone.from_hf_config(config["hf_config"])
    model.load_state_dict(state)
    return model.eval(), load_text_tokenizer(run / "tokenizer")


def _copy_tokenizer(src: str | Path, dst: Path) -> None:
    if Path(src).resolve() != dst.resolve():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def run_metrics(result: Any, t0: float, *, n_train: int, unit: str) -> dict[str, Any]:
    """Metrics dict of a base-model run (``loss_before/after`` are held-out losses)."""
    d = result.to_dict()
    return {
        "loss_before": d["heldout_loss_before"], "loss_after": d["heldout_loss_after"],
        "train_loss_first": d["train_loss_first"], "train_loss_last": d["train_loss_last"],
        "steps": d["steps"], "train_seconds": d["train_seconds"], f"train_{unit}": n_train,
        "wall_seconds": round(time.perf_counter() - t0, 2), "checkpoint": d["checkpoint"],
    }
