"""Explicit KV caches (STYLE 11: caches are objects passed in, not module flags).

Visual decoder: one :class:`KVCache` per transformer block holds the (already L2-normalised) keys and
the values of every token processed so far. The next-scale loop creates a :class:`DecoderKVCache` per
generation and passes it to :meth:`VisualDecoder.forward_blocks`; running one forward per scale against
the cache gives exactly the block-causal visibility of SPEC 2.3 without a mask.

LLM: :class:`GrowingLLMCache` is a Hugging Face ``Cache`` whose layers append in place into doubling
buffers instead of concatenating the whole cache at every decoding step (used by
:class:`vargpt.generation.text.LLMContext`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class KVCache:
    """Keys and values of one attention layer, grown along the sequence axis.

    Tensors are stored as ``k_BHLc`` / ``v_BHLc`` (batch, heads, cached tokens, head width).
    """

    def __init__(self) -> None:
        self.k_BHLc: torch.Tensor | None = None
        self.v_BHLc: torch.Tensor | None = None

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values and return all of them (``k_BHLc``, ``v_BHLc``)."""
        if self.k_BHLc is None:
            self.k_BHLc, self.v_BHLc = k_BHlc, v_BHlc
        else:
            self.k_BHLc = torch.cat((self.k_BHLc, k_BHlc), dim=2)
            self.v_BHLc = torch.cat((self.v_BHLc, v_BHlc), dim=2)
        return self.k_BHLc, self.v_BHLc

    def reset(self) -> None:
        """Drop everything cached."""
        self.k_BHLc = self.v_BHLc = None

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        return 0 if self.k_BHLc is None else self.k_BHLc.shape[2]


class DecoderKVCache:
    """One :class:`KVCache` per block of a visual decoder; index it with the block number."""

    def __init__(self, depth: int) -> None:
        self.layers = [KVCache() for _ in range(depth)]

    def __getitem__(self, block_idx: int) -> KVCache:
        return self.layers[block_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def reset(self) -> None:
        """Empty every layer's cache."""
        for layer in self.layers:
            layer.reset()

    @property
    def length(self) -> int:
        """Number of cached tokens (the same in every layer)."""
        return self.layers[0].length if self.layers else 0


class GrowingKVLayer(DynamicLayer):
    """One LLM layer's KV cache in preallocated buffers that double when full (amortised O(1) appends).

    Hugging Face's ``DynamicLayer`` concatenates the whole cache with the new keys at every step (O(T)
    copies per token). Here ``keys``/``values`` are views ``buffer[..., :length, :]`` of capacity
    buffers; a new block is written in place. Any operation that replaces ``keys`` by a new tensor
    (``batch_select_indices``, ``reorder_cache`` ...) is detected and the buffers are rebuilt; ``crop``
    (a view of the same buffer) keeps them.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """Append ``(B, H, n, c)`` keys/values; return all cached ``(B, H, length, c)`` views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cur, n = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        if not self._fits(key_states, cur, n):
            self._grow(key_states, cur + n)
        self._k_buf[..., cur:cur + n, :] = key_states
        self._v_buf[..., cur:cur + n, :] = value_states
        self.keys, self.values = self._k_buf[..., :cur + n, :], self._v_buf[..., :cur + n, :]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, cur: int, n: int) -> bool:
        buf = self._k_buf
        return (buf is not None and cur + n <= buf.shape[-2] and buf.shape[:-2] == key_states.shape[:-2]
                and (cur == 0 or self.keys.data_ptr() == buf.data_ptr()))

    def _grow(self, like: torch.Tensor, need: int) -> None:
        cap = max(2 * need, 64)  # doubling keeps the total copy cost linear in the final length
        k_buf = like.new_empty((*like.shape[:-2], cap, like.shape[-1]))
        v_buf = like.new_empty((*like.shape[:-2], cap, like.shape[-1]))
        cur = self.keys.shape[-2] if self.keys.numel() else 0
        if cur:
            k_buf[..., :cur, :] = self.keys
            v_buf[..., :cur, :] = self.values
        self._k_buf, self._v_buf = k_buf, v_buf


class GrowingLLMCache(Cache):
    """A Hugging Face ``Cache`` of :class:`GrowingKVLayer` (one per LLM layer, created on first use)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingKVLayer)
