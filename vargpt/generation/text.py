"""Pieces of our own text decoding loop (STYLE 11): the batched LLM context and next-token choice.

:class:`LLMContext` is an explicit object holding the LLM KV cache of a batch *and* the key mask of
every cached position. Rows may be left-padded and may skip steps (a row that has finished, or that
waits for the other rows, is fed a masked dummy token), so the mask can have holes anywhere; RoPE
positions always come from the mask (:func:`vargpt.llm.backbone.positions_from_padding`), which makes
a row's computation independent of padding and of the other rows in the batch.

:func:`next_tokens` picks one token per row: greedy (``temperature == 0``) or sampled with
temperature / top-k / top-p, each row from its *own* generator (:func:`sample_per_row`), with
per-row banned ids and optional forced ids. Pure apart from the generators' state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.generation.cache import GrowingLLMCache
from vargpt.generation.sampling import sample_per_row
from vargpt.llm.backbone import BackboneOutput, LLMBackbone, block_extension_mask, positions_from_padding

__all__ = ["LLMContext", "ban_tokens", "next_tokens"]


class LLMContext:
    """KV cache + key mask of a batch of B sequences, extended step by step.

    Args:
        llm: the backbone.
        cache: an existing KV cache (default: a new :class:`GrowingLLMCache`).
        mask_BK: (B, cached) 1 = real token, 0 = padding or skipped slot, for ``cache`` (None when empty).
    """

    def __init__(self, llm: LLMBackbone, cache=None, mask_BK: torch.Tensor | None = None) -> None:  # noqa: ANN001
        self.llm = llm
        self.cache = GrowingLLMCache() if cache is None else cache
        if mask_BK is None and self.cache.get_seq_length() > 0:
            raise ValueError("a non-empty cache needs its key mask")
        self.mask_BK = mask_BK
        self._count_B = None if mask_BK is None else mask_BK.long().sum(1)  # real tokens per row

    @property
    def length(self) -> int:
        """Cached positions (including padding and skipped slots)."""
        return 0 if self.mask_BK is None else self.mask_BK.shape[1]

    def prefill(
        self, embeds_BTD: torch.Tensor, mask_BT: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Run a (left-padded) prompt into the empty cache.

        Args:
            embeds_BTD: prompt embeddings.
            mask_BT: 1 = token, 0 = padding.
            attention_mask: an optional 4D mask (e.g. block-causal over generated images); default is
                causal + ``mask_BT``.

        Returns:
            The backbone output (hidden states only; apply ``llm.logits`` where needed).
        """
        if self.length:
            raise ValueError("prefill needs an empty context")
        self.mask_BK = mask_BT.long()
        self._count_B = self.mask_BK.sum(1)
        return self.llm(embeds_BTD, attention_mask=self.mask_BK if attention_mask is None else attention_mask,
                        position_ids=positions_from_padding(self.mask_BK), cache=self.cache, use_cache=True,
                        compute_logits=False)

    def extend(
        self, embeds_BnD: torch.Tensor, active_B: torch.Tensor | None = None, *, block: bool = False,
    ) -> BackboneOutput:
        """Append n tokens to every row; rows where ``active_B`` is False get masked (invisible) slots.

        Args:
            embeds_BnD: embeddings of the new tokens (anything for inactive rows).
            active_B: bool (B,), default all True.
            block: the n tokens see each other fully (one VAR scale under ``llm_attention="block_causal"``)
                instead of causally.

        Returns:
            The backbone output for the new tokens (hidden states only).
        """
        B, n = embeds_BnD.shape[:2]
        if active_B is None:
            active_B = torch.ones(B, dtype=torch.bool, device=embeds_BnD.device)
        past = self.length
        new_Bn = active_B.long()[:, None].expand(B, n)
        self.mask_BK = new_Bn if self.mask_BK is None else torch.cat([self.mask_BK, new_Bn], dim=1)
        count_B = self._count_B if self._count_B is not None else torch.zeros_like(active_B, dtype=torch.long)
        # = positions_from_padding(mask_BK, n) on active rows (inactive rows' positions are never seen)
        position_ids = count_B[:, None] + torch.arange(n, device=count_B.device)
        self._count_B = count_B + n * active_B.long()
        if block:
            mask = block_extension_mask(B, n, past=past, padding_mask=self.mask_BK, dtype=embeds_BnD.dtype)
        else:
            mask = self.mask_BK
        return self.llm(embeds_BnD, attention_mask=mask, position_ids=position_ids, cache=self.cache,
                        use_cache=True, compute_logits=False)


def ban_tokens(logits_BV: torch.Tensor, banned_BV: torch.Tensor) -> torch.Tensor:
    """Logits with banned entries set to -inf (out of place); ``banned_BV`` is bool, broadcastable."""
    return logits_BV.masked_fill(banned_BV, float("-inf"))


def next_tokens(
    logits_BV: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    banned_BV: torch.Tensor | None = None,
    forced_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """One next token per row.

    Args:
        logits_BV: next-token logits of the rows to decode.
        temperature: 0 = greedy (argmax; no randomness), else sampling with top-k / top-p.
        top_k, top_p: filters (0 and 1 = off), see :mod:`vargpt.generation.sampling`.
        generators: one RNG per row (required when sampling).
        banned_BV: bool mask of ids a row may not produce.
        forced_B: ids to emit regardless of the logits, -1 = not forced (no random draw for such rows).

    Returns:
        ids_B int64.
    """
    if banned_BV is not None:
        logits_BV = ban_tokens(logits_BV, banned_BV)
    if temperature == 0.0:
        ids_B = logits_BV.argmax(-1)
    else:
        if generators is None or len(generators) != logits_BV.shape[0]:
            raise ValueError("sampling needs one generator per row")
        free = [b for b in range(logits_BV.shape[0]) if forced_B is None or int(forced_B[b]) < 0]
        ids_B = logits_BV.argmax(-1)
        if free:
            drawn = sample_per_row(logits_BV[free], [generators[b] for b in free], top_k=top_k, top_p=top_p,
                                   temperature=temperature)
            ids_B[free] = drawn
    if forced_B is not None:
        ids_B = torch.where(forced_B >= 0, forced_B, ids_B)
    return ids_B
