"""Pure attention masks of the visual decoder (SPEC section 2.3).

VAR's transformer is *block-causal over scales*: token i (at scale d(i)) attends to every token j with
d(j) <= d(i), i.e. to all earlier scales and bidirectionally to its own scale. At inference the same
visibility follows from running one forward per scale with a KV cache, so the mask is only needed when
several scales are processed in one forward (teacher forcing, or a cache-less reference loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vargpt.tokenizer.scales import scale_ids


def block_causal_bias(
    patch_nums: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Additive attention bias over all scales.

    Args:
        patch_nums: side of the token map at each scale (S entries); L = sum(pn^2).
        dtype: floating dtype of the bias.
        device: where to build it.

    Returns:
        bias_LL: 0 where d(j) <= d(i), ``-inf`` elsewhere (row i = query, column j = key). ``-inf``
        rather than ``finfo.min`` because every row keeps at least its own scale visible, so no softmax
        row is ever empty, and it reproduces upstream's stored 0/-inf buffer bit for bit.
    """
    d_L = scale_ids(patch_nums).to(device)
    allowed_LL = d_L[None, :] <= d_L[:, None]
    bias_LL = torch.zeros(allowed_LL.shape, dtype=dtype, device=device)
    return bias_LL.masked_fill_(~allowed_LL, float("-inf"))
