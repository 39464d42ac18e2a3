"""The VQGAN-style adversarial term: discriminator shapes, hinge losses, the adaptive weight, the training step."""

from __future__ import annotations

import copy

import pytest
import torch

from vargpt.training.adversarial import (
    Adversary,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
)


@pytest.mark.parametrize(("size", "layers", "side"), [(32, 3, 2), (32, 2, 6), (64, 3, 6)])
def test_discriminator_gives_one_logit_per_patch(size, layers, side):
    disc = PatchDiscriminator(channels=8, num_layers=layers, generator=torch.Generator().manual_seed(0))
    assert disc(torch.zeros(2, 3, size, size)).shape == (2, 1, side, side)


def test_discriminator_initialisation_is_seeded():
    a, b, c = (PatchDiscriminator(channels=8, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))


def test_discriminator_logits_do_not_depend_on_the_rest_of_the_batch():
    disc = PatchDiscriminator(channels=8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[:1], disc(x[:1]), rtol=1e-5, atol=1e-6)


def test_bad_discriminator_size_is_refused():
    with pytest.raises(ValueError, match="channels=0"):
        PatchDiscriminator(channels=0)


def test_hinge_losses_by_hand():
    ones = torch.ones(2, 1, 3, 3)
    assert float(hinge_d_loss(2 * ones, -2 * ones)) == 0.0  # both sides past the margin
    assert float(hinge_d_loss(0 * ones, 0 * ones)) == 1.0  # cannot tell them apart
    assert float(hinge_d_loss(-ones, ones)) == 2.0  # (2 + 2) / 2
    assert float(generator_loss(torch.tensor([1.0, 3.0]))) == -2.0


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    x = torch.tensor([0.3, -1.2])
    y = w @ x
    rec, gen = y.square().sum(), 5 * y.sum()
    got = adaptive_weight(rec, gen, w)
    g_rec = 2 * y.detach()[:, None] * x[None, :]  # d/dw of sum (w x)^2
    g_gen = 5 * torch.ones(2)[:, None] * x[None, :]
    torch.testing.assert_close(got, g_rec.norm() / (g_gen.norm() + 1e-4))
    assert not got.requires_grad
    rec.backward()  # both graphs are kept for the backward pass that follows
    assert w.grad is not None


def test_adaptive_weight_is_clamped():
    w = torch.ones(2, requires_grad=True)
    rec = (w * 1e9).sum()
    gen = (w * 0.0).sum() + 0 * w.sum()
    assert float(adaptive_weight(rec, gen, w)) == 1e4


def test_adversary_steps_train_the_discriminator_and_not_from_the_generator_term():
    torch.manual_seed(0)
    adv = Adversary(weight=0.5, adaptive=False, channels=8, num_layers=2, lr=1e-2, seed=0)
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    decoder_w = torch.zeros(3, requires_grad=True)
    fake = torch.zeros(8, 3, 32, 32) + decoder_w[None, :, None, None]  # a "decoder" whose output is flat
    term, logs = adv.generator_term(fake, fake.square().mean(), decoder_w)
    assert logs["adv_weight"] == 0.5
    term.backward()
    assert decoder_w.grad is not None and decoder_w.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.disc.parameters())  # the tokenizer's loss trains no discriminator
    assert all(p.requires_grad for p in adv.disc.parameters())
    losses = [adv.discriminator_step(real, fake) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]  # it learns to tell flat grey from noise


def test_adversary_state_round_trips():
    a = Adversary(weight=1.0, adaptive=True, channels=8, num_layers=2, lr=1e-3, seed=0)
    real, fake = torch.rand(4, 3, 32, 32), torch.zeros(4, 3, 32, 32)
    a.discriminator_step(real, fake)
    b = Adversary(weight=1.0, adaptive=True, channels=8, num_layers=2, lr=1e-3, seed=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as saved to and read from trainer_state.pt
    a.discriminator_step(real, fake)
    b.discriminator_step(real, fake)
    for (k, va), vb in zip(a.disc.state_dict().items(), b.disc.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
