"""Greedy answers of the understanding model: our own KV-cached decoding loop (no HF ``generate``).

The prompt is rendered by the one chat template (:mod:`vargpt.data.conversation`), user text is
escaped (untrusted), each image gets P ``<image>`` slots, prompts are left-padded into one batch, and
decoding runs one token per step on the KV cache with the 2D padding mask extended by one column; RoPE
positions come from the mask, so left padding does not change any answer (unit-tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vargpt.data.conversation import render_prompt, user_turn_with_images
from vargpt.data.records import Message
from vargpt.llm.merge import expand_image_tokens
from vargpt.understanding.llava import Llava
from vargpt.understanding.vision_tower import ImageProcessor

__all__ = ["answer_questions", "greedy_generate", "left_pad"]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(ids_BT, padding_mask_BT)`` (mask 1 = token)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    model: Llava,
    ids_BT: torch.Tensor,
    padding_mask_BT: torch.Tensor,
    *,
    eos_id: int,
    max_new_tokens: int,
    pixels_N3HW: torch.Tensor | None = None,
    image_feats_NPF: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy decoding with a KV cache.

    Args:
        model: the understanding model.
        ids_BT: left-padded prompt ids (images expanded to P slots).
        padding_mask_BT: 1 = token, 0 = left padding.
        eos_id: stop id (not included in the output).
        max_new_tokens: maximum generated tokens per row.
        pixels_N3HW / image_feats_NPF: the prompts' images, in order.

    Returns:
        The generated ids of each row, up to (excluding) ``eos_id``.
    """
    B = ids_BT.shape[0]
    out = model(ids_BT, pixels_N3HW=pixels_N3HW, image_feats_NPF=image_feats_NPF,
                attention_mask=padding_mask_BT, use_cache=True, compute_logits=False)
    cache, mask = out.cache, padding_mask_BT
    pos_B1 = padding_mask_BT.long().sum(1, keepdim=True) - 1  # RoPE position of the last prompt token
    next_B = model.llm.logits(out.hidden_BTD[:, -1]).argmax(-1)
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BT.device)
    steps: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        done_B = done_B | (next_B == eos_id)
        steps.append(torch.where(done_B, torch.full_like(next_B, eos_id), next_B))
        if bool(done_B.all()) or i == max_new_tokens - 1:
            break
        mask, pos_B1 = torch.cat([mask, mask.new_ones(B, 1)], dim=1), pos_B1 + 1
        # text-only step: straight to the backbone (no image slots to merge)
        out = model.llm(model.llm.embed(next_B[:, None]), attention_mask=mask, position_ids=pos_B1, cache=cache)
        cache, next_B = out.cache, out.logits_BTV[:, -1].argmax(-1)
    gen_BN = torch.stack(steps, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in gen_BN]


def build_prompt_ids(
    tokenizer: Any, question: str, *, image_token_id: int, num_image_tokens: int, system_prompt: str = "",
) -> list[int]:
    """Ids of ``USER: <image>\\n{question} ASSISTANT:`` with the image expanded to P slots."""
    turn = Message("user", user_turn_with_images(question, 1))
    text = render_prompt([turn], system_prompt=system_prompt, trusted=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return expand_image_tokens(ids, image_token_id, num_image_tokens)


def answer_questions(
    model: Llava,
    tokenizer: Any,
    processor: ImageProcessor,
    images: Sequence[Any],
    questions: Sequence[str],
    *,
    system_prompt: str = "",
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answer to each (image, question) pair; user text is treated as untrusted (escaped).

    Args:
        images: PIL images (or anything :class:`ImageProcessor` accepts), one per question.
        questions: plain question text.

    Returns:
        The decoded answers, stripped.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(questions), batch_size):
        qs, ims = questions[start:start + batch_size], images[start:start + batch_size]
        prompts = [build_prompt_ids(tokenizer, q, image_token_id=model.image_token_id,
                                    num_image_tokens=model.num_image_tokens, system_prompt=system_prompt)
                   for q in qs]
        ids_BT, mask_BT = left_pad(prompts, pad_id)
        pixels_N3HW = processor(list(ims)).to(device)
        gen = greedy_generate(model, ids_BT.to(device), mask_BT.to(device), pixels_N3HW=pixels_N3HW,
                              eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens)
        answers.extend(tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen)
    return answers
