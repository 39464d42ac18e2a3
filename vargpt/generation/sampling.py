"""Pure sampling functions for image codes (SPEC 2.10-2.11): top-k, top-p, CFG, Gumbel smoothing.

Nothing here mutates its inputs; randomness comes only from the explicit ``generator`` argument
(None = the global RNG). Logits have any leading shape and the codebook (K) on the last axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row, set the rest to -inf (``k`` <= 0 or >= K: unchanged).

    The threshold is the k-th largest value and only values strictly below it are removed, so entries
    tied with it all survive (a row may keep more than ``k``), as upstream (SPEC 2.11).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely entries whose total probability is <= 1 - ``p``.

    Sorted ascending, an entry is removed when the cumulative softmax mass up to and including it is
    <= 1 - p; the most likely entry is never removed (SPEC 2.11). ``p`` <= 0 or >= 1: unchanged.
    """
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum_mass <= 1.0 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(
    logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (each a no-op at its 'off' value)."""
    if temperature != 1.0:
        logits = logits / temperature
    return filter_top_p(filter_top_k(logits, top_k), top_p)


def sample(
    logits: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one index per row from softmax(filtered logits).

    Args:
        logits: (..., K) unnormalised scores, e.g. logits_BlK.
        top_k, top_p, temperature: see :func:`filter_logits`.
        generator: the explicit RNG.

    Returns:
        idx (...,) int64, e.g. idx_Bl.
    """
    probs = filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature).softmax(dim=-1)
    flat_NK = probs.reshape(-1, probs.shape[-1])
    idx_N = torch.multinomial(flat_NK, num_samples=1, generator=generator)
    return idx_N.view(probs.shape[:-1])


def sample_per_row(
    logits: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`sample` with one RNG per row: row ``b`` of ``logits`` is drawn with ``generators[b]`` only.

    A row's draws then depend only on its own generator, not on which other rows share the batch, so
    a batched run reproduces per-sample runs with the same per-sample generators.

    Args:
        logits: (B, ..., K), e.g. logits_BlK or logits_BV.
        generators: B explicit RNGs.

    Returns:
        idx (B, ...) int64.
    """
    if len(generators) != logits.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logits.shape[0]} rows")
    return torch.stack([sample(logits[b], top_k=top_k, top_p=top_p, temperature=temperature, generator=g)
                        for b, g in enumerate(generators)])


def cfg_scale(
    si: int, num_scales: int, cfg: float, schedule: Literal["linear", "constant"] = "linear"
) -> float:
    """Guidance strength t at scale ``si``.

    'linear' (VAR, SPEC 2.10): t = cfg * si / (S - 1), 0 at the 1x1 scale and cfg at the last;
    'constant': t = cfg at every scale.
    """
    if schedule == "constant" or num_scales <= 1:
        return float(cfg)
    if schedule != "linear":
        raise ValueError(f"unknown cfg schedule {schedule!r}; use 'linear' or 'constant'")
    return cfg * si / (num_scales - 1)


def cfg_mix(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance on logits: (1 + t) * l_cond - t * l_uncond."""
    return (1.0 + t) * logits_cond - t * logits_uncond


def gumbel_tau(si: int, num_scales: int) -> float:
    """Gumbel-softmax temperature of VAR's "more_smooth" mode at scale ``si``.

    tau = max(0.27 * (1 - 0.95 * r), 0.005) with r = si / (S - 1). The constants are upstream's, without
    a stated derivation: FoundationVision/VAR, models/var.py, ``autoregressive_infer_cfg`` (SPEC 2.10).
    """
    ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
    return max(0.27 * (1.0 - 0.95 * ratio), 0.005)


def gumbel_softmax_embed(
    logits_BlK: torch.Tensor,
    codebook_KZ: torch.Tensor,
    *,
    si: int,
    num_scales: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Soft code embedding of VAR's "more_smooth" mode (SPEC 2.10).

    h = softmax((l * (1 + r) + g) / tau) @ E with Gumbel noise g = -log(Exp(1)), r = si / (S - 1),
    tau from :func:`gumbel_tau` (source: FoundationVision/VAR models/var.py and
    ``gumbel_softmax_with_rng`` in models/helpers.py). ``logits_BlK`` are the already
    guided and filtered logits (-inf entries get zero weight).

    Returns:
        h_BlZ: the expected code embedding per token.
    """
    ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
    exp_noise = torch.empty_like(logits_BlK).exponential_(generator=generator)
    gumbel = -exp_noise.log()
    weights = F.softmax((logits_BlK * (1.0 + ratio) + gumbel) / gumbel_tau(si, num_scales), dim=-1)
    return weights @ codebook_KZ
