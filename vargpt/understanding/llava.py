"""The understanding half of VARGPT as a stand-alone LLaVA-1.5: vision tower + projector + LLM.

Data flow (SPEC 3.1, 3.3): ``pixels_N3HW -> vision_tower -> feats_NPF -> projector -> embeds_NPD``,
placed at the ``<image>`` slots of the text embeddings (each image expanded to P slots), then the
causal LLM. This module is the forward pass only; the greedy answer loop is
:mod:`vargpt.understanding.answer`, training is :mod:`vargpt.training.base_llava`.

State-dict keys: ``vision_tower.model.encoder...``, ``projector.linear_1/linear_2...``,
``llm.model.model.layers...``, ``llm.model.lm_head...`` (HF LLaVA: ``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model`` + ``lm_head``; see :func:`to_hf_llava_state`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vargpt.config import IMAGE_ATTENTION_MODES, VisionTowerConfig
from vargpt.llm.backbone import (
    BackboneOutput,
    LLMBackbone,
    additive_mask,
    causal_allowed,
    positions_from_padding,
    separate_image_tokens,
    shared_prefix_allowed,
)
from vargpt.llm.merge import merge_image_features
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import VisionTower

__all__ = ["Llava", "to_hf_llava_state"]


class Llava(nn.Module):
    """Vision tower + understanding projector + LLM backbone, forward on ids with image slots."""

    def __init__(
        self, vision_tower: VisionTower, projector: UnderstandingProjector, llm: LLMBackbone, *,
        image_token_id: int, image_attention: str = "causal",
    ) -> None:
        super().__init__()
        if image_attention not in IMAGE_ATTENTION_MODES:
            raise ValueError(f"image_attention={image_attention!r}: must be 'causal' or 'separate'")
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.image_attention = image_attention
        """``LLMConfig.image_attention``: ``"separate"`` keeps image slots from attending to each other."""

    @property
    def num_image_tokens(self) -> int:
        """P: LLM slots per image."""
        return self.vision_tower.num_patches

    def image_embeds(
        self, pixels_N3HW: torch.Tensor | None = None, *, image_feats_NPF: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected image features ``(N, P, D)`` from pixels, or from precomputed tower features."""
        if image_feats_NPF is None:
            if pixels_N3HW is None:
                raise ValueError("pass pixels_N3HW or image_feats_NPF")
            image_feats_NPF = self.vision_tower(pixels_N3HW)
        return self.projector(image_feats_NPF.to(self.llm.dtype))

    def input_embeds(
        self, ids_BT: torch.Tensor, *, pixels_N3HW: torch.Tensor | None = None,
        image_feats_NPF: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with the N images' embeddings at the ``<image>`` slots, ``(B, T, D)``."""
        embeds_BTD = self.llm.embed(ids_BT)
        if pixels_N3HW is None and image_feats_NPF is None:
            D = embeds_BTD.shape[-1]
            return merge_image_features(embeds_BTD, ids_BT, self.image_token_id,
                                        embeds_BTD.new_zeros(0, self.num_image_tokens, D))
        image_NPD = self.image_embeds(pixels_N3HW, image_feats_NPF=image_feats_NPF)
        return merge_image_features(embeds_BTD, ids_BT, self.image_token_id, image_NPD)

    def forward(
        self,
        ids_BT: torch.Tensor,
        *,
        pixels_N3HW: torch.Tensor | None = None,
        image_feats_NPF: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,  # noqa: ANN001 - transformers Cache
        use_cache: bool = False,
        compute_logits: bool = True,
    ) -> BackboneOutput:
        """Logits over the text vocabulary for ``ids_BT`` (images given as pixels or tower features).

        ``attention_mask``/``position_ids``/``cache`` as :meth:`LLMBackbone.forward`. When extending a
        cache with text only, pass neither pixels nor features.
        """
        embeds_BTD = self.input_embeds(ids_BT, pixels_N3HW=pixels_N3HW, image_feats_NPF=image_feats_NPF)
        if self.image_attention == "separate":
            if cache is not None and cache.get_seq_length() > 0 and bool((ids_BT == self.image_token_id).any()):
                raise ValueError("image_attention='separate' builds its mask over a whole prompt: pass image slots "
                                 "in the first (prefill) call, not when extending a KV cache")
            attention_mask, position_ids = self.separate_image_mask(ids_BT, attention_mask, position_ids)
        return self.llm(embeds_BTD, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=use_cache, compute_logits=compute_logits)

    def separate_image_mask(
        self, ids_BT: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The 4D mask (and RoPE positions) of ``image_attention="separate"`` for a prompt or training
        sequence from its 2D padding mask; unchanged when there is no image slot or the mask is already 4D."""
        is_image_BT = ids_BT == self.image_token_id
        if not bool(is_image_BT.any()) or (attention_mask is not None and attention_mask.dim() != 2):
            return attention_mask, position_ids
        padding_BT = torch.ones_like(ids_BT) if attention_mask is None else attention_mask
        if position_ids is None:
            position_ids = positions_from_padding(padding_BT)
        allowed_BTT = separate_image_tokens(causal_allowed(padding_BT), is_image_BT)
        return additive_mask(allowed_BTT, self.llm.dtype), position_ids

    def shared_prefix_mask(self, ids_BT: torch.Tensor, segments_BT: torch.Tensor) -> torch.Tensor:
        """The additive 4D mask of sequences packed as a shared prefix and branches
        (:func:`~vargpt.llm.backbone.shared_prefix_allowed`; segments -1 = padding), with image slots kept
        apart as well under ``image_attention="separate"``."""
        allowed_BTT = shared_prefix_allowed(segments_BT)
        if self.image_attention == "separate":
            allowed_BTT = separate_image_tokens(allowed_BTT, ids_BT == self.image_token_id)
        return additive_mask(allowed_BTT, self.llm.dtype)


def to_hf_llava_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a :class:`Llava` state dict to HF ``LlavaForConditionalGeneration`` keys (transformers 5).

    Raises:
        ValueError: the tower is a ResNet (HF LLaVA reads a ViT's token sequence; compare with
            :func:`vit_stand_in` in its place).
    """
    if any(key.startswith("vision_tower.model.embedder.") for key in state):
        raise ValueError("transformers' LlavaForConditionalGeneration holds ViT towers only; this model's tower "
                         "is a ResNet (swap in vargpt.understanding.llava.vit_stand_in(...) to compare)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("vision_tower.model."):
            new = "model.vision_tower." + key[len("vision_tower.model."):]
        elif key.startswith("projector."):
            new = "model.multi_modal_projector." + key[len("projector."):]
        elif key.startswith("llm.model.model."):
            new = "model.language_model." + key[len("llm.model.model."):]
        elif key.startswith("llm.model.lm_head."):
            new = "lm_head." + key[len("llm.model.lm_head."):]
        else:
            raise KeyError(f"unexpected Llava state key {key!r}")
        out[new] = value
    return out


def vit_stand_in(cfg: VisionTowerConfig, *, seed: int = 0) -> tuple[VisionTower, VisionTowerConfig]:
    """A randomly initialised 2-layer CLIP ViT giving the same number and width of features as ``cfg``'s tower.

    For comparisons with transformers' ``LlavaForConditionalGeneration`` (which holds ViT towers only) at
    equal weights: put it in place of a ResNet tower on both sides; the projector and LLM are unchanged.
    """
    side = math.isqrt(cfg.num_patches)
    vit = dataclasses.replace(
        cfg, architecture="clip", patch_size=cfg.image_size // side, intermediate_size=4 * cfg.hidden_size,
        num_layers=2, num_heads=4 if cfg.hidden_size % 4 == 0 else 1, feature_layer=-2, drop_cls=True,
        stage_sizes=(), stage_depths=())
    torch.manual_seed(seed)
    return VisionTower.from_config(vit), vit
