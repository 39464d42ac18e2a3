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

__all__ = ["one_object_images", "psnr_by_scales", "shape_probe_scores", "tokenizer_oracle_scores"]


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


def _probe_accuracy(train_BCHW: torch.Tensor, y_train: torch.Tensor, test_BCHW: torch.Tensor, y_test: torch.Tensor,
                    num_classes: int, *, steps: int, seed: int) -> torch.Tensor:
    """Train a small convolutional classifier on ``train`` maps and return its predictions on ``test``.

    Two 3x3 convolutions (64 channels, GELU), a global max-pool (so a shape is recognised wherever it sits)
    and a linear layer; AdamW (lr 2e-3, weight decay 0.01), batches of 64, inputs scaled by the train maps'
    standard deviation; seeded, so two runs on the same maps agree.
    """
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(train_BCHW.shape[1], 64, 3, padding=1), nn.GELU(),
                            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                            nn.Linear(64, num_classes))
    scale = train_BCHW.std().clamp_min(1e-8)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(0, train_BCHW.shape[0], (min(64, train_BCHW.shape[0]),), generator=g)
            loss = torch.nn.functional.cross_entropy(net(train_BCHW[i] / scale), y_train[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(test_BCHW / scale).argmax(1)


@torch.no_grad()
def shape_probe_scores(vqvae: Any, train_records: Sequence[Any], test_records: Sequence[Any], *,
                       size: str | None = "small", steps: int = 1500, seed: int = 0,
                       batch_size: int = 256) -> dict[str, Any]:
    """How much of an object's shape survives quantization: a probe on the latent before and after it.

    The same small convolutional probe (:func:`_probe_accuracy`) is trained to name the shape of one-object
    images of ``size`` (ShapesWorld's ``meta.objects``; None = every size) from the encoder's continuous latent
    ``f`` and, separately, from the quantized ``f_hat`` the decoder and the visual decoder see, on the training
    records' images, and scored on the test records'. A gap between the two is shape the codes lost: no decoder,
    however long it trains, can draw it back. Session 27, run AL's tiny tokenizer, 585 small one-object images of
    a fresh set: 0.993 from ``f``, 0.944-0.952 from ``f_hat`` (small crosses 0.79-0.82, confused with diamonds),
    while its reconstructions read 0.47 for small crosses and 0.82 for small stars (1.00 from ``f_hat``).

    Args:
        vqvae: a :class:`~vargpt.tokenizer.vqvae.MultiScaleVQVAE` (``encode_f`` and ``quantize``).
        train_records, test_records: records whose ``meta.objects`` describe their image.
        size: only objects of this size (None = all).
        steps: probe training steps.
        seed: seed of the probe's initialisation and batches.

    Returns:
        ``{"probe_latent", "probe_quantized"}`` (accuracy over the test images), their ``*_per_shape``
        dicts, ``probe_shapes``, ``probe_train_n``, ``probe_test_n``, ``probe_size``; accuracies are None when
        either split has no such image or the training images show fewer than two shapes.
    """
    from vargpt.data.records import image_to_tensor, load_image

    def items(records: Sequence[Any]) -> list[tuple[Path, str]]:
        return [(p, o["shape"]) for p, o in one_object_images(records)
                if "shape" in o and (size is None or o.get("size") == size)]

    train = items(train_records)
    shapes = sorted({s for _, s in train})
    test = [(p, s) for p, s in items(test_records) if s in shapes]
    out: dict[str, Any] = {"probe_latent": None, "probe_quantized": None, "probe_latent_per_shape": {},
                           "probe_quantized_per_shape": {}, "probe_shapes": shapes, "probe_train_n": len(train),
                           "probe_test_n": len(test), "probe_size": size}
    if len(shapes) < 2 or not test:
        return out
    img_size = vqvae.cfg.image_size

    def latents(chunk: list[tuple[Path, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        fs, fhats = [], []
        for i in range(0, len(chunk), batch_size):
            x = torch.stack([image_to_tensor(load_image(p, img_size)) for p, _ in chunk[i:i + batch_size]])
            f = vqvae.encode_f(x)
            fs.append(f)
            fhats.append(vqvae.quantize.f_to_idx_and_fhat(f)[1][-1])  # the last partial f_hat is f_hat
        return torch.cat(fs), torch.cat(fhats)

    f_train, fhat_train = latents(train)
    f_test, fhat_test = latents(test)
    y_train = torch.tensor([shapes.index(s) for _, s in train])
    y_test = torch.tensor([shapes.index(s) for _, s in test])
    for name, a, b in (("latent", f_train, f_test), ("quantized", fhat_train, fhat_test)):
        hit = _probe_accuracy(a, y_train, b, y_test, len(shapes), steps=steps, seed=seed) == y_test
        out[f"probe_{name}"] = round(float(hit.float().mean()), 4)
        out[f"probe_{name}_per_shape"] = {s: round(float(hit[y_test == k].float().mean()), 4)
                                          for k, s in enumerate(shapes) if bool((y_test == k).any())}
    return out
