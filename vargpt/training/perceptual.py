"""Perceptual reconstruction loss on the features of a frozen image network read from a local folder.

VQGAN-style tokenizers add LPIPS to the pixel loss: the distance between deep features of the image and of its
reconstruction, which weighs what a network finds salient (edges, textures) over flat areas. LPIPS's VGG weights
come from the internet and from torchvision (which this project does not install), so the backbone here is any
``transformers`` vision model in a local folder (``save_pretrained`` layout; nothing is downloaded): a ResNet,
ConvNeXt, DINOv2, a CLIP vision tower, ... The distance is LPIPS's without its learned per-channel weights
(every channel of a layer weighs the same): each chosen hidden state is unit-normalised along channels at every
position, and the squared difference of the two images' normalised features is summed over channels, averaged
over positions, and averaged over the chosen layers.

    >>> loss = PerceptualLoss("weights/convnext-tiny")     # any local transformers vision model
    >>> d_B = loss(recon_B3HW, target_B3HW)                # (B,), images in [-1, 1]

Off in every preset: no such network is available offline for the tiny recipe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import ConfigError
from vargpt.training.checkpoint import CheckpointError

__all__ = ["PerceptualLoss"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_backbone(path: Path) -> nn.Module:
    """The vision model in ``path`` (a CLIP / SigLIP checkpoint gives its vision tower), frozen, in eval mode."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    if not (path / "config.json").is_file():
        raise CheckpointError(f"perceptual model {path}: no config.json there (a transformers vision model saved "
                              "with save_pretrained is expected; nothing is downloaded)")
    try:
        model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
        cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(model_type, AutoModel)
        model = cls.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:  # unknown model type, missing or broken weights
        raise CheckpointError(f"perceptual model {path}: transformers cannot load it ({type(e).__name__}: {e})") from e
    return model.eval().requires_grad_(False)


def _normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of the folder's ``preprocessor_config.json``, else ImageNet's."""
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return _IMAGENET_MEAN, _IMAGENET_STD


def _unit(h: torch.Tensor) -> torch.Tensor:
    """A hidden state as (B, positions, channels), each position's feature vector scaled to unit length."""
    if h.ndim == 4:  # convolutional (B, C, H, W)
        h = h.flatten(2).transpose(1, 2)
    return h / (h.square().sum(-1, keepdim=True) + 1e-10).sqrt()


class PerceptualLoss(nn.Module):
    """Per-image perceptual distance ``(B,)`` between two batches of images in [-1, 1].

    Args:
        model_dir: a local transformers vision model (``config.json`` + weights; a preprocessor config, if
            present, gives the input normalisation, else ImageNet's).
        layers: indices into the model's ``hidden_states`` (default: all but the first, the embedding output).
        image_size: resize inputs to this square size first (bilinear; default: the model config's
            ``image_size`` when it has one, as ViTs need, else the input size).

    Raises:
        CheckpointError: ``model_dir`` holds no transformers model.
        ConfigError: the model is no vision model giving ``hidden_states``, or a layer index is out of range.
    """

    def __init__(self, model_dir: str | Path, *, layers: Sequence[int] | None = None,
                 image_size: int | None = None) -> None:
        super().__init__()
        path = Path(model_dir)
        self.backbone = _load_backbone(path)
        mean, std = _normalisation(path)
        self.register_buffer("mean_13", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_13", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        cfg = self.backbone.config
        self.image_size = image_size if image_size is not None else getattr(cfg, "image_size", None)
        probe_size = self.image_size or 32
        try:
            with torch.no_grad():
                hidden = self._hidden(torch.zeros(1, 3, probe_size, probe_size))
        except (TypeError, ValueError, RuntimeError) as e:  # not an image model taking pixel_values
            raise ConfigError(f"perceptual model {path}: a vision model is expected, whose forward takes "
                             f"pixel_values and returns hidden_states ({type(e).__name__}: {e})") from e
        if not hidden:
            raise ConfigError(f"perceptual model {path} returns no hidden_states")
        n = len(hidden)
        self.layers = tuple(range(1, n)) if layers is None else tuple(layers)
        bad = [i for i in self.layers if not -n <= i < n]
        if bad or not self.layers:
            raise ConfigError(f"perceptual layers {list(self.layers)}: the model at {path} has {n} hidden states "
                             f"(indices 0..{n - 1})")

    def train(self, mode: bool = True) -> PerceptualLoss:
        """The backbone stays in eval mode (frozen statistics, no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _hidden(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.backbone(pixel_values=x_B3HW, output_hidden_states=True).hidden_states

    def _features(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        if self.image_size is not None and x_B3HW.shape[-1] != self.image_size:
            x_B3HW = F.interpolate(x_B3HW, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        x_B3HW = ((x_B3HW + 1) / 2 - self.mean_13) / self.std_13
        hidden = self._hidden(x_B3HW.contiguous())
        return [_unit(hidden[i]) for i in self.layers]

    def forward(self, recon_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
        """Distance per image (B,); gradients flow to ``recon`` only."""
        with torch.no_grad():
            target = self._features(target_B3HW)
        recon = self._features(recon_B3HW)
        per_layer = [(a - b).square().sum(-1).mean(-1) for a, b in zip(recon, target, strict=True)]
        return torch.stack(per_layer).mean(0)
