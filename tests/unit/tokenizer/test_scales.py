"""Pure scale-schedule helpers (SPEC 1.6-1.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vargpt.tokenizer.scales import (
    area_downsample,
    bicubic_upsample,
    phi_index_table,
    scale_ids,
    scale_offsets,
    token_counts,
)


def test_counts_offsets_ids():
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert sum(token_counts(pn)) == 680
    offsets = scale_offsets(pn)
    assert offsets[0] == (0, 1) and offsets[1] == (1, 5) and offsets[-1] == (424, 680)
    ids = scale_ids(pn)
    assert ids.dtype == torch.long and ids.shape == (680,)
    for k, (b, e) in enumerate(offsets):
        assert (ids[b:e] == k).all()
    assert scale_ids((3,)).tolist() == [0] * 9


def test_phi_table_released_model():
    assert phi_index_table(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("num_scales", [2, 3, 6, 10, 13])
@pytest.mark.parametrize("share", [0, 1, 2, 3, 4, 6])
def test_phi_table_matches_numpy_rule(num_scales, share):
    n = num_scales if share == 0 else share
    m = 1 / 3 / n if n == 4 else 1 / 2 / n
    ticks = np.linspace(m, 1 - m, n)
    want = [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]
    assert phi_index_table(num_scales, share) == want


def test_phi_table_edge_cases():
    assert phi_index_table(1, 4) == [0]
    assert phi_index_table(1, 0) == [0]
    assert phi_index_table(6, 0) == list(range(6))  # one conv per scale
    assert phi_index_table(6, 1) == [0] * 6
    with pytest.raises(ValueError):
        phi_index_table(0, 4)


@pytest.mark.parametrize("pn", [1, 2, 3, 5, 6, 8, 13, 16])
def test_area_downsample_is_mean_over_adaptive_bins(pn):
    f = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = torch.empty(2, 3, pn, pn, dtype=torch.float64)
    for i in range(pn):
        r0, r1 = (i * 16) // pn, math.ceil((i + 1) * 16 / pn)
        for j in range(pn):
            c0, c1 = (j * 16) // pn, math.ceil((j + 1) * 16 / pn)
            want[:, :, i, j] = f[:, :, r0:r1, c0:c1].mean(dim=(-1, -2))
    torch.testing.assert_close(area_downsample(f, pn), want)


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    # Keys' cubic convolution kernel at distances 1+t, t, 1-t, 2-t.
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _bicubic_1d(x: np.ndarray, out: int) -> np.ndarray:
    # Resize the last axis; align_corners=False source coordinate, edge-clamped taps.
    n = x.shape[-1]
    y = np.zeros(x.shape[:-1] + (out,))
    for o in range(out):
        src = (o + 0.5) * n / out - 0.5
        i0 = math.floor(src)
        w = _cubic_weights(src - i0)
        for tap, wt in zip(range(i0 - 1, i0 + 3), w, strict=True):
            y[..., o] += wt * x[..., min(max(tap, 0), n - 1)]
    return y


@pytest.mark.parametrize(("pn", "size"), [(1, 8), (2, 8), (3, 8), (5, 16), (13, 16)])
def test_bicubic_upsample_matches_cubic_convolution(pn, size):
    h = torch.randn(1, 2, pn, pn, dtype=torch.float64)
    rows = _bicubic_1d(h.numpy(), size)  # along w
    both = _bicubic_1d(np.swapaxes(rows, -1, -2), size)  # along h
    want = torch.from_numpy(np.swapaxes(both, -1, -2).copy())
    torch.testing.assert_close(bicubic_upsample(h, size), want)
