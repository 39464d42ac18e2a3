"""Tokenizer fidelity: PSNR and (ShapesWorld) oracle accuracy on the tokenizer's reconstructions.

The multi-scale VQ-VAE sets a ceiling on generation quality: the visual decoder can only produce images
the tokenizer can reconstruct. :func:`tokenizer_oracle_scores` measures that ceiling with the same
oracle that judges generated images: colour+shape accuracy on the reconstructions of held-out
one-object images (and, as a check of the oracle itself, on the originals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["one_object_images", "psnr_by_scales", "tokenizer_oracle_scores"]


def _psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error over images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def one_object_images(records: Sequence[Any]) -> list[tuple[Path, dict]]:
    """(image, its single object's attributes) for every distinct input image showing exactly one object."""
    seen: dict[Path, dict] = {}
    for r in records:
        objects = (r.meta or {}).get("objects", [])
        if len(r.images) == 1 and len(objects) == 1 and isinstance(objects[0], dict):
            seen.setdefault(r.images[0], objects[0])
    return list(seen.items())


@torch.no_grad()
def tokenizer_oracle_scores(vqvae: Any, records: Sequence[Any], world: Any, *, limit: int = 512,
                            batch_size: int = 128) -> dict[str, Any]:
    """Oracle accuracy and PSNR of ``vqvae``'s reconstructions of one-object images of ``records``.

    Args:
        vqvae: a :class:`vargpt.tokenizer.vqvae.MultiScaleVQVAE`.
        records: records whose ``meta.objects`` describe their image (ShapesWorld).
        world: ShapesWorld's world (``load_world``), for the oracle.
        limit: at most this many images.

    Returns:
        ``{"tokenizer_oracle_accuracy" (colour+shape), "tokenizer_oracle_colour", "tokenizer_oracle_shape",
        "tokenizer_oracle_original" (the oracle on the originals), "tokenizer_psnr", "tokenizer_oracle_n"}``;
        accuracies are None when no record has a one-object image.
    """
    from vargpt.data.records import image_to_tensor, load_image, tensor_to_image
    from vargpt.data.shapesworld.oracle import judge

    items = one_object_images(records)[:limit]
    keys = ("colour", "shape", "colour+shape")
    rec_hits, orig_hits = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0)
    se, n_pix = 0.0, 0
    size = vqvae.cfg.image_size
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack([image_to_tensor(load_image(p, size)) for p, _ in chunk])
        recon = vqvae.reconstruct(x).clamp(-1, 1)
        se += float(((recon - x) ** 2).sum())
        n_pix += x.numel()
        for (_, obj), xr, xo in zip(chunk, recon, x, strict=True):
            expected = {"colour": obj.get("colour"), "shape": obj.get("shape")}
            r, o = judge(tensor_to_image(xr), expected, world), judge(tensor_to_image(xo), expected, world)
            for k in keys:
                rec_hits[k] += int(r[k])
                orig_hits[k] += int(o[k])
    n = len(items)
    acc = (lambda h: round(h / n, 4)) if n else (lambda h: None)
    mse = se / n_pix if n_pix else None
    psnr = None if mse is None else round(_psnr_db(mse), 3)
    return {
        "tokenizer_oracle_accuracy": acc(rec_hits["colour+shape"]),
        "tokenizer_oracle_colour": acc(rec_hits["colour"]),
        "tokenizer_oracle_shape": acc(rec_hits["shape"]),
        "tokenizer_oracle_original": acc(orig_hits["colour+shape"]),
        "tokenizer_psnr": psnr,
        "tokenizer_oracle_n": n,
    }


@torch.no_grad()
def psnr_by_scales(vqvae: Any, images_B3HW: torch.Tensor) -> list[float]:
    """PSNR (dB, images in [-1, 1]) of decoding the running f_hat after each scale, coarse to fine.

    Shows where the tokenizer puts the image's information: the visual decoder predicts all codes of a
    scale in parallel, so a scale that carries much of the image (a large PSNR jump) is where sampling is
    hardest. The last entry is the full reconstruction.
    """
    q, pn = vqvae.quantize, vqvae.cfg.patch_nums
    idx_list = vqvae.encode(images_B3HW)
    f_hat = images_B3HW.new_zeros(images_B3HW.shape[0], vqvae.cfg.z_channels, pn[-1], pn[-1])
    out = []
    for si, p in enumerate(pn):
        f_hat, _ = q.next_scale_input(si, f_hat, q.embed(idx_list[si], p))
        mse = float(((vqvae.decode(f_hat).clamp(-1, 1) - images_B3HW) ** 2).mean())
        out.append(round(_psnr_db(mse), 2))
    return out
