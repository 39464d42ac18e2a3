"""Multi-scale residual quantizer: exact agreement of every path through f_hat (SPEC 1.7-1.10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vargpt.tokenizer.quantizer import MultiScaleQuantizer, usage_fraction

PATCH_NUMS = [(1, 2, 3, 4, 6, 8), (1, 2, 4), (2, 3, 5), (4,), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]


def make(patch_nums, share=4, V=64, Z=8):
    torch.manual_seed(0)
    q = MultiScaleQuantizer(vocab_size=V, z_channels=Z, patch_nums=patch_nums, share_quant_resi=share)
    torch.nn.init.normal_(q.embedding.weight)  # codes on the scale of f, so many of them get used
    return q


@pytest.mark.parametrize("patch_nums", PATCH_NUMS)
def test_round_trip_shapes_and_exact_fhat(patch_nums):
    q = make(patch_nums)
    s = patch_nums[-1]
    f = torch.randn(3, 8, s, s)
    idx_list, partials = q.f_to_idx_and_fhat(f)
    assert [tuple(i.shape) for i in idx_list] == [(3, pn * pn) for pn in patch_nums]
    assert all(i.dtype == torch.long and int(i.max()) < 64 for i in idx_list)
    assert torch.equal(torch.stack(q.idx_to_fhat(idx_list, partials=True)), torch.stack(partials))
    assert torch.equal(q.idx_to_fhat(q.f_to_idx(f)), partials[-1])
    assert q.idx_to_fhat(idx_list).shape == (3, 8, s, s)


def _spec_loop(q, f):
    # SPEC 1.7 written out directly with F.interpolate.
    S, s = len(q.patch_nums), q.patch_nums[-1]
    rest, f_hat, idx_list = f.clone(), torch.zeros_like(f), []
    for k, pn in enumerate(q.patch_nums):
        z = F.interpolate(rest, size=(pn, pn), mode="area") if k < S - 1 else rest
        z_NZ = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(z_NZ.double(), q.embedding.weight.double()).argmin(1)
        e = q.embedding.weight[idx].reshape(f.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        if k < S - 1:
            e = F.interpolate(e, size=(s, s), mode="bicubic", align_corners=False)
        conv = q.quant_resi.qresi_ls[q.phi_table[k]]
        h = 0.5 * e + 0.5 * conv(e)
        f_hat, rest = f_hat + h, rest - h
        idx_list.append(idx.reshape(f.shape[0], -1))
    return idx_list, f_hat


@pytest.mark.parametrize("patch_nums", PATCH_NUMS[:3])
def test_matches_spec_loop(patch_nums):
    q = make(patch_nums)
    f = torch.randn(2, 8, patch_nums[-1], patch_nums[-1])
    with torch.no_grad():
        idx_ref, f_hat_ref = _spec_loop(q, f)
    idx_list, partials = q.f_to_idx_and_fhat(f)
    for a, b in zip(idx_list, idx_ref, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(partials[-1], f_hat_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch_nums", PATCH_NUMS)
def test_teacher_forcing_equals_step_by_step(patch_nums):
    q = make(patch_nums)
    B, s = 2, patch_nums[-1]
    idx_list = q.f_to_idx(torch.randn(B, 8, s, s))
    with torch.no_grad():
        x_BlZ = q.teacher_forcing_input(idx_list)
        L = sum(pn * pn for pn in patch_nums)
        assert x_BlZ.shape == (B, L - patch_nums[0] ** 2, 8)
        f_hat, steps = torch.zeros(B, 8, s, s), []
        for si, pn in enumerate(patch_nums):
            f_hat_new, nxt = q.next_scale_input(si, f_hat, q.embed(idx_list[si], pn))
            assert f_hat_new is not f_hat
            f_hat = f_hat_new
            if si < len(patch_nums) - 1:
                assert nxt.shape == (B, patch_nums[si + 1] ** 2, 8)
                steps.append(nxt)
            else:
                assert nxt is None
    assert torch.equal(x_BlZ, torch.cat(steps, 1) if steps else x_BlZ)
    assert torch.equal(f_hat, q.idx_to_fhat(idx_list))


def test_teacher_forcing_block_is_area_of_partial_fhat():
    q = make((1, 2, 3, 4, 6, 8))
    idx_list = q.f_to_idx(torch.randn(2, 8, 8, 8))
    with torch.no_grad():
        x_BlZ = q.teacher_forcing_input(idx_list)
        partials = q.idx_to_fhat(idx_list, partials=True)
    want = F.interpolate(partials[2], size=(4, 4), mode="area").flatten(2).transpose(1, 2)
    assert torch.equal(x_BlZ[:, 4 + 9:4 + 9 + 16], want)


def test_next_scale_input_does_not_mutate():
    q = make((1, 2, 4))
    f_hat = torch.zeros(1, 8, 4, 4)
    before = f_hat.clone()
    q.next_scale_input(0, f_hat, q.embed(torch.zeros(1, 1, dtype=torch.long), 1))
    assert torch.equal(f_hat, before)


def test_forward_loss_and_straight_through():
    q = make((1, 2, 3, 4))
    f = torch.randn(2, 8, 4, 4, requires_grad=True)
    f_hat_st, hits_SV, vq_loss = q(f)
    partials = q.f_to_idx_and_fhat(f.detach())[1]
    torch.testing.assert_close(f_hat_st, partials[-1])  # value = f_hat, up to the st rounding
    want = sum(1.25 * F.mse_loss(p, f.detach()) for p in partials) / 4
    torch.testing.assert_close(vq_loss, want)
    assert hits_SV.shape == (4, 64) and hits_SV.sum(1).tolist() == [2.0, 8.0, 18.0, 32.0]
    # Straight-through: d(sum f_hat_st)/df is the identity; the codebook is trained by vq_loss.
    (g,) = torch.autograd.grad(f_hat_st.sum(), f, retain_graph=True)
    assert torch.equal(g, torch.ones_like(f))
    vq_loss.backward()
    assert q.embedding.weight.grad is not None and q.quant_resi.qresi_ls[0].weight.grad is not None
    # The encoder-side gradient is beta * d MSE(sg(f_hat_k), f) only.
    want_g = sum(0.25 * 2 * (f.detach() - p) / f.numel() for p in partials) / 4
    torch.testing.assert_close(f.grad, want_g)


def test_usage_ema_and_fraction():
    q = make((1, 2))
    q.train()
    _, hits_SV, _ = q(torch.randn(4, 8, 2, 2))
    assert torch.allclose(q.ema_vocab_hit_SV.sum(1), torch.ones(2))
    overall, per_scale = usage_fraction(hits_SV)
    assert 0 < overall <= 1 and len(per_scale) == 2
    q.eval()
    ema = q.ema_vocab_hit_SV.clone()
    q(torch.randn(4, 8, 2, 2))
    assert torch.equal(q.ema_vocab_hit_SV, ema)


def test_restart_codes_uses_residual_vectors():
    q = make((1, 2, 4), V=16)
    f = torch.randn(3, 8, 4, 4)
    pool = q.residual_inputs(f)
    assert pool.shape == (3 * (1 + 4 + 16), 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    keep = q.embedding.weight[~dead].clone()
    n = q.restart_codes_(dead, f, generator=torch.Generator().manual_seed(0))
    assert n == 3
    assert torch.equal(q.embedding.weight[~dead], keep)
    for row in q.embedding.weight[dead]:
        assert (pool == row).all(1).any()
    assert q.restart_codes_(torch.zeros(16, dtype=torch.bool), f) == 0


def test_bad_token_maps_raise():
    q = make((1, 2, 4))
    with pytest.raises(ValueError, match="need 3"):
        q.idx_to_fhat([torch.zeros(1, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match="pn=2"):
        q.idx_to_fhat([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                       torch.zeros(1, 16, dtype=torch.long)])
