"""The multi-scale VQ-VAE tokenizer: images <-> per-scale code maps (SPEC section 1).

    >>> vae = MultiScaleVQVAE(VARGPTConfig.from_name("tiny").vqvae)
    >>> idx_list = vae.encode(images_B3HW)          # [idx_Bl] per scale, l = pn_k^2
    >>> images = vae.decode(idx_list)               # (B, 3, H, W) in [-1, 1]

Parameter names equal the ``vae_local.*`` keys of the released VARGPT checkpoint minus the prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vargpt.config import VQVAEConfig
from vargpt.tokenizer.autoencoder import Decoder, Encoder
from vargpt.tokenizer.quantizer import MultiScaleQuantizer


def vqvae_config_from_dict(data: dict[str, Any]) -> VQVAEConfig:
    """Inverse of ``dataclasses.asdict`` / JSON for :class:`VQVAEConfig` (lists become tuples).

    Also accepts a whole VARGPT config dict (its ``vqvae`` entry is used).
    """
    if "vqvae" in data and isinstance(data["vqvae"], dict):
        data = data["vqvae"]
    names = {f.name for f in dataclasses.fields(VQVAEConfig)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"VQVAEConfig: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    return VQVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def norm_groups(cfg: VQVAEConfig) -> int:
    """GroupNorm groups of the encoder/decoder: ``cfg.norm_groups`` (0 = no norm; VAR: 32)."""
    return int(cfg.norm_groups)


class MultiScaleVQVAE(nn.Module):
    """Encoder + quant_conv + multi-scale quantizer + post_quant_conv + decoder (SPEC 1.1-1.10)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                    z_channels=cfg.z_channels, use_attn=cfg.use_attn, dropout=cfg.dropout,
                    norm_groups=norm_groups(cfg))
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer.from_config(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, padding=1)

    # ---- pieces -----------------------------------------------------------------------------------
    def encode_f(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent f = quant_conv(encoder(x)): (B, 3, H, W) in [-1, 1] -> (B, Z, h, w)."""
        return self.quant_conv(self.encoder(images_B3HW))

    def fhat_to_img(self, f_hat_BZhw: torch.Tensor) -> torch.Tensor:
        """decoder(post_quant_conv(f_hat)) clamped to [-1, 1]: (B, Z, h, w) -> (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(f_hat_BZhw)).clamp(-1, 1)

    # ---- public API -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one LongTensor (B, pn_k^2) of codes per scale (SPEC 1.7)."""
        return self.quantize.f_to_idx(self.encode_f(images_B3HW))

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Per-scale code maps (list of (B, pn_k^2)) or an f_hat (B, Z, h, w) -> images in [-1, 1]."""
        f_hat_BZhw = codes if isinstance(codes, torch.Tensor) else self.quantize.idx_to_fhat(codes)
        return self.fhat_to_img(f_hat_BZhw)

    @torch.no_grad()
    def reconstruct(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """encode then decode: (B, 3, H, W) -> (B, 3, H, W) in [-1, 1]."""
        return self.decode(self.encode(images_B3HW))

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward (SPEC 1.10).

        Returns:
            recon_B3HW: unclamped reconstruction (through the straight-through estimator).
            hits_SV: per-scale code hit counts of this batch (see :meth:`MultiScaleQuantizer.forward`).
            vq_loss: the quantizer loss (scalar).
        """
        f_hat_st_BZhw, hits_SV, vq_loss = self.quantize(self.encode_f(images_B3HW))
        return self.decoder(self.post_quant_conv(f_hat_st_BZhw)), hits_SV, vq_loss

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: Any) -> Any:
        """Write ``model.safetensors`` + ``config.json`` (the VQVAEConfig dict) atomically; returns the dir."""
        # Deferred import: the model package stays free of file IO; the helper owns it.
        from vargpt.training.checkpoint import save_checkpoint

        return save_checkpoint(out_dir, model_state=self.state_dict(), config=dataclasses.asdict(self.cfg))

    @classmethod
    def from_pretrained(cls, ckpt_dir: Any, *, map_location: str | torch.device = "cpu") -> MultiScaleVQVAE:
        """Load a directory written by :meth:`save_pretrained` (or the tokenizer trainer), in eval mode."""
        from vargpt.training.checkpoint import load_checkpoint

        state, config, _ = load_checkpoint(ckpt_dir, with_trainer_state=False)
        model = cls(vqvae_config_from_dict(config))
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()
