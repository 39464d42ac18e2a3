"""Pure sampling functions: top-k/top-p filters, CFG, seeded draws, Gumbel smoothing (SPEC 2.10-2.11)."""

from __future__ import annotations

import pytest
import torch

from vargpt.generation.sampling import (
    cfg_mix,
    cfg_scale,
    filter_logits,
    filter_top_k,
    filter_top_p,
    gumbel_softmax_embed,
    gumbel_tau,
    sample,
)


def test_top_k_keeps_exactly_k_without_ties():
    logits = torch.randn(4, 7, 50)
    out = filter_top_k(logits, 5)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(out[kept], logits[kept])
    top = logits.topk(5, dim=-1).indices
    assert kept.gather(-1, top).all()


def test_top_k_keeps_ties_at_threshold():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, False, True, True, False]]


def test_top_k_off_values_and_no_mutation():
    logits = torch.randn(2, 10)
    copy = logits.clone()
    assert torch.equal(filter_top_k(logits, 0), logits)
    assert torch.equal(filter_top_k(logits, 10), logits)
    filter_top_k(logits, 3)
    filter_top_p(logits, 0.5)
    assert torch.equal(logits, copy)


def test_top_p_mass_and_minimality():
    torch.manual_seed(1)
    logits = torch.randn(64, 100) * 2
    p = 0.8
    out = filter_top_p(logits, p)
    probs = logits.softmax(-1)
    kept = torch.isfinite(out)
    # the kept set holds at least mass p, and dropping its least likely member would go below p
    # (upstream rule: drop while cumulative mass from the bottom is <= 1 - p).
    mass = (probs * kept).sum(-1)
    assert (mass >= p - 1e-5).all()
    least = torch.where(kept, probs, torch.inf).min(-1).values
    assert (mass - least < p + 1e-5).all()
    # kept entries are exactly the most likely ones
    n = kept.sum(-1)
    for row in range(64):
        top = probs[row].topk(int(n[row])).indices
        assert kept[row, top].all()


def test_top_p_never_drops_the_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = filter_top_p(logits, 0.01)
    assert torch.isfinite(out).tolist()[0] == [True, False, False]
    assert torch.isfinite(out[1]).sum() >= 1


def test_sample_seeded_reproducible_and_seeds_differ():
    logits = torch.randn(2, 30, 256)
    g = torch.Generator().manual_seed(7)
    a = sample(logits, generator=g)
    b = sample(logits, generator=torch.Generator().manual_seed(7))
    c = sample(logits, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 30) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_respects_filters():
    logits = torch.randn(8, 40, 64)
    idx = sample(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == idx[..., None]).any(-1).all()
    greedy = sample(logits, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, logits.argmax(-1))


def test_temperature_sharpens():
    logits = torch.randn(3, 20)
    cold = filter_logits(logits, temperature=0.5)
    assert torch.allclose(cold, logits * 2)


def test_cfg_schedule_and_mix():
    assert cfg_scale(0, 6, 2.0) == 0.0
    assert cfg_scale(5, 6, 2.0) == 2.0
    assert cfg_scale(2, 6, 2.0) == pytest.approx(0.8)
    assert cfg_scale(0, 6, 2.0, "constant") == 2.0
    with pytest.raises(ValueError):
        cfg_scale(1, 6, 2.0, "cosine")
    lc, lu = torch.randn(5), torch.randn(5)
    assert torch.allclose(cfg_mix(lc, lu, 1.5), 2.5 * lc - 1.5 * lu)
    assert torch.equal(cfg_mix(lc, lu, 0.0), lc)


def test_gumbel_smoothing():
    assert gumbel_tau(0, 10) == pytest.approx(0.27)
    assert gumbel_tau(9, 10) == pytest.approx(max(0.27 * 0.05, 0.005))
    codebook = torch.randn(16, 4)
    logits = torch.randn(2, 9, 16)
    logits[..., 3] = 1e4  # one overwhelming code -> its embedding
    h = gumbel_softmax_embed(logits, codebook, si=4, num_scales=10, generator=torch.Generator().manual_seed(0))
    assert h.shape == (2, 9, 4)
    assert torch.allclose(h, codebook[3].expand_as(h), atol=1e-5)
    masked = filter_top_k(torch.randn(2, 9, 16), 2)
    h2 = gumbel_softmax_embed(masked, codebook, si=1, num_scales=10, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(h2).all()


def test_sample_per_row_is_batch_independent():
    from vargpt.generation.sampling import sample_per_row

    logits = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5, 6)]  # noqa: E731
    together = sample_per_row(logits, gens(), top_k=10)
    assert torch.equal(together[1], sample_per_row(logits[1:2], gens()[1:2], top_k=10)[0])
