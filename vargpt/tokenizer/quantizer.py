"""Multi-scale residual vector quantizer (VAR's ``VectorQuantizer2``, SPEC 1.6-1.10).

An encoder map ``f`` (B, Z, h, w) is explained coarse to fine: at scale k the residual is area-resized
to ``pn_k x pn_k``, snapped to the nearest codebook vectors, upsampled back bicubically, refined by a
shared residual conv phi, added to the running reconstruction ``f_hat`` and subtracted from the
residual. The visual decoder predicts the codes of scale k from ``f_hat`` resized to ``pn_k``
(:meth:`MultiScaleQuantizer.teacher_forcing_input` / :meth:`MultiScaleQuantizer.next_scale_input`).

Every path (training forward, tokenization, decoding from indices, teacher forcing, step-by-step
generation) accumulates ``f_hat`` with the same operations in the same order, so they agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vargpt.config import VQVAEConfig
from vargpt.tokenizer.scales import (
    area_downsample,
    bicubic_upsample,
    num_phi_convs,
    phi_index_table,
)

# VAR's EMA rate of the per-scale code-usage statistics (``ema_vocab_hit_SV``).
_USAGE_EMA = 0.99


class PhiConvs(nn.Module):
    """The phi residual convs: ``phi_j(h) = (1 - r) h + r conv_j(h)`` (SPEC 1.6)."""

    def __init__(self, z_channels: int, count: int, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.qresi_ls = nn.ModuleList(
            nn.Conv2d(z_channels, z_channels, kernel_size=3, padding=1) for _ in range(count)
        )

    def forward(self, h_BZhw: torch.Tensor, j: int) -> torch.Tensor:
        """Apply phi_j; shape preserved."""
        return h_BZhw.mul(1 - self.ratio) + self.qresi_ls[j](h_BZhw).mul_(self.ratio)


class MultiScaleQuantizer(nn.Module):
    """Codebook ``embedding`` (V, Z) + phi convs over the scales ``patch_nums``.

    Shapes: B batch, Z code dim, V vocab, S scales, h = w = ``patch_nums[-1]`` (latent side),
    l = pn^2 tokens of one scale, L = sum of l.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        z_channels: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.z_channels = z_channels
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.phi_table = phi_index_table(len(self.patch_nums), share_quant_resi)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        count = num_phi_convs(len(self.patch_nums), share_quant_resi)
        self.quant_resi = PhiConvs(z_channels, count, abs(quant_resi))
        # Statistics only (EMA of how often each code is hit at each scale); never used by the math.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))

    @classmethod
    def from_config(cls, cfg: VQVAEConfig) -> MultiScaleQuantizer:
        """Build from the VQ-VAE config."""
        return cls(
            vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, patch_nums=cfg.patch_nums,
            beta=cfg.beta, quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi,
        )

    @property
    def num_scales(self) -> int:
        """Number of scales S."""
        return len(self.patch_nums)

    @property
    def latent_size(self) -> int:
        """Side of f / f_hat (the last scale)."""
        return self.patch_nums[-1]

    # ---- single-scale building blocks -------------------------------------------------------------
    def nearest_code(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2, first index on ties) at every position -> (B, h*w)."""
        z_NZ = rearrange(z_BZhw, "b z h w -> (b h w) z")
        e_VZ = self.embedding.weight.detach()
        dist_NV = z_NZ.square().sum(1, keepdim=True) + e_VZ.square().sum(1) - 2 * (z_NZ @ e_VZ.T)
        return rearrange(dist_NV.argmin(1), "(b l) -> b l", b=z_BZhw.shape[0])

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Code vectors of a row-major token map: (B, pn*pn) -> h_BZhw (B, Z, pn, pn)."""
        return rearrange(self.embedding(idx_Bl), "b (h w) z -> b z h w", h=pn, w=pn)

    def _lift(self, si: int, h_BZhw: torch.Tensor) -> torch.Tensor:
        """Scale si's code map -> its contribution to f_hat: phi_j(bicubic(h)) (no resize at the last)."""
        if si < self.num_scales - 1:
            h_BZhw = bicubic_upsample(h_BZhw, self.latent_size)
        return self.quant_resi(h_BZhw, self.phi_table[si])

    def _residual_input(self, si: int, rest_BZhw: torch.Tensor) -> torch.Tensor:
        """The residual as seen by scale si (area-resized, except at the last scale)."""
        if si < self.num_scales - 1:
            return area_downsample(rest_BZhw, self.patch_nums[si])
        return rest_BZhw

    # ---- image side -> tokens ---------------------------------------------------------------------
    def forward(self, f_BZhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward (SPEC 1.10).

        Args:
            f_BZhw: encoder output (after quant_conv), (B, Z, h, w) with h = w = ``patch_nums[-1]``.

        Returns:
            f_hat_st_BZhw: straight-through reconstruction ``sg(f_hat - f) + f``.
            hits_SV: float counts of how often each code was chosen at each scale in this batch
                (sum over processes before turning into usage fractions).
            vq_loss: ``(1/S) sum_k [beta * MSE(sg(f_hat_k), f) + MSE(f_hat_k, sg(f))]`` over the
                partial reconstructions f_hat_k.
        """
        f_nograd = f_BZhw.detach()
        rest_BZhw = f_nograd.clone()
        f_hat_BZhw = torch.zeros_like(f_nograd)
        hits_SV = f_nograd.new_zeros(self.num_scales, self.vocab_size)
        vq_loss = f_nograd.new_zeros(())
        for si, pn in enumerate(self.patch_nums):
            with torch.no_grad():
                idx_Bl = self.nearest_code(self._residual_input(si, rest_BZhw))
            hits_SV[si] = torch.bincount(idx_Bl.flatten(), minlength=self.vocab_size).float()
            h_BZhw = self._lift(si, self.embed(idx_Bl, pn))
            f_hat_BZhw = f_hat_BZhw + h_BZhw
            rest_BZhw = rest_BZhw - h_BZhw.detach()
            vq_loss = vq_loss + self.beta * F.mse_loss(f_hat_BZhw.detach(), f_BZhw) \
                + F.mse_loss(f_hat_BZhw, f_nograd)
        if self.training:
            self._update_usage_ema_(hits_SV)
        f_hat_st_BZhw = (f_hat_BZhw.detach() - f_nograd) + f_BZhw
        return f_hat_st_BZhw, hits_SV, vq_loss / self.num_scales

    @torch.no_grad()
    def _update_usage_ema_(self, hits_SV: torch.Tensor) -> None:
        frac_SV = hits_SV / hits_SV.sum(1, keepdim=True).clamp_min(1)
        if not self.ema_vocab_hit_SV.any():
            self.ema_vocab_hit_SV.copy_(frac_SV)
        else:
            self.ema_vocab_hit_SV.mul_(_USAGE_EMA).add_(frac_SV, alpha=1 - _USAGE_EMA)

    @torch.no_grad()
    def f_to_idx(self, f_BZhw: torch.Tensor) -> list[torch.Tensor]:
        """Tokenize an encoder map (SPEC 1.7) -> one ``idx_Bl`` (B, pn_k^2) LongTensor per scale."""
        return self._tokenize(f_BZhw)[0]

    @torch.no_grad()
    def f_to_idx_and_fhat(self, f_BZhw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Tokenize and also return the partial reconstructions ``f_hat_k`` (B, Z, h, w) after each scale."""
        return self._tokenize(f_BZhw)

    def _tokenize(self, f_BZhw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rest_BZhw = f_BZhw.detach().clone()
        f_hat_BZhw = torch.zeros_like(rest_BZhw)
        idx_list, partials = [], []
        for si, pn in enumerate(self.patch_nums):
            idx_Bl = self.nearest_code(self._residual_input(si, rest_BZhw))
            h_BZhw = self._lift(si, self.embed(idx_Bl, pn))
            f_hat_BZhw = f_hat_BZhw + h_BZhw
            rest_BZhw = rest_BZhw - h_BZhw
            idx_list.append(idx_Bl)
            partials.append(f_hat_BZhw)
        return idx_list, partials

    # ---- tokens -> latent -------------------------------------------------------------------------
    def idx_to_fhat(
        self, idx_list: Sequence[torch.Tensor], *, partials: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Accumulate ``f_hat = sum_k phi(up(e[idx_k]))`` (SPEC 1.9 ``embed_to_fhat``).

        Args:
            idx_list: one (B, pn_k^2) LongTensor per scale, all S scales.
            partials: return every partial f_hat_k instead of only the final one.

        Returns:
            f_hat_BZhw (B, Z, h, w), or a list of S such tensors.
        """
        self._check_scales(idx_list, self.num_scales)
        f_hat_BZhw = self._zeros_fhat(idx_list[0].shape[0])
        out = []
        for si, (pn, idx_Bl) in enumerate(zip(self.patch_nums, idx_list, strict=True)):
            f_hat_BZhw = f_hat_BZhw + self._lift(si, self.embed(idx_Bl, pn))
            out.append(f_hat_BZhw)
        return out if partials else f_hat_BZhw

    def teacher_forcing_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoder inputs for scales 1..S-1 from ground-truth codes (SPEC 1.8).

        Args:
            idx_list: one (B, pn_k^2) LongTensor per scale (only the first S-1 are read).

        Returns:
            x_BlZ: (B, L - pn_0^2, Z); the block of scale k+1 is ``area(f_hat_k, pn_{k+1})``
            flattened row-major, where f_hat_k accumulates scales 0..k.
        """
        self._check_scales(idx_list, self.num_scales - 1)
        B = idx_list[0].shape[0]
        f_hat_BZhw = self._zeros_fhat(B)
        chunks = []
        for si in range(self.num_scales - 1):
            h_BZhw = self.embed(idx_list[si], self.patch_nums[si])
            f_hat_BZhw, next_BlZ = self.next_scale_input(si, f_hat_BZhw, h_BZhw)
            chunks.append(next_BlZ)
        if not chunks:
            return f_hat_BZhw.new_zeros(B, 0, self.z_channels)
        return torch.cat(chunks, dim=1)

    def next_scale_input(
        self, si: int, f_hat_BZhw: torch.Tensor, h_BZhw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One generation step (SPEC 1.9 ``get_next_autoregressive_input``), without mutation.

        Args:
            si: index of the scale whose codes were just chosen.
            f_hat_BZhw: running reconstruction before scale si, (B, Z, h, w) (zeros before scale 0).
            h_BZhw: code vectors of scale si, (B, Z, pn_si, pn_si) (see :meth:`embed`).

        Returns:
            (new f_hat_BZhw, next_BlZ): next_BlZ is ``area(f_hat, pn_{si+1})`` as (B, pn_{si+1}^2, Z),
            or None after the last scale.
        """
        f_hat_BZhw = f_hat_BZhw + self._lift(si, h_BZhw)
        if si == self.num_scales - 1:
            return f_hat_BZhw, None
        nxt_BZhw = area_downsample(f_hat_BZhw, self.patch_nums[si + 1])
        return f_hat_BZhw, rearrange(nxt_BZhw, "b z h w -> b (h w) z")

    # ---- codebook maintenance (called by the trainer) ---------------------------------------------
    @torch.no_grad()
    def residual_inputs(self, f_BZhw: torch.Tensor) -> torch.Tensor:
        """Every vector the codebook was compared with when tokenizing f: (N, Z), N = B * L."""
        rest_BZhw = f_BZhw.detach().clone()
        vecs = []
        for si, pn in enumerate(self.patch_nums):
            z_BZhw = self._residual_input(si, rest_BZhw)
            vecs.append(rearrange(z_BZhw, "b z h w -> (b h w) z"))
            rest_BZhw = rest_BZhw - self._lift(si, self.embed(self.nearest_code(z_BZhw), pn))
        return torch.cat(vecs)

    @torch.no_grad()
    def restart_codes_(
        self, dead_V: torch.Tensor, f_BZhw: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> int:
        """Re-initialise the codes marked in ``dead_V`` (bool, (V,)) from random residual vectors.

        Remedy against codebook collapse (our addition; VAR's training recipe is not public): a code
        nobody picks gets no gradient and stays dead, so it is moved onto a vector the quantizer
        actually has to explain (one of :meth:`residual_inputs` of the current batch). Calling it
        with every code marked dead is a data-dependent codebook initialisation. Returns the number
        of codes replaced.
        """
        dead = dead_V.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pool_NZ = self.residual_inputs(f_BZhw)
        pick = torch.randint(pool_NZ.shape[0], (dead.numel(),), generator=generator)
        self.embedding.weight[dead] = pool_NZ[pick].to(self.embedding.weight.dtype)
        return int(dead.numel())

    # ---- helpers ----------------------------------------------------------------------------------
    def _zeros_fhat(self, B: int) -> torch.Tensor:
        w = self.embedding.weight
        return w.new_zeros(B, self.z_channels, self.latent_size, self.latent_size)

    def _check_scales(self, idx_list: Sequence[torch.Tensor], need: int) -> None:
        if len(idx_list) < need:
            raise ValueError(f"got {len(idx_list)} token maps, need {need} (patch_nums={self.patch_nums})")
        for pn, idx_Bl in zip(self.patch_nums, idx_list, strict=False):
            if idx_Bl.ndim != 2 or idx_Bl.shape[1] != pn * pn:
                raise ValueError(f"token map of scale pn={pn} must be (B, {pn * pn}), got {tuple(idx_Bl.shape)}")


def usage_fraction(hits_SV: torch.Tensor) -> tuple[float, list[float]]:
    """Fraction of the vocabulary used overall and at each scale, from hit counts (S, V)."""
    overall = float((hits_SV.sum(0) > 0).float().mean())
    return overall, [float(v) for v in (hits_SV > 0).float().mean(1)]
