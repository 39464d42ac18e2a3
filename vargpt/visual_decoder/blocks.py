"""Building blocks of the VAR transformer (SPEC sections 2.4-2.7).

Parameter names mirror the upstream state dict (SPEC section 4, ``vargpt_gen.blocks.{i}.*``) so that
checkpoints load without a key map: ``attn.{mat_qkv,q_bias,v_bias,zero_k_bias,scale_mul_1H11,proj}``,
``ffn.{fc1,fc2}``, ``ada_lin.1`` (index 1 because index 0 is the SiLU) and ``head_nm.ada_lin.1``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from vargpt.generation.cache import KVCache

# SPEC 2.5: the learnable per-head logit scale starts at 4 and is clamped at 100 (upstream VAR values).
_SCALE_MUL_INIT = math.log(4.0)
_SCALE_MUL_MAX = math.log(100.0)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p`` (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask_B = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask_B / keep


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path` (identity in eval mode or at rate 0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply stochastic depth to a residual branch ``x`` (any shape, batch first)."""
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def apply_rope(x_BHLc: torch.Tensor, cos_Lc: torch.Tensor, sin_Lc: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + c/2) of ``x`` by per-token angles whose cos/sin are given (RoPE,
    "rotate half" layout); ``cos_Lc`` / ``sin_Lc`` hold each pair's value on both of its channels, (L, c)."""
    x1, x2 = x_BHLc.chunk(2, dim=-1)
    return x_BHLc * cos_Lc + torch.cat((-x2, x1), dim=-1) * sin_Lc


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's cosine attention (SPEC 2.5).

    ``mat_qkv`` has no bias parameter; the bias used is concat(``q_bias``, ``zero_k_bias``, ``v_bias``)
    (keys never get a bias). With ``l2_norm`` q and k are L2-normalised per head and q is multiplied by
    exp(min(``scale_mul_1H11``, ln 100)); the softmax scale is then 1, so logits = sigma_h * cos(q_i, k_j).
    """

    def __init__(self, width: int, num_heads: int, *, l2_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.l2_norm = l2_norm
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), _SCALE_MUL_INIT))
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x_BLC: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend over ``x_BLC`` (plus any cached tokens).

        Args:
            x_BLC: normalised block input (B, L, C); L may be one scale's l tokens at inference.
            attn_bias: additive bias broadcastable to (B, H, L, L_total), e.g. the block-causal bias_LL;
                None = every query sees every key (correct per scale when a cache is used).
            cache: this block's KV cache; the new keys/values are appended and attention runs over all.
            rope: (cos_Lc, sin_Lc) of these L tokens: rotary position angles applied to q and k after the
                L2 normalisation (a rotation keeps the cosine form), so cached keys are stored rotated.

        Returns:
            out_BLC.
        """
        bias_3C = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BLC3 = F.linear(x_BLC, self.mat_qkv.weight, bias_3C)
        q, k, v = rearrange(qkv_BLC3, "b l (three h c) -> three b h l c", three=3, h=self.num_heads)
        if self.l2_norm:
            scale_1H11 = self.scale_mul_1H11.clamp(max=_SCALE_MUL_MAX).exp()
            q = F.normalize(q, dim=-1) * scale_1H11
            k = F.normalize(k, dim=-1)
            softmax_scale = 1.0
        else:
            # Upstream's unused non-cosine variant (VAR models/basic_var.py): 0.25 / sqrt(head_dim).
            softmax_scale = 0.25 / math.sqrt(self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)
        out_BHLc = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=softmax_scale)
        return self.proj(rearrange(out_BHLc, "b h l c -> b l (h c)"))


class FFN(nn.Module):
    """fc1 -> GELU (tanh approximation, SPEC 2.6) -> fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, C)."""
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """AdaLN transformer block (SPEC 2.4, non-shared variant).

    ``ada_lin(cond)`` (SiLU -> Linear(C, 6C)) is split, in this order, into gamma1, gamma2, scale1,
    scale2, shift1, shift2 (not DiT's order), and with LN = LayerNorm(C, no affine)::

        x <- x + DropPath(gamma1 * Attn(LN(x) * (1 + scale1) + shift1))
        x <- x + DropPath(gamma2 * FFN(LN(x) * (1 + scale2) + shift2))
    """

    def __init__(
        self, width: int, num_heads: int, mlp_hidden: int, *, l2_norm: bool = True,
        norm_eps: float = 1e-6, drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(width, num_heads, l2_norm=l2_norm)
        self.ffn = FFN(width, mlp_hidden)
        self.ln = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path_rate)

    def modulation(self, cond_BC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C), from ``cond_BC``."""
        return rearrange(self.ada_lin(cond_BC), "b (six c) -> six b 1 c", six=6).unbind(0)

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BC: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One block over ``x_BLC`` (B, L, C) conditioned on ``cond_BC`` (B, C); returns (B, L, C)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BC)
        h_BLC = self.attn(self.ln(x_BLC) * (1 + scale1) + shift1, attn_bias=attn_bias, cache=cache, rope=rope)
        x_BLC = x_BLC + self.drop_path(h_BLC * gamma1)
        h_BLC = self.ffn(self.ln(x_BLC) * (1 + scale2) + shift2)
        return x_BLC + self.drop_path(h_BLC * gamma2)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the head (SPEC 2.7): ``ada_lin`` rows [0:C] = scale, [C:2C] = shift."""

    def __init__(self, width: int, *, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift; (B, L, C) -> (B, L, C)."""
        scale_B1C, shift_B1C = rearrange(self.ada_lin(cond_BC), "b (two c) -> two b 1 c", two=2).unbind(0)
        return self.ln(x_BLC) * (1 + scale_B1C) + shift_B1C
