"""CLIP-style contrastive pretraining model for the tiny vision tower (Radford et al. 2021).

The released VARGPT inherits a CLIP ViT pretrained on web image-text pairs; the tiny preset has none,
so the tower is pretrained here on the dataset's own image-text pairs. The text side is a small
transformer encoder of our own over the BPE ids (mean-pooled); the image side is the vision tower's
pooled output (a ViT's post-LN CLS, as CLIP; a ResNet's mean over its last map). Only the vision tower is
kept afterwards.

Datasets such as ShapesWorld pair many images with *identical* texts (and one image with several
texts), so the loss is CLIP's symmetric cross-entropy with *multi-positive* soft targets: every pair
with the same image or the same text counts as a positive (:func:`contrastive_loss`).

Addition (optional, ``answer_vocab > 0``): an auxiliary *answer* loss. For records that ask a question
about the image, a head predicts the answer's tokens from the image's patch features (the layer LLaVA
reads) pooled by attention with the encoded question as the query, plus the encoded question (the
question selects the object and the attribute, the image the value; softmax over the vocabulary against
the normalised multi-hot answer). Reason: from scratch and in about a minute of CPU,
contrastive learning (alone, or with a bag-of-caption-tokens loss) learns colour but not shape (linear
probes on the features stay near 40 % shape accuracy after 300 steps), while a question-conditioned
answer loss gives the tower a direct, classification-like signal for every attribute. A batch can ask
several questions about one image (``question_pair_M``): the image is encoded once and every question's
answer is predicted from it (:class:`vargpt.training.base_vision.PairData` asks all of an image's questions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.understanding.vision_tower import VisionTower

__all__ = ["ContrastiveModel", "TextEncoder", "contrastive_loss", "multi_hot_cross_entropy"]


class TextEncoder(nn.Module):
    """Token + position embeddings, pre-LN transformer encoder, masked mean pool: ``ids_BT -> (B, W)``."""

    def __init__(self, vocab_size: int, width: int = 128, depth: int = 2, heads: int = 4,
                 max_len: int = 64) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.max_len = max_len

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """Mean of the final states over real tokens (``mask_BT`` 1 = token)."""
        T = ids_BT.shape[1]
        if T > self.max_len:
            raise ValueError(f"text of {T} tokens exceeds max_len={self.max_len}")
        x_BTW = self.token_embedding(ids_BT) + self.position_embedding.weight[:T]
        x_BTW = self.encoder(x_BTW, src_key_padding_mask=~mask_BT.bool())
        x_BTW = self.final_norm(x_BTW)
        w_BT1 = mask_BT[..., None].to(x_BTW.dtype)
        return (x_BTW * w_BT1).sum(1) / w_BT1.sum(1).clamp_min(1.0)


class ContrastiveModel(nn.Module):
    """Vision tower + text encoder + linear projections to a joint space + learnable temperature."""

    def __init__(self, vision_tower: VisionTower, text_encoder: TextEncoder, embed_dim: int, *,
                 answer_head: bool = False) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.text_encoder = text_encoder
        self.visual_projection = nn.Linear(vision_tower.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.final_norm.normalized_shape[0], embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        vocab, width = text_encoder.token_embedding.num_embeddings, text_encoder.final_norm.normalized_shape[0]
        self.answer_image_head = nn.Linear(vision_tower.hidden_size, vocab) if answer_head else None
        self.answer_question_head = nn.Linear(width, vocab) if answer_head else None
        # The question attends over the tower's *patch features* (the layer LLaVA reads): the answer loss
        # then trains exactly the features the projector will see, and lets a question about one object
        # of several ("what shape is the green object?") pool that object's patches.
        self.answer_query = nn.Linear(width, vision_tower.hidden_size) if answer_head else None

    def pooled_image(self, pixels_B3HW: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output ``(B, F)`` (CLIP: post-LN CLS)."""
        return self.vision_tower.features_and_pooled(pixels_B3HW)[1]

    def _image_outputs(self, pixels_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled output ``(B, F)`` and the LLaVA-facing patch features ``(B, P, F)`` in one pass."""
        feats_BPF, pooled_BF = self.vision_tower.features_and_pooled(pixels_B3HW)
        return pooled_BF, feats_BPF

    def encode_image(self, pixels_B3HW: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, E)``."""
        return F.normalize(self.visual_projection(self.pooled_image(pixels_B3HW)), dim=-1)

    def encode_text(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, E)``."""
        return F.normalize(self.text_projection(self.text_encoder(ids_BT, mask_BT)), dim=-1)

    def forward(
        self, pixels_B3HW: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor,
        positives_BB: torch.Tensor, *, question_ids_UQ: torch.Tensor | None = None,
        question_mask_UQ: torch.Tensor | None = None, answer_targets_MV: torch.Tensor | None = None,
        question_index_M: torch.Tensor | None = None, question_pair_M: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of a batch of B pairs and M questions about their images.

        Args:
            positives_BB: ``[i, j]`` True when pair i's image matches pair j's text.
            question_ids_UQ / question_mask_UQ: the distinct question texts of the batch (answer loss).
            answer_targets_MV: multi-hot answer tokens of each question (rows without a target are skipped).
            question_index_M: which row of ``question_ids_UQ`` is question m's text (default: row m).
            question_pair_M: which pair's image question m is about (default: pair m).

        Returns:
            ``{"contrastive": ..., "answer": ...}`` (``answer`` only with the head and at least one question),
            and ``(B,)`` detached per-pair terms ``"contrastive_per_sample"`` / ``"answer_per_sample"`` (the
            mean over the pair's questions; 0 for a pair without one) for hard-example replay.
        """
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP clamps the scale at 100
        pooled_BF, patches_BPF = self._image_outputs(pixels_B3HW)
        image_BE = F.normalize(self.visual_projection(pooled_BF), dim=-1)
        per_B = contrastive_loss(image_BE, self.encode_text(ids_BT, mask_BT), scale, positives_BB, reduction="none")
        out = {"contrastive": per_B.mean(), "contrastive_per_sample": per_B.detach()}
        if self.answer_image_head is None or answer_targets_MV is None or answer_targets_MV.shape[0] == 0:
            return out
        M, device = answer_targets_MV.shape[0], answer_targets_MV.device
        index_M = question_index_M if question_index_M is not None else torch.arange(M, device=device)
        pair_M = question_pair_M if question_pair_M is not None else torch.arange(M, device=device)
        # index_select, not advanced indexing: its backward (index_add_) sums repeated rows in a fixed order on
        # CPU, so runs are bitwise reproducible; x[idx]'s backward (index_put_ with accumulate) is not
        question_MW = torch.index_select(self.text_encoder(question_ids_UQ, question_mask_UQ), 0, index_M)
        patches_MPF = torch.index_select(patches_BPF, 0, pair_M)
        query_MF = self.answer_query(question_MW)
        attn_MP = torch.softmax(torch.einsum("mpf,mf->mp", patches_MPF, query_MF) / patches_MPF.shape[-1] ** 0.5,
                                dim=-1)
        attended_MF = torch.einsum("mp,mpf->mf", attn_MP, patches_MPF)
        logits_MV = self.answer_image_head(attended_MF) + self.answer_question_head(question_MW)
        out["answer"] = multi_hot_cross_entropy(logits_MV, answer_targets_MV)
        per_M = multi_hot_cross_entropy(logits_MV, answer_targets_MV, reduction="none").detach()
        asked_M = answer_targets_MV.any(1).to(per_M.dtype)
        B = pixels_B3HW.shape[0]
        sum_B = per_M.new_zeros(B).index_add_(0, pair_M, per_M * asked_M)
        n_B = per_M.new_zeros(B).index_add_(0, pair_M, asked_M)
        out["answer_per_sample"] = sum_B / n_B.clamp_min(1.0)
        return out


def contrastive_loss(
    image_BE: torch.Tensor, text_BE: torch.Tensor, scale: torch.Tensor | float, positives_BB: torch.Tensor,
    *, reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive soft targets.

    Args:
        image_BE, text_BE: L2-normalised embeddings of B pairs.
        scale: logit scale (inverse temperature).
        positives_BB: bool, True where image i and text j match; the diagonal must be True.

    Returns:
        Mean of image->text and text->image cross-entropies against row-normalised positives; with
        ``reduction="none"`` ``(B,)``: pair i's own share (half its image's row plus half its text's row).
    """
    if not bool(positives_BB.diagonal().all()):
        raise ValueError("positives_BB must mark every pair (its diagonal) as positive")
    logits_BB = scale * image_BE @ text_BE.T
    target_BB = positives_BB.to(logits_BB.dtype)
    loss_i2t_B = torch.sum(-target_BB / target_BB.sum(1, keepdim=True) * logits_BB.log_softmax(1), 1)
    target_T = target_BB.T
    loss_t2i_B = torch.sum(-target_T / target_T.sum(1, keepdim=True) * logits_BB.T.log_softmax(1), 1)
    per_B = 0.5 * (loss_i2t_B + loss_t2i_B)
    return per_B if reduction == "none" else per_B.mean()


def multi_hot_cross_entropy(logits_BV: torch.Tensor, targets_BV: torch.Tensor, *,
                            reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy against the row-normalised multi-hot ``targets_BV`` (a one-hot row is plain
    cross-entropy); rows without any target are skipped (``reduction="none"``: ``(B,)``, 0 for them)."""
    t_BV = targets_BV.to(logits_BV.dtype)
    n_B = t_BV.sum(1)
    keep = n_B > 0
    per_B = -(t_BV * logits_BV.log_softmax(-1)).sum(1) / n_B.clamp_min(1.0)
    if reduction == "none":
        return per_B
    if not bool(keep.any()):
        return logits_BV.sum() * 0.0
    return per_B[keep].mean()
