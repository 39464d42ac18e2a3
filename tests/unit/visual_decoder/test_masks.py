"""Block-causal bias over scales (SPEC 2.3)."""

from __future__ import annotations

import torch

from vargpt.visual_decoder.masks import block_causal_bias


def test_small_schedule_by_hand():
    # scales (1, 2): token 0 is scale 0, tokens 1..4 are scale 1.
    bias = block_causal_bias((1, 2))
    allowed = bias == 0
    assert bias.shape == (5, 5)
    assert allowed[0].tolist() == [True, False, False, False, False]
    for i in range(1, 5):
        assert allowed[i].tolist() == [True] * 5
    assert torch.isneginf(bias[~allowed]).all()


def test_rule_d_j_le_d_i_and_dtype():
    patch_nums = (1, 2, 3, 4, 6, 8)
    bias = block_causal_bias(patch_nums, dtype=torch.float64)
    assert bias.dtype == torch.float64
    d = torch.repeat_interleave(torch.arange(len(patch_nums)), torch.tensor([p * p for p in patch_nums]))
    expect = d[None, :] <= d[:, None]
    assert torch.equal(bias == 0, expect)
    # Every row keeps at least its own scale visible, so softmax never sees an all -inf row.
    assert (bias == 0).any(dim=1).all()
    assert torch.isfinite(bias.softmax(dim=-1)).all()


def test_upstream_begin_ends_blocks():
    # SPEC 2.3: the default 10-scale schedule; token 5 is the first of scale 2 (begin_ends (5, 14)).
    bias = block_causal_bias((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert bias.shape == (680, 680)
    assert (bias[5, :14] == 0).all() and torch.isneginf(bias[5, 14:]).all()
    assert (bias[679] == 0).all()
