"""Optional feature extractors from published weights: Inception-v3 (torch-fidelity) and CLIP (open_clip).

These give FID / CLIP-score numbers comparable with the literature, but both packages fetch their
weights from the internet by default. Here they are **only** built from weight files the user already
has on disk; nothing is ever downloaded. When a package is missing or no weights file is given,
:class:`BackendUnavailableError` says what to install or pass. The project's own, always-available
extractor is :mod:`vargpt.evaluation.feature_net`.

* Inception: ``pip install torch-fidelity`` and the file ``weights-inception-2015-12-05-6726825d.pth``
  (torch-fidelity's release asset; the TF-ported FID Inception). Features: the 2048-d pool layer.
* CLIP: ``pip install open_clip_torch`` and an open_clip checkpoint file for ``model_name`` (e.g.
  ViT-B-32 ``open_clip_pytorch_model.bin``). CLIP score = ``100 * max(cos(image, text), 0)``, averaged
  (Hessel et al. 2021, torchmetrics' scaling).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vargpt.config import ConfigError
from vargpt.data.records import load_image

__all__ = ["BackendUnavailableError", "ClipModel", "InceptionFeatures", "clip_score"]


class BackendUnavailableError(ConfigError):
    """An optional metric backend cannot run: its package is missing or no local weights file was given."""


def _require(module: str, pip_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"{what} needs the package {pip_name!r} (pip install {pip_name}); "
                                      f"it is not installed ({e})") from e


def _require_file(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise BackendUnavailableError(f"{what} needs a local weights file ({hint}); nothing is downloaded")
    p = Path(path)
    if not p.is_file():
        raise BackendUnavailableError(f"{what}: weights file not found: {p} ({hint})")
    return p


def _as_pil(images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
    return [load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]


class InceptionFeatures:
    """FID Inception-v3 pool features (2048-d) via torch-fidelity, from a local weights file.

    Args:
        weights_path: ``weights-inception-2015-12-05-6726825d.pth`` on disk.
        device: where to run.
        batch_size: images per forward.

    Raises:
        BackendUnavailableError: torch-fidelity is not installed or the weights file is missing.
    """

    name = "inception"

    def __init__(self, weights_path: str | Path | None, *, device: str = "cpu", batch_size: int = 64) -> None:
        hint = "pass the path of torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
        path = _require_file(weights_path, "Inception FID", hint)
        fe = _require("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity", "Inception FID")
        self.model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                    feature_extractor_weights_path=str(path)).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Features ``(N, 2048)`` of ``images`` (any size; resized inside to 299 px)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = _as_pil(images[i:i + self.batch_size])
            size = chunk[0].size
            arr = np.stack([np.asarray(im.resize(size)) for im in chunk])
            x_B3HW = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8, as required
            out.append(self.model(x_B3HW)[0].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


class ClipModel:
    """An open_clip model from a local checkpoint: image features (for CLIP-FID) and CLIP score.

    Args:
        weights_path: the open_clip checkpoint file of ``model_name``.
        model_name: open_clip architecture name, e.g. ``"ViT-B-32"``.
        device / batch_size: where and how many images per forward.

    Raises:
        BackendUnavailableError: open_clip is not installed or the weights file is missing.
    """

    name = "clip"

    def __init__(self, weights_path: str | Path | None, *, model_name: str = "ViT-B-32", device: str = "cpu",
                 batch_size: int = 64) -> None:
        path = _require_file(weights_path, "CLIP", f"pass the path of an open_clip {model_name} checkpoint")
        open_clip = _require("open_clip", "open_clip_torch", "CLIP")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, E)``."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in _as_pil(images[i:i + self.batch_size])]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, E)``."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def __call__(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Image embeddings as a float64 array (a FID feature extractor)."""
        return self.image_embeddings(images).double().cpu().numpy()


def clip_score(model: Any, images: Sequence[Image.Image | str | Path], texts: Sequence[str]) -> float:
    """Mean CLIP score ``100 * max(cos(image_i, text_i), 0)`` over pairs.

    Args:
        model: a :class:`ClipModel` (or anything with ``image_embeddings`` / ``text_embeddings``
            returning L2-normalised rows).
    """
    if len(images) != len(texts) or not images:
        raise ValueError(f"clip_score needs as many texts as images (>= 1); got {len(images)} and {len(texts)}")
    cos = (model.image_embeddings(images) * model.text_embeddings(texts)).sum(-1)
    return float((100.0 * cos.clamp_min(0)).mean())
