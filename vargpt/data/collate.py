"""Records -> token ids and labels -> padded batches (pure; no model, no image decoding).

Sequence layout of one record (SPEC 3.3, 3.5)::

    [system] USER: <image>x P ... ASSISTANT: text <image_gen_start> <image_gen_pad>x L <image_gen_end> text </s>

* each ``<image>`` placeholder becomes P ``<image>`` slots (vision features go there);
* each ``<image_gen>`` becomes ``<image_gen_start>``, L generation slots and ``<image_gen_end>``;
* labels (aligned with ids; the loss shifts them) are ``-100`` everywhere except assistant text, the
  ``<image_gen_start>`` token the LLM must learn to emit, and the closing ``</s>``. Unlike the official
  code (SPEC 3.10 item 1), prompts, slots and padding are never text targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vargpt.data.conversation import render_segments
from vargpt.data.records import Record
from vargpt.special_tokens import IMAGE, IMAGE_GEN, SpecialTokenIds

IGNORE_INDEX = -100
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_GEN)}|{re.escape(IMAGE)})")


class SequenceTooLongError(ValueError):
    """An encoded record does not fit the model's context."""


@dataclass(frozen=True)
class EncodedSample:
    """One record as ids and labels, plus the images its slots stand for (in order)."""

    input_ids: list[int]
    labels: list[int]
    input_images: list[Path] = field(default_factory=list)
    gen_images: list[Path] = field(default_factory=list)
    source: str = ""


def encode_record(
    record: Record, tokenizer, ids: SpecialTokenIds, *, image_tokens: int, gen_tokens: int,  # noqa: ANN001
    system_prompt: str = "", max_length: int | None = None, memo: dict[str, list[int]] | None = None,
) -> EncodedSample:
    """Tokenize a (trusted) dataset record into ids and assistant-only labels.

    Args:
        record: a validated record.
        tokenizer: HF tokenizer holding the special tokens (``encode(text, add_special_tokens=False)``).
        ids: the special token ids of ``tokenizer``.
        image_tokens: P, slots per input image.
        gen_tokens: L, generation slots per generated image.
        system_prompt: default system text.
        max_length: raise :class:`SequenceTooLongError` beyond this many tokens.
        memo: a dict the caller keeps across records of one tokenizer: each text piece (prompt headers,
            recurring questions and answers) is tokenized once. Pieces are tokenized separately anyway,
            so the ids are the same with or without it.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in render_segments(record.messages, system_prompt=system_prompt, trusted=True):
        for piece in _PLACEHOLDER_RE.split(text):
            if not piece:
                continue
            if piece == IMAGE:
                input_ids += [ids.image] * image_tokens
                labels += [IGNORE_INDEX] * image_tokens
            elif piece == IMAGE_GEN:
                input_ids += [ids.image_gen_start] + [ids.image_gen_pad] * gen_tokens + [ids.image_gen_end]
                labels += [ids.image_gen_start if is_target else IGNORE_INDEX] + [IGNORE_INDEX] * (gen_tokens + 1)
            else:
                toks = memo.get(piece) if memo is not None else None
                if toks is None:
                    toks = tokenizer.encode(piece, add_special_tokens=False)
                    if memo is not None:
                        memo[piece] = toks
                input_ids += toks
                labels += toks if is_target else [IGNORE_INDEX] * len(toks)
    if max_length is not None and len(input_ids) > max_length:
        raise SequenceTooLongError(f"{record.source}: {len(input_ids)} tokens exceed the context of {max_length} "
                                   "(shorten the conversation or use fewer images)")
    return EncodedSample(input_ids, labels, record.input_images, record.generated_images, record.source)


@dataclass
class TokenBatch:
    """Right-padded ids/labels/attention mask of a list of samples."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on padding
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token


def pad_samples(samples: Sequence[EncodedSample], pad_id: int, *, left: bool = False) -> TokenBatch:
    """Pad to the longest sample (right padding for training, ``left=True`` for generation)."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(s.labels, dtype=torch.long)
        mask[i, sl] = 1
    return TokenBatch(ids, labels, mask)
