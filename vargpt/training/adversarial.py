"""Adversarial (VQGAN-style) term for tokenizer training: a patch discriminator, hinge losses, adaptive weight.

A pixel loss alone makes an autoencoder draw the mean of what its codes leave open, which on natural images
is blur; VQGAN's remedy, which VAR's tokenizer was trained with (its paper: L2 + perceptual + GAN; the losses
are not in its code), adds a discriminator that judges overlapping patches of real and reconstructed images:

* :class:`PatchDiscriminator`: strided 4x4 convolutions (pix2pix's PatchGAN layout) giving one real/fake
  logit per patch; GroupNorm instead of BatchNorm, so a logit does not depend on the other images of the
  batch and a resumed run repeats the uninterrupted one exactly.
* :func:`hinge_d_loss` / :func:`generator_loss`: the hinge pair of VQGAN.
* :func:`adaptive_weight`: VQGAN's balance, ``||grad_W rec|| / (||grad_W gen|| + 1e-4)`` at the decoder's
  last layer ``W``, clamped to ``[0, 1e4]`` and detached, so the adversarial gradient reaching the decoder
  has the reconstruction gradient's size whatever the losses' scales.
* :class:`Adversary`: the discriminator with its optimiser and the steps the tokenizer trainer calls.

Off in every preset (``TokenizerRecipe.adv_weight = 0``): on 32 px ShapesWorld in the tiny recipe's few
minutes it made reconstructions worse (README, tokenizer options). It is there for tokenizers trained on
natural images at real scale, where blur is what a pixel loss leaves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.training.optim import fused_supported

__all__ = ["Adversary", "PatchDiscriminator", "adaptive_weight", "generator_loss", "hinge_d_loss"]

_MAX_ADAPTIVE_WEIGHT = 1e4
"""VQGAN's clamp of the adaptive weight."""


def _group_count(channels: int) -> int:
    """The largest of 32, 16, ..., 1 that divides ``channels``."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """Real/fake logits per patch: (B, 3, H, W) in [-1, 1] -> (B, 1, h, w).

    ``num_layers`` stride-2 4x4 convolutions (widths ``channels * 2^i``, at most 8x), then a stride-1 4x4
    convolution and a 4x4 convolution to one channel; each hidden convolution but the first is followed by
    GroupNorm, all by LeakyReLU(0.2). Each logit sees a 70 px patch of the input at 3 layers.
    Weights are drawn from N(0, 0.02) (norm gains N(1, 0.02)) with ``generator``, as pix2pix.
    """

    def __init__(self, *, in_channels: int = 3, channels: int = 64, num_layers: int = 3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if channels < 1 or num_layers < 1:
            raise ValueError(f"PatchDiscriminator(channels={channels}, num_layers={num_layers}): both must be >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(_group_count(c_out), c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.normal_(0.0, 0.02, generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.GroupNorm):
                    m.weight.normal_(1.0, 0.02, generator=generator)
                    m.bias.zero_()

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w); h = H / 2^(num_layers) - 2, so H must be at least 3 * 2^num_layers."""
        return self.main(x_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``: 0 once every real patch
    scores >= 1 and every fake one <= -1, 1 when it cannot tell them apart (all logits 0)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (here: the tokenizer's) adversarial loss, ``-mean(logits on its reconstructions)``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_weight: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight ``||d rec / d W|| / (||d gen / d W|| + 1e-4)``, clamped to [0, 1e4], detached.

    ``W`` is the decoder's last layer; both losses must still hold their graphs (they are kept for the
    backward pass that follows).
    """
    (g_rec,) = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)
    (g_gen,) = torch.autograd.grad(gen_loss, last_weight, retain_graph=True)
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0.0, _MAX_ADAPTIVE_WEIGHT).detach()


class Adversary:
    """The discriminator, its Adam optimiser (betas 0.5 / 0.9, constant lr, as VQGAN) and the two terms.

    Args:
        weight: the adversarial term's weight (multiplies the adaptive weight when ``adaptive``).
        adaptive: balance the term with :func:`adaptive_weight` (else ``weight`` alone).
        channels, num_layers: :class:`PatchDiscriminator`'s size.
        lr: the discriminator's learning rate.
        seed: seed of the discriminator's initialisation.
    """

    def __init__(self, *, weight: float, adaptive: bool, channels: int, num_layers: int, lr: float,
                 seed: int) -> None:
        self.weight, self.adaptive = weight, adaptive
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own init draws from the global generator
            self.disc = PatchDiscriminator(channels=channels, num_layers=num_layers,
                                           generator=torch.Generator().manual_seed(seed))
        self.disc.to(memory_format=torch.channels_last)
        params = list(self.disc.parameters())
        self.opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), fused=fused_supported([{"params": params}]))

    def generator_term(self, recon_B3HW: torch.Tensor, rec_loss: torch.Tensor,
                       last_weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``(w * generator_loss, logs)`` for reconstructions still attached to the tokenizer's graph.

        The discriminator's parameters get no gradient from this term (it is the tokenizer's loss).
        """
        self.disc.requires_grad_(False)
        try:
            gen = generator_loss(self.disc(recon_B3HW))
        finally:
            self.disc.requires_grad_(True)
        w = self.weight * adaptive_weight(rec_loss, gen, last_weight) if self.adaptive else self.weight
        return w * gen, {"g_loss": float(gen.detach()), "adv_weight": float(w)}

    def discriminator_step(self, real_B3HW: torch.Tensor, fake_B3HW: torch.Tensor) -> float:
        """One optimiser step of the discriminator on real images and (detached) reconstructions -> its loss."""
        loss = hinge_d_loss(self.disc(real_B3HW), self.disc(fake_B3HW.detach()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """Discriminator weights and optimiser state (saved in the tokenizer's ``trainer_state.pt``)."""
        return {"disc": self.disc.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["optimizer"])
