"""Cross-entropy over the codes of all scales, weighted per token (VAR) or per scale.

VAR averages the cross-entropy over all L tokens (SPEC 2.8), so the finest scale (pn^2 tokens) dominates
the loss and the first scales, where the class decides colour and layout, weigh almost nothing: at
patch_nums (1, 2, 3, 4, 6, 8) the three first scales are 14 of 130 tokens. ``"scale"`` weighting gives
every scale the same total weight (each token of scale k weighs 1 / (S * pn_k^2)), which makes the
condition's gradient much larger early in training; the reported token accuracy is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from vargpt.tokenizer.scales import scale_ids

LossWeighting = Literal["token", "scale"]


def token_weights(patch_nums: Sequence[int], weighting: LossWeighting) -> torch.Tensor:
    """Per-token loss weights (L,), summing to 1."""
    lvl_L = scale_ids(patch_nums)
    if weighting == "token":
        return torch.full((lvl_L.numel(),), 1.0 / lvl_L.numel())
    if weighting == "scale":
        counts = torch.tensor([pn * pn for pn in patch_nums], dtype=torch.float32)
        return 1.0 / (len(patch_nums) * counts[lvl_L])
    raise ValueError(f"loss weighting {weighting!r}: choose 'token' or 'scale'")


def code_loss(logits_NLK: torch.Tensor, gt_NL: torch.Tensor, weights_L: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy (fp32) of code logits against the ground-truth codes."""
    ce_NL = F.cross_entropy(logits_NLK.float().flatten(0, 1), gt_NL.flatten(), reduction="none").view(gt_NL.shape)
    return (ce_NL * weights_L.to(ce_NL.device)).sum(1).mean()
