"""The project's own image feature extractor for FID: a small CNN trained offline on a dataset's images.

FID is usually computed on Inception-v3 features, whose weights must be downloaded; this network needs
nothing but the dataset (any folder in the README format). It is trained on the unique images of the
``train`` split with two objectives on one embedding ``f`` (``feature_dim`` wide):

* **class**: cross-entropy over the records' ``class`` labels, for the images that have one (a
  dataset without classes skips this term);
* **reconstruction** (self-supervised, every image): a small decoder rebuilds the image at
  ``recon_size`` px from ``f`` (mean squared error in [-1, 1] pixel units). This keeps layout,
  size and colour in ``f`` where class labels do not ask for them (ShapesWorld classes say nothing
  about position or size), and is the whole objective when the data has no classes.

The encoder keeps a coarse 4x4 spatial map before its last linear layer, so ``f`` is position-aware
(global average pooling would discard where things are). FID compares the Gaussian statistics of
``f`` over real and generated images (:func:`vargpt.evaluation.generation.fid_from_features`); FID
values are only comparable between runs that use the same feature network.

Training uses the shared loop (:func:`vargpt.training.loop.train`); the result is a checkpoint
(``model.safetensors`` + ``config.json``) under ``out_dir/checkpoint`` and a summary
``out_dir/feature_net.json`` with the held-out class accuracy and reconstruction error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from vargpt.data.records import (
    DatasetError,
    Record,
    image_to_tensor,
    load_image,
    load_records,
    resize_center_crop,
    unique_images,
)
from vargpt.training.checkpoint import CheckpointError, is_checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["FeatureNet", "FeatureNetConfig", "images_to_batch", "load_feature_net", "train_feature_net"]

SUMMARY_FILE = "feature_net.json"
_GRID = 4
"""Side of the spatial map kept before the embedding (position-aware features)."""


@dataclass(frozen=True, kw_only=True)
class FeatureNetConfig:
    """Shape of a :class:`FeatureNet` (stored in its checkpoint's ``config.json``)."""

    image_size: int = 32
    """Inputs are resized to this square size (bicubic) before the encoder."""
    width: int = 32
    """Channels of the first conv; doubled at each of the two stride-2 stages."""
    feature_dim: int = 64
    """Width of the embedding used for FID."""
    recon_size: int = 16
    """Side of the reconstruction target (the image downsampled; area averaging)."""
    classes: tuple[str, ...] = ()
    """Class names of the class head (empty: reconstruction only)."""

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size % _GRID:
            raise ValueError(f"image_size={self.image_size}: must be >= 8 and a multiple of {_GRID}")
        if self.recon_size not in (8, 16, 32):
            raise ValueError(f"recon_size={self.recon_size}: must be 8, 16 or 32")
        if self.width < 1 or self.feature_dim < 1:
            raise ValueError(f"width={self.width}, feature_dim={self.feature_dim}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``kind`` marks the checkpoint as a feature net)."""
        return {"kind": "feature_net", **asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureNetConfig:
        """Inverse of :meth:`to_dict`."""
        fields = {k: v for k, v in d.items() if k != "kind"}
        return cls(**{**fields, "classes": tuple(fields.get("classes", ()))})


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    kernel = 4 if stride == 2 else 3
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, 1), nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out),
                         nn.GELU())


class FeatureNet(nn.Module):
    """Encoder ``image -> f`` (``feature_dim``) with a class head and a reconstruction decoder."""

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.encoder = nn.Sequential(_conv_block(3, w, 1), _conv_block(w, 2 * w, 2), _conv_block(2 * w, 4 * w, 2),
                                     _conv_block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(_GRID))
        self.embed = nn.Linear(4 * w * _GRID * _GRID, cfg.feature_dim)
        self.class_head = nn.Linear(cfg.feature_dim, len(cfg.classes)) if cfg.classes else None
        self.unembed = nn.Linear(cfg.feature_dim, 4 * w * _GRID * _GRID)
        ups, c, side = [], 4 * w, _GRID
        while side < cfg.recon_size:
            ups += [nn.ConvTranspose2d(c, max(w, c // 2), 4, 2, 1), nn.GELU()]
            c, side = max(w, c // 2), side * 2
        self.decoder = nn.Sequential(*ups, nn.Conv2d(c, 3, 3, 1, 1))

    def features(self, pixel_B3HW: torch.Tensor) -> torch.Tensor:
        """Embeddings ``f_BD`` of images in [-1, 1] at ``cfg.image_size`` px (D = feature_dim)."""
        return self.embed(self.encoder(pixel_B3HW).flatten(1))

    def forward(self, pixel_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(f_BD, class_logits_BN or None, recon_B3rr)`` for images in [-1, 1]."""
        f_BD = self.features(pixel_B3HW)
        logits = self.class_head(f_BD) if self.class_head is not None else None
        grid_BCgg = rearrange(self.unembed(F.gelu(f_BD)), "b (c h w) -> b c h w", h=_GRID, w=_GRID)
        return f_BD, logits, torch.tanh(self.decoder(grid_BCgg))


def images_to_batch(images: Sequence[Image.Image | str | Path], size: int) -> torch.Tensor:
    """PIL images or paths -> ``pixel_B3HW`` in [-1, 1] at ``size`` px: the shorter side resized (bicubic)
    and a centred square cropped, as the tokenizer sees images (square images are only resized)."""
    out = []
    for im in images:
        img = load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB")
        out.append(image_to_tensor(resize_center_crop(img, size)))
    return torch.stack(out)


class ProjectFeatures:
    """A trained :class:`FeatureNet` as an FID feature extractor: ``extractor(images) -> (N, D)`` float64."""

    name = "project"

    def __init__(self, net: FeatureNet, *, batch_size: int = 256) -> None:
        self.net, self.batch_size = net.eval(), batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Features of ``images`` (PIL or paths), shape ``(N, feature_dim)``."""
        device = next(self.net.parameters()).device
        chunks = [self.net.features(images_to_batch(images[i:i + self.batch_size], self.net.cfg.image_size)
                                    .to(device)).double().cpu().numpy()
                  for i in range(0, len(images), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.net.cfg.feature_dim))


def load_feature_net(path: str | Path, *, device: str | torch.device = "cpu") -> ProjectFeatures:
    """The feature extractor stored by :func:`train_feature_net` (``path`` = its out_dir or checkpoint dir).

    Raises:
        CheckpointError: no feature-net checkpoint at ``path``.
    """
    p = Path(path)
    ckpt = p / "checkpoint" if is_checkpoint(p / "checkpoint") else p
    state, config, _ = load_checkpoint(ckpt, with_trainer_state=False)
    if config.get("kind") != "feature_net":
        raise CheckpointError(f"{ckpt} is not a feature-net checkpoint (config kind {config.get('kind')!r}); "
                              "train one with train_feature_net / `vargpt eval-features`")
    net = FeatureNet(FeatureNetConfig.from_dict(config))
    net.load_state_dict(state)
    return ProjectFeatures(net.to(device))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _image_labels(records: Sequence[Record]) -> tuple[list[Path], dict[Path, str]]:
    """Unique images of ``records`` and the class of each image that has one (first record wins)."""
    labels: dict[Path, str] = {}
    for r in records:
        if r.cls is not None:
            for p in r.images:
                labels.setdefault(p, r.cls)
    return unique_images(list(records)), labels


def _samples(paths: Sequence[Path], labels: dict[Path, str], classes: Sequence[str], cfg: FeatureNetConfig
             ) -> list[tuple[torch.Tensor, int]]:
    index = {c: i for i, c in enumerate(classes)}
    pixels = images_to_batch(paths, cfg.image_size) if paths else torch.zeros(0, 3, cfg.image_size, cfg.image_size)
    return [(pixels[i], index.get(labels.get(p, ""), -100)) for i, p in enumerate(paths)]


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


def _loss(recon_weight: float):  # noqa: ANN202 - a LossFn
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixels, labels = (t.to(next(model.parameters()).device) for t in batch)
        _, logits, recon = model(pixels)
        target = F.adaptive_avg_pool2d(pixels, recon.shape[-1])
        recon_loss = F.mse_loss(recon, target)
        out = {"recon_loss": recon_loss}
        loss = recon_weight * recon_loss
        if logits is not None and bool((labels >= 0).any()):
            out["class_loss"] = F.cross_entropy(logits, labels, ignore_index=-100)
            loss = loss + out["class_loss"]
        out["loss"] = loss
        return out
    return loss_fn


@torch.no_grad()
def _held_out_metrics(net: FeatureNet, samples: list[tuple[torch.Tensor, int]]) -> dict[str, float | None]:
    if not samples:
        return {"class_accuracy": None, "recon_mse": None, "n": 0}
    net.eval()
    pixels, labels = _collate(samples)
    _, logits, recon = net(pixels)
    mse = float(F.mse_loss(recon, F.adaptive_avg_pool2d(pixels, recon.shape[-1])))
    acc = None
    if logits is not None and bool((labels >= 0).any()):
        mask = labels >= 0
        acc = round(float((logits[mask].argmax(-1) == labels[mask]).float().mean()), 4)
    return {"class_accuracy": acc, "recon_mse": round(mse, 5), "n": len(samples)}


def train_feature_net(
    data_dir: str | Path, out_dir: str | Path, *, steps: int = 250, batch_size: int = 64, lr: float = 2e-3,
    image_size: int = 32, feature_dim: int = 64, width: int = 32, recon_weight: float = 1.0,
    max_images: int = 20000, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Train the FID feature network on the images of ``data_dir``'s train split (see module docstring).

    Args:
        data_dir: any dataset in the README format; ``test`` split images (if any) are the held-out set.
        out_dir: receives ``checkpoint/`` (loadable with :func:`load_feature_net`), ``loss.png``,
            ``log.jsonl`` and ``feature_net.json``.
        steps / batch_size / lr: optimisation (AdamW, warm-up + cosine, shared training loop).
        image_size: input resolution (images are resized to it).
        feature_dim / width: embedding width / first conv width.
        recon_weight: weight of the reconstruction loss (the class loss has weight 1).
        max_images: use at most this many train images (first in file order).
        seed: data order and initialisation.
        progress: progress bar.

    Returns:
        ``{"classes", "n_train_images", "n_test_images", "train_loss_first", "train_loss_last",
        "heldout_loss_before", "heldout_loss_after", "class_accuracy", "recon_mse", "checkpoint", ...}``
        (also written to ``out_dir/feature_net.json``).
    """
    from vargpt.config import TrainConfig
    from vargpt.training.loop import train

    train_paths, labels = _image_labels(load_records(data_dir, "train"))
    train_paths = train_paths[:max_images]
    try:
        test_paths, test_labels = _image_labels(load_records(data_dir, "test"))
    except DatasetError:  # no test split: train without a held-out set
        test_paths, test_labels = [], {}
    classes = tuple(sorted({labels[p] for p in train_paths if p in labels}))
    cfg = FeatureNetConfig(image_size=image_size, width=width, feature_dim=feature_dim, classes=classes)
    train_data = _samples(train_paths, labels, classes, cfg)
    test_data = _samples(test_paths[:max_images], test_labels, classes, cfg)
    torch.manual_seed(seed)
    net = FeatureNet(cfg)
    tcfg = TrainConfig(name="feature_net", lr=lr, batch_size=batch_size, max_steps=steps, warmup_ratio=0.05,
                       weight_decay=0.0, grad_clip=1.0, seed=seed)
    result = train(net, loss_fn=_loss(recon_weight), train_data=train_data, collate=_collate, cfg=tcfg,
                   out_dir=out_dir, eval_data=test_data or None, save_config=cfg.to_dict(), progress=progress)
    summary = {"classes": list(classes), "n_train_images": len(train_data), "n_test_images": len(test_data),
               **result.to_dict(), **_held_out_metrics(net.cpu(), test_data)}
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("feature net: %s", {k: v for k, v in summary.items() if k != "classes"})
    return summary
