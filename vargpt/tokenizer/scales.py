"""Pure functions over the scale schedule ``patch_nums`` of the multi-scale tokenizer (SPEC 1.6-1.9).

A token map at scale ``k`` is ``pn_k x pn_k`` codes, flattened row-major (index = h * pn + w); the
scales are concatenated coarse to fine into ``L = sum(pn_k^2)`` tokens. Nothing here holds state or
parameters; every function returns new values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_counts(patch_nums: Sequence[int]) -> list[int]:
    """Tokens per scale, ``pn_k^2``: (1, 2, 3) -> [1, 4, 9]."""
    return [pn * pn for pn in patch_nums]


def scale_offsets(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """``(begin, end)`` of each scale's tokens in the concatenated sequence (VAR's ``begin_ends``).

    (1, 2, 3) -> [(0, 1), (1, 5), (5, 14)].
    """
    out: list[tuple[int, int]] = []
    begin = 0
    for n in token_counts(patch_nums):
        out.append((begin, begin + n))
        begin += n
    return out


def scale_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """Scale index of every token, LongTensor (L,): (1, 2) -> [0, 1, 1, 1, 1]."""
    counts = torch.tensor(token_counts(patch_nums), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(patch_nums)), counts)


def num_phi_convs(num_scales: int, share_quant_resi: int) -> int:
    """How many phi convs exist: one per scale when ``share_quant_resi == 0``, else that many."""
    return num_scales if share_quant_resi == 0 else share_quant_resi


def phi_index_table(num_scales: int, share_quant_resi: int) -> list[int]:
    """Which phi conv each scale uses (SPEC 1.6).

    With ``n`` convs, their ticks are ``linspace(m, 1 - m, n)`` with margin ``m = 1/3/n`` when
    ``n == 4`` and ``1/2/n`` otherwise; scale ``k`` of ``K`` picks ``argmin_j |t_j - k/(K-1)|``
    (first index on ties). Evaluated in float64 with the same operation order as VAR
    (``numpy.linspace`` = ``start + i * step``, last tick exactly ``stop``), because two of the ten
    default scales (k=2, k=7) are exact ties in real arithmetic and are decided by rounding.
    For K=10 and 4 convs this gives 0,0,1,1,1,2,2,3,3,3. With one scale (K=1), VAR would divide by
    zero; we use position 0.
    """
    if num_scales <= 0:
        raise ValueError(f"num_scales={num_scales} must be positive")
    if share_quant_resi < 0:
        raise ValueError(f"share_quant_resi={share_quant_resi} must be >= 0")
    n = num_phi_convs(num_scales, share_quant_resi)
    margin = 1 / 3 / n if n == 4 else 1 / 2 / n
    start, stop = margin, 1 - margin
    if n == 1:
        ticks = [start]
    else:
        step = (stop - start) / (n - 1)
        ticks = [start + i * step for i in range(n - 1)] + [stop]
    table = []
    for k in range(num_scales):
        at = k / (num_scales - 1) if num_scales > 1 else 0.0
        dists = [abs(t - at) for t in ticks]
        table.append(dists.index(min(dists)))  # first index on ties, as argmin
    return table


def area_downsample(f_BZhw: torch.Tensor, pn: int) -> torch.Tensor:
    """Resize a (B, Z, h, w) map to (B, Z, pn, pn) by 'area' interpolation.

    'area' is adaptive average pooling: output bin ``i`` averages input rows
    ``[floor(i*h/pn), ceil((i+1)*h/pn))`` (bins overlap when pn does not divide h).
    """
    return F.interpolate(f_BZhw, size=(pn, pn), mode="area")


def bicubic_upsample(h_BZhw: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (B, Z, pn, pn) map to (B, Z, size, size) bicubically.

    PyTorch semantics: align_corners=False, cubic-convolution coefficient a = -0.75, source
    indices clamped at the borders.
    """
    return F.interpolate(h_BZhw, size=(size, size), mode="bicubic", align_corners=False)
