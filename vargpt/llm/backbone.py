"""The LLM backbone: any Hugging Face causal LM seen as ``embeds_BTD -> hidden_BTD (-> logits_BTV)``.

VARGPT (arXiv 2501.12327, SPEC 3.1) feeds the LLM *embeddings*, not ids: text embeddings with image
features placed at ``<image>`` slots (understanding) or projected VAR token maps at generation slots.
:class:`LLMBackbone` wraps an HF ``*ForCausalLM`` (Llama and Qwen2 built from :class:`LLMConfig`; any
causal LM loaded from a local directory) and exposes exactly that.

State-dict naming: the HF model is the attribute ``model``, so keys are the HF keys prefixed with
``model.`` (``model.model.layers.0.self_attn.q_proj.weight``, ``model.lm_head.weight``); inside a
composite module that holds the backbone as ``llm`` they read ``llm.model.model.layers...``.

Attention masks (ENVIRONMENT.md 2a/2b). ``forward`` accepts
  * ``None``: plain causal attention (with the cache: the new tokens are causal among themselves);
  * a 2D padding mask ``(B, past+T)`` (1 = real token, 0 = padding, left or right padding): HF builds
    the causal+padding mask for the active attention backend, and, when ``position_ids`` is omitted,
    positions are derived from the mask (:func:`positions_from_padding`) so left padding does not shift
    RoPE positions;
  * a 4D mask ``(B or 1, 1, T, past+T)``: used as-is by every layer. Bool masks are converted to an
    *additive float* mask (0 / ``finfo.min``) because HF's eager attention silently adds bool masks as
    +1/+0 (wrong results). Build them with :func:`additive_mask`, :func:`block_causal_mask` or
    :func:`block_extension_mask`.

Block-wise KV-cache extension (VAR's next-scale decoding through the LLM): feed a block of ``n`` new
tokens that attend fully to each other and to the cached past with

    mask = block_extension_mask(B, n, past=cache.get_seq_length())      # zeros (B, 1, n, past + n)
    pos = past + arange(n)                                               # (B, n)
    out = backbone(block_BnD, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)

which equals one pass over the whole sequence with :func:`block_causal_mask` (unit-tested, Llama and
Qwen2, eager and sdpa).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.cache_utils import Cache

from vargpt.config import LLMConfig
from vargpt.special_tokens import ADDED_TOKENS

__all__ = [
    "BackboneOutput",
    "add_special_tokens",
    "LLMBackbone",
    "additive_mask",
    "block_causal_mask",
    "block_extension_mask",
    "causal_allowed",
    "hf_config_from_llm_config",
    "positions_from_padding",
    "separate_image_tokens",
    "shared_prefix_allowed",
]


# --------------------------------------------------------------------------------------------------
# Pure mask / position helpers
# --------------------------------------------------------------------------------------------------


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn a boolean "may attend" mask into an additive float mask (0 where allowed, ``finfo.min`` not).

    Args:
        allowed: bool, shape ``(Q, K)``, ``(B, Q, K)`` or ``(B, 1, Q, K)``; True = attend.
        dtype: float dtype of the result (the model's compute dtype).

    Returns:
        mask_B1QK: float ``(B or 1, 1, Q, K)``, safe for both eager and sdpa attention.
    """
    if allowed.dtype != torch.bool:
        raise TypeError(f"allowed must be a bool tensor, got {allowed.dtype}")
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    elif allowed.dim() == 3:
        allowed = allowed[:, None]
    elif allowed.dim() != 4:
        raise ValueError(f"allowed must have 2, 3 or 4 dims, got shape {tuple(allowed.shape)}")
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def block_causal_mask(
    block_sizes: Sequence[int],
    *,
    past: int = 0,
    padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Additive 4D mask for new tokens grouped in blocks: full attention inside a block, causal across.

    A plain causal mask is ``block_causal_mask([1] * T)``; VAR's block-causal mask over scales with
    ``patch_nums`` is ``block_causal_mask([pn * pn for pn in patch_nums])`` (SPEC 2.3); a text prefix
    followed by scales is ``[1] * T_text + [pn * pn, ...]``.

    Args:
        block_sizes: sizes of consecutive blocks of new tokens, ``T = sum(block_sizes)``.
        past: number of cached tokens before them; every new token sees all of them.
        padding_mask: optional ``(B, past + T)`` 1/0 (or bool) key mask; padding keys are hidden.
            A query row that would see nothing (a padding query) is allowed its own key so softmax
            stays finite.
        dtype, device: of the result.

    Returns:
        mask_B1QK: float ``(B or 1, 1, T, past + T)``.
    """
    if any(int(s) <= 0 for s in block_sizes):
        raise ValueError(f"block sizes must be positive, got {list(block_sizes)}")
    if padding_mask is not None:
        device = padding_mask.device if device is None else device
    sizes = torch.as_tensor(list(block_sizes), dtype=torch.long, device=device)
    block_T = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
    new_allowed_QK = block_T[None, :] <= block_T[:, None]
    past_allowed_QK = torch.ones(len(block_T), past, dtype=torch.bool, device=device)
    allowed = torch.cat([past_allowed_QK, new_allowed_QK], dim=1)[None]  # (1, T, past+T)
    if padding_mask is not None:
        allowed = _apply_padding(allowed, padding_mask, past)
    return additive_mask(allowed, dtype)


def block_extension_mask(
    batch_size: int,
    num_new: int,
    *,
    past: int,
    padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask for extending a KV cache by one block of ``num_new`` tokens that see each other and the past.

    Equivalent to ``block_causal_mask([num_new], past=past, ...)`` expanded to the batch.

    Returns:
        mask_B1nK: float ``(B, 1, num_new, past + num_new)``; zeros unless ``padding_mask`` hides keys.
    """
    mask = block_causal_mask([num_new], past=past, padding_mask=padding_mask, dtype=dtype, device=device)
    return mask.expand(batch_size, -1, -1, -1)


def _apply_padding(allowed_BQK: torch.Tensor, padding_mask_BK: torch.Tensor, past: int) -> torch.Tensor:
    keys_BK = padding_mask_BK.bool()
    if keys_BK.shape[1] != allowed_BQK.shape[-1]:
        raise ValueError(
            f"padding_mask covers {keys_BK.shape[1]} keys but the mask has {allowed_BQK.shape[-1]}")
    allowed_BQK = allowed_BQK & keys_BK[:, None, :]
    num_q = allowed_BQK.shape[1]
    self_QK = torch.zeros(num_q, allowed_BQK.shape[-1], dtype=torch.bool, device=allowed_BQK.device)
    self_QK[torch.arange(num_q), past + torch.arange(num_q)] = True
    empty_BQ1 = ~allowed_BQK.any(-1, keepdim=True)
    return allowed_BQK | (empty_BQ1 & self_QK)


def separate_image_tokens(allowed_BQK: torch.Tensor, is_image_BT: torch.Tensor) -> torch.Tensor:
    """Remove attention between *different* image slots from a "may attend" mask over one sequence.

    For ``LLMConfig.image_attention="separate"``: an image slot then sees the text before it and itself, and
    text sees every slot as before, so each slot's hidden state stays a function of its own visual feature
    (and the preceding text) through every layer instead of being mixed with the slots before it.

    Args:
        allowed_BQK: bool ``(B, T, T)`` mask over the T tokens of the sequences (no cache), True = attend.
        is_image_BT: bool ``(B, T)``, True at image slots.

    Returns:
        The mask with ``[b, q, k]`` False wherever q != k are both image slots.
    """
    T = is_image_BT.shape[1]
    eye_TT = torch.eye(T, dtype=torch.bool, device=is_image_BT.device)
    return allowed_BQK & ~(is_image_BT[:, :, None] & is_image_BT[:, None, :] & ~eye_TT)


def causal_allowed(padding_mask_BT: torch.Tensor, block_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(B, T, T)`` "may attend" mask of T new tokens without a cache: query q sees key k when
    ``block_BT[k] <= block_BT[q]`` (non-decreasing block ids; default each token its own block, i.e. causal)
    and k is not padding; every token sees itself (so a padding row is never empty)."""
    T = padding_mask_BT.shape[1]
    eye_TT = torch.eye(T, dtype=torch.bool, device=padding_mask_BT.device)
    if block_BT is None:
        order_BTT = torch.ones_like(eye_TT).tril()[None]
    else:
        order_BTT = block_BT[:, None, :] <= block_BT[:, :, None]
    return (order_BTT & padding_mask_BT.bool()[:, None, :]) | eye_TT


def shared_prefix_allowed(segments_BT: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, T, T)`` "may attend" mask of sequences that hold a shared prefix and several branches.

    ``segments_BT`` (long): 0 on the prefix, ``1, 2, ...`` on the branches (in order), -1 on padding.
    Query q sees key k when ``k <= q``, k is not padding, and k is on the prefix or on q's own branch, so
    every branch is computed exactly as if it followed the prefix alone (its RoPE positions must then
    continue the prefix's: :func:`vargpt.training.base_llava.pack_shared_prefixes` stores them). Every token
    sees itself, so a padding row is never empty.
    """
    q_BT1, k_B1T = segments_BT[:, :, None], segments_BT[:, None, :]
    same_branch = (k_B1T == 0) | (k_B1T == q_BT1)  # holds on the diagonal, so every token keeps itself
    return causal_allowed(segments_BT >= 0) & same_branch


def positions_from_padding(padding_mask_BK: torch.Tensor, num_new: int | None = None) -> torch.Tensor:
    """RoPE positions that ignore padding: the number of real tokens before each token.

    Args:
        padding_mask_BK: ``(B, past + T)`` 1 = token, 0 = padding (left or right).
        num_new: if given, return only the positions of the last ``num_new`` tokens (the new block
            when extending a cache).

    Returns:
        position_ids_BT: long ``(B, T)``; padding slots get position 0 (they are masked anyway).
    """
    pos_BK = padding_mask_BK.long().cumsum(-1) - 1
    pos_BK = pos_BK.clamp(min=0)
    return pos_BK if num_new is None else pos_BK[:, -num_new:]


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


@dataclass
class BackboneOutput:
    """Result of :meth:`LLMBackbone.forward`."""

    hidden_BTD: torch.Tensor
    """Final hidden states after the model's last norm."""
    logits_BTV: torch.Tensor | None
    """LM-head logits, or None when ``compute_logits=False``."""
    cache: Cache | None
    """The (updated) KV cache when ``use_cache`` or a cache was given."""


def hf_config_from_llm_config(cfg: LLMConfig) -> LlamaConfig | Qwen2Config:
    """HF config for ``cfg`` (Llama or Qwen2)."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if cfg.architecture == "llama":
        return LlamaConfig(**common)
    if cfg.architecture == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown LLM architecture {cfg.architecture!r}")


class LLMBackbone(nn.Module):
    """A causal LM used on embeddings: ``forward(embeds_BTD) -> BackboneOutput``.

    Attribute ``model`` is the HF ``*ForCausalLM`` (see the module docstring for key names).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: LLMConfig, *, attn_implementation: str | None = None) -> LLMBackbone:
        """Randomly initialised Llama/Qwen2 from :class:`LLMConfig` (fp32)."""
        hf_cfg = hf_config_from_llm_config(cfg)
        impl = attn_implementation or cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=impl, dtype=torch.float32)
        return cls(model)

    @classmethod
    def from_hf_config(
        cls, hf_config: dict | PretrainedConfig, *, attn_implementation: str | None = None,
    ) -> LLMBackbone:
        """Randomly initialised model from an HF config (object or ``to_dict()`` form, any causal LM)."""
        if isinstance(hf_config, dict):
            data = dict(hf_config)
            hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return cls(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, **kwargs))

    def hf_config_dict(self) -> dict:
        """The HF config as a JSON-serialisable dict (rebuild with :meth:`from_hf_config`)."""
        return self.model.config.to_dict()

    @classmethod
    def from_pretrained(
        cls, path: str, *, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32,
    ) -> LLMBackbone:
        """Load any HF causal LM from a local directory (never downloads)."""
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)
        return cls(model)

    def save_pretrained(self, path: str) -> None:
        """Write the HF model (``config.json`` + ``model.safetensors``) to a directory."""
        self.model.save_pretrained(str(path))

    # ---- properties --------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """LLM width D."""
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding V."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.model.get_input_embeddings().weight.dtype

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for this model."""
        return DynamicCache(config=self.model.config)

    def resize_token_embeddings(self, new_size: int) -> None:
        """Resize input (and untied output) embeddings to ``new_size`` rows.

        Added rows are set to the mean of the old rows (a neutral start, as LLaVA/HF mean resizing).
        """
        old_size = self.vocab_size
        if new_size == old_size:
            return
        self.model.resize_token_embeddings(new_size, mean_resizing=False)
        if new_size > old_size:
            with torch.no_grad():
                for emb in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                    if emb is not None:
                        emb.weight[old_size:] = emb.weight[:old_size].mean(0)

    # ---- computation -------------------------------------------------------------------------
    def embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T) -> (B, T, D)``."""
        return self.model.get_input_embeddings()(ids_BT)

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """LM head on final hidden states ``(B, T, D) -> (B, T, V)``."""
        return self.model.get_output_embeddings()(hidden_BTD)

    def forward(
        self,
        embeds_BTD: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        compute_logits: bool = True,
    ) -> BackboneOutput:
        """Run the decoder on embeddings.

        Args:
            embeds_BTD: input embeddings of the T new tokens.
            attention_mask: None, 2D padding mask ``(B, past+T)`` or 4D mask ``(B|1, 1, T, past+T)``
                (module docstring).
            position_ids: ``(B|1, T)``; default from the 2D mask, else ``past + arange(T)``.
                With ``attention_mask=None`` and no cache, non-contiguous positions are read by HF as
                packed sequences (attention restricted to each run).
            cache: a KV cache (e.g. :meth:`new_cache`) that is extended in place.
            use_cache: create a cache if none is given and return it.
            compute_logits: apply the LM head (skip for generation slots that only need hidden states).

        Returns:
            :class:`BackboneOutput` with final-normed ``hidden_BTD``, optional ``logits_BTV``, cache.
        """
        mask = self._prepare_mask(attention_mask, embeds_BTD.dtype)
        if position_ids is None and mask is not None and mask.dim() == 2:
            position_ids = positions_from_padding(mask, embeds_BTD.shape[1])
        if use_cache and cache is None:
            cache = self.new_cache()
        decoder = self.model.get_decoder()
        out = decoder(
            inputs_embeds=embeds_BTD, attention_mask=mask, position_ids=position_ids,
            use_cache=use_cache or cache is not None, **{_cache_argument(decoder): cache},
        )
        hidden_BTD = out.last_hidden_state
        logits_BTV = self.logits(hidden_BTD) if compute_logits else None
        return BackboneOutput(hidden_BTD=hidden_BTD, logits_BTV=logits_BTV, cache=_returned_cache(out))

    @staticmethod
    def _prepare_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None or mask.dim() == 2:
            return mask
        if mask.dim() != 4:
            raise ValueError(f"attention_mask must be 2D or 4D, got shape {tuple(mask.shape)}")
        if mask.dtype == torch.bool:  # eager attention would add True/False as +1/+0
            return additive_mask(mask, dtype)
        return mask.to(dtype)


def add_special_tokens(tokenizer, backbone: LLMBackbone | None = None) -> list[str]:  # noqa: ANN001
    """Add VARGPT's special tokens (:data:`vargpt.special_tokens.ADDED_TOKENS`) to an HF tokenizer.

    Tokens already present are left alone. If ``backbone`` is given and the tokenizer now has more
    tokens than the embedding matrix has rows, the embeddings are resized (never shrunk).

    Returns:
        The token strings that were newly added, in id order.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in ADDED_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    if backbone is not None and len(tokenizer) > backbone.vocab_size:
        backbone.resize_token_embeddings(len(tokenizer))
    return missing


def _cache_argument(decoder: nn.Module) -> str:
    """The name the HF decoder's ``forward`` takes the KV cache by: ``cache`` from transformers 5.25 on
    (``past_key_values`` is deprecated there and goes in 5.40), ``past_key_values`` before."""
    return _cache_argument_of(type(decoder))


@functools.cache
def _cache_argument_of(decoder_cls: type) -> str:  # once per class: inspect.signature costs ~0.1 ms a call
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def _returned_cache(out: object) -> Cache | None:
    """The KV cache of a HF decoder output, under either name (see :func:`_cache_argument`)."""
    return getattr(out, _cache_field_of(type(out)))


@functools.cache
def _cache_field_of(output_cls: type) -> str:  # once per output class, not per forward
    names = {f.name for f in dataclasses.fields(output_cls)} if dataclasses.is_dataclass(output_cls) else set()
    return "cache" if "cache" in names else "past_key_values"

