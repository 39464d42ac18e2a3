"""Convolutional encoder/decoder of VAR's VQ-VAE (SPEC 1.2-1.4; LDM-style, fused-qkv attention).

Module names follow the released checkpoint (SPEC section 4, ``vae_local.encoder.*`` /
``vae_local.decoder.*``) so official weights load with ``strict=True``.

Normalisation: GroupNorm with ``norm_groups`` groups (VAR: 32), reduced for narrow layers to the
largest divisor of C that is <= C/4, so every group has at least 4 channels (VAR's widths 160, 320,
640 keep exactly 32). With one channel per group (32 groups over 32 channels) GroupNorm is instance
norm, which subtracts each channel's spatial mean and erases the flat background colour of small
synthetic images (measured: 11 dB PSNR after 60 steps). ``norm_groups=0`` replaces every norm by the
identity (no ``norm*`` parameters): on ShapesWorld, per-image statistics of flat images (background
colour, object size) vary so much that even 4-channel groups slow learning (measured at 400 steps:
19.9 dB with groups, 22.2 dB without).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def num_groups(channels: int, groups: int = 32) -> int:
    """``groups`` or fewer: the largest divisor of C that is <= min(groups, C // 4), at least 1."""
    limit = max(1, min(groups, channels // 4))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def make_norm(channels: int, groups: int = 32) -> nn.Module:
    """GroupNorm(:func:`num_groups` groups, eps 1e-6, affine), or the identity when ``groups == 0``."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups(channels, groups), channels, eps=1e-6, affine=True)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv, stride 1, padding 1, with bias."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """x -> shortcut(x) + conv2(drop(SiLU(GN(conv1(SiLU(GN(x))))))); 1x1 ``nin_shortcut`` iff in != out."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = make_norm(c_in, norm_groups)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = make_norm(c_out, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()
        # Residual branch starts at zero so every block starts as its shortcut. Our choice for training
        # from scratch (VAR's VAE init is not published; loaded weights overwrite it): the tiny
        # tokenizer reaches a given PSNR in roughly 2/3 of the steps (measured, benchmarks/tokenizer.py).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused 1x1 ``qkv`` conv (rows q, k, v) and scale C^-1/2."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = make_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), residual."""
        H, W = x_BCHW.shape[-2:]
        qkv_B3CHW = rearrange(self.qkv(self.norm(x_BCHW)), "b (n c) h w -> n b 1 (h w) c", n=3)
        # SDPA's default scale is 1/sqrt(last dim) = C^-1/2, as the reference.
        h_B1Nc = F.scaled_dot_product_attention(qkv_B3CHW[0], qkv_B3CHW[1], qkv_B3CHW[2])
        h_BCHW = rearrange(h_B1Nc, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x_BCHW + self.proj_out(h_BCHW)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then 3x3 conv with stride 2 and no padding: H -> H/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv: H -> 2H."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock (or identity) -> ResnetBlock at constant width."""

    def __init__(self, channels: int, use_attn: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups) if use_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Shape preserved."""
        return self.block_2(self.attn_1(self.block_1(x_BCHW)))


class Level(nn.Module):
    """One resolution level: res-blocks (each followed by attention where enabled), then a resampler."""

    def __init__(
        self, c_in: int, c_out: int, num_blocks: int, *, attn: bool, resample: type[nn.Module] | None,
        resample_name: str, dropout: float, norm_groups: int,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, norm_groups) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(c_out, norm_groups) for _ in range(num_blocks if attn else 0))
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample(c_out))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H', W') with H' = H/2, H or 2H."""
        for j, block in enumerate(self.block):
            x_BCHW = block(x_BCHW)
            if len(self.attn) > 0:
                x_BCHW = self.attn[j](x_BCHW)
        resample = getattr(self, self.resample_name, None)
        return resample(x_BCHW) if resample is not None else x_BCHW


class Encoder(nn.Module):
    """pixels (B, 3, H, W) in [-1, 1] -> latent (B, Z, H/2^(n-1), W/2^(n-1)), n = len(ch_mult) (SPEC 1.3)."""

    def __init__(
        self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
        use_attn: bool, dropout: float = 0.0, norm_groups: int = 32, in_channels: int = 3,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        widths_in = [ch * m for m in (1, *ch_mult[:-1])]
        self.conv_in = conv3x3(in_channels, ch)
        self.down = nn.ModuleList(
            Level(widths_in[i], ch * ch_mult[i], num_res_blocks, attn=use_attn and i == n - 1,
                  resample=Downsample if i < n - 1 else None, resample_name="downsample", dropout=dropout,
                  norm_groups=norm_groups)
            for i in range(n)
        )
        c_top = ch * ch_mult[-1]
        self.mid = MidBlock(c_top, use_attn, dropout, norm_groups)
        self.norm_out = make_norm(c_top, norm_groups)
        self.conv_out = conv3x3(c_top, z_channels)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Z, h, w)."""
        h = self.conv_in(x_B3HW)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """latent (B, Z, h, w) -> pixels (B, 3, H, W), unclamped (SPEC 1.4).

    ``up`` is indexed by level (``up.0`` = full resolution) but run from the last level down; each
    level has ``num_res_blocks + 1`` res-blocks.
    """

    def __init__(
        self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
        use_attn: bool, dropout: float = 0.0, norm_groups: int = 32, out_channels: int = 3,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        c_top = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, c_top)
        self.mid = MidBlock(c_top, use_attn, dropout, norm_groups)
        widths_in = [ch * ch_mult[i + 1] if i < n - 1 else c_top for i in range(n)]
        self.up = nn.ModuleList(
            Level(widths_in[i], ch * ch_mult[i], num_res_blocks + 1, attn=use_attn and i == n - 1,
                  resample=Upsample if i > 0 else None, resample_name="upsample", dropout=dropout,
                  norm_groups=norm_groups)
            for i in range(n)
        )
        self.norm_out = make_norm(ch * ch_mult[0], norm_groups)
        self.conv_out = conv3x3(ch * ch_mult[0], out_channels)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        """(B, Z, h, w) -> (B, 3, H, W)."""
        h = self.mid(self.conv_in(z_BZhw))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
