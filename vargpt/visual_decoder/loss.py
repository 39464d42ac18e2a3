"""Cross-entropy over the codes of all scales, weighted per token (VAR), per scale, or by a power of
each scale's token count.

VAR averages the cross-entropy over all L tokens (SPEC 2.8), so the finest scale (pn^2 tokens) dominates
the loss and the first scales, where the class decides colour and layout, weigh little: at patch_nums
(1, 2, 3, 4, 6, 8) the three first scales are 14 of 130 tokens. ``"scale"`` gives every scale the same
total weight (each token of scale k weighs 1 / (S * pn_k^2)), which makes the condition's gradient much
larger early in training. ``"power"`` generalises both: scale k's total weight is proportional to
(pn_k^2) ** p (p = 0 is ``"scale"``, p = 1 is ``"token"``, p > 1 leans further towards the finest
scales, where a small image's shapes are drawn). ``min_share`` then raises every scale's share to at least
that value (the shares renormalised after), so a strong lean towards the finest scale does not starve the
first scales, whose few tokens otherwise get a fraction of a percent of the gradient. The reported token
accuracy is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from vargpt.tokenizer.scales import scale_ids

LossWeighting = Literal["token", "scale", "power"]


def token_weights(patch_nums: Sequence[int], weighting: LossWeighting, power: float = 1.0,
                  min_share: float = 0.0) -> torch.Tensor:
    """Per-token loss weights (L,), summing to 1; ``power`` is used by ``"power"`` weighting only. With
    ``min_share`` > 0 each scale's total is clamped from below at ``min_share`` and the totals renormalised
    (a scale's tokens keep equal weights)."""
    if not 0.0 <= min_share * len(patch_nums) <= 1.0:
        raise ValueError(f"min_share={min_share}: must be in [0, 1 / number of scales]")
    lvl_L = scale_ids(patch_nums)
    counts = torch.tensor([pn * pn for pn in patch_nums], dtype=torch.float64)
    if weighting == "token":
        exponent = 1.0
    elif weighting == "scale":
        exponent = 0.0
    elif weighting == "power":
        exponent = float(power)
    else:
        raise ValueError(f"loss weighting {weighting!r}: choose 'token', 'scale' or 'power'")
    # Scale k's total is counts[k] ** exponent, spread evenly over its counts[k] tokens.
    share_S = counts.pow(exponent) / counts.pow(exponent).sum()
    share_S = share_S.clamp_min(min_share)
    share_S = share_S / share_S.sum()
    return (share_S / counts)[lvl_L].float()


def code_loss(logits_NLK: torch.Tensor, gt_NL: torch.Tensor, weights_L: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy (fp32) of code logits against the ground-truth codes."""
    ce_NL = F.cross_entropy(logits_NLK.float().flatten(0, 1), gt_NL.flatten(), reduction="none").view(gt_NL.shape)
    return (ce_NL * weights_L.to(ce_NL.device)).sum(1).mean()
