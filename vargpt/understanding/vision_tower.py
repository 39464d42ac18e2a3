"""Vision tower: an HF vision model -> patch features, and the matching image pre-processing.

LLaVA-1.5 / VARGPT (SPEC 3.1, 3.4) use a ``CLIPVisionModel``: the features are
``hidden_states[feature_layer]`` (-2: the penultimate encoder layer's output) with the CLS token dropped
("default" select strategy), so one image gives P = (image_size / patch_size)^2 feature vectors of width F.
The tiny preset uses a small HF ``ResNetModel`` instead (:class:`~vargpt.config.VisionTowerConfig`
says why): its last stage's map, one feature vector per cell in row-major order.

State-dict naming: attribute ``model`` is the HF model; keys read ``model.encoder.layers.0...`` (the HF
keys of transformers 5, prefixed with ``model.``).

:class:`ImageProcessor` does CLIP's preprocessing (resize shorter side bicubic, centre-crop, scale to
[0, 1], normalise with the config mean/std) in torch. It accepts PIL images (anything with
``.convert("RGB")``), HWC uint8 arrays or CHW uint8/float tensors, and does no file IO: corrupt image
data that only fails when decoded raises :class:`UnreadableImageError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, ResNetConfig, ResNetModel

from vargpt.config import VisionTowerConfig

__all__ = ["ImageProcessor", "UnreadableImageError", "VisionTower", "hf_config_from_vision_config"]

_MODELS: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "resnet": (ResNetConfig, ResNetModel),
}
"""HF ``model_type`` -> (config class, model class) of the supported towers."""


class UnreadableImageError(ValueError):
    """An image could not be decoded or has an unusable shape; the message says which and why."""


def hf_config_from_vision_config(cfg: VisionTowerConfig) -> PretrainedConfig:
    """HF ``CLIPVisionConfig`` (or ``ResNetConfig``, carrying ``image_size``) for ``cfg``."""
    if cfg.architecture == "resnet":
        return ResNetConfig(
            num_channels=3, embedding_size=cfg.stem_size, hidden_sizes=list(cfg.stage_sizes),
            depths=list(cfg.stage_depths), layer_type="basic", hidden_act="relu",
            downsample_in_first_stage=False, image_size=cfg.image_size,
        )
    return CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, projection_dim=cfg.projection_dim,
    )


def _as_hf_config(hf_config: dict | PretrainedConfig) -> PretrainedConfig:
    if not isinstance(hf_config, dict):
        return hf_config
    model_type = hf_config.get("model_type", "clip_vision_model")
    if model_type not in _MODELS:
        raise ValueError(f"unsupported vision tower model_type {model_type!r}; supported: {sorted(_MODELS)}")
    return _MODELS[model_type][0].from_dict(hf_config)


class VisionTower(nn.Module):
    """HF vision model returning patch features ``pixels_B3HW -> feats_BPF`` (SPEC 3.1)."""

    def __init__(self, model: nn.Module, *, feature_layer: int = -2, drop_cls: bool = True) -> None:
        super().__init__()
        self.model = model
        self.is_resnet = model.config.model_type == "resnet"
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls or self.is_resnet  # a ResNet has no CLS token to keep

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig, *, attn_implementation: str = "sdpa") -> VisionTower:
        """Randomly initialised tower (fp32)."""
        return cls.from_hf_config(hf_config_from_vision_config(cfg), feature_layer=cfg.feature_layer,
                                  drop_cls=cfg.drop_cls, attn_implementation=attn_implementation)

    @classmethod
    def from_hf_config(
        cls, hf_config: dict | PretrainedConfig, *, feature_layer: int = -2, drop_cls: bool = True,
        attn_implementation: str = "sdpa",
    ) -> VisionTower:
        """Randomly initialised tower from an HF config (object or ``to_dict()`` form)."""
        hf_config = _as_hf_config(hf_config)
        model = _MODELS[hf_config.model_type][1](hf_config)
        if hf_config.model_type != "resnet":  # convolutions only: no attention implementation to pick
            model.set_attn_implementation(attn_implementation)
        return cls(model, feature_layer=feature_layer, drop_cls=drop_cls)

    def hf_config_dict(self) -> dict:
        """The HF config as a JSON-serialisable dict (rebuild with :meth:`from_hf_config`)."""
        return self.model.config.to_dict()

    @classmethod
    def from_pretrained(
        cls, path: str, *, feature_layer: int = -2, drop_cls: bool = True, dtype: torch.dtype = torch.float32,
    ) -> VisionTower:
        """Load a ``CLIPVisionModel`` (or ``ResNetModel``) from a local directory (never downloads)."""
        model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
        model_cls = _MODELS.get(model_type, _MODELS["clip_vision_model"])[1]
        model = model_cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        return cls(model, feature_layer=feature_layer, drop_cls=drop_cls)

    def save_pretrained(self, path: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` of the HF model."""
        self.model.save_pretrained(str(path))

    @property
    def hidden_size(self) -> int:
        """Feature width F."""
        config = self.model.config
        return int(config.hidden_sizes[-1] if self.is_resnet else config.hidden_size)

    @property
    def num_patches(self) -> int:
        """Feature vectors per image P."""
        config = self.model.config
        if self.is_resnet:
            image_size = getattr(config, "image_size", None)
            if image_size is None:
                raise ValueError("a ResNet tower's HF config must carry image_size (the input side in pixels)")
            halvings = len(config.hidden_sizes) - 1 + int(config.downsample_in_first_stage)
            side = image_size // (4 * 2 ** halvings)
        else:
            side = config.image_size // config.patch_size
        return side * side + (0 if self.drop_cls else 1)

    def features_and_pooled(self, pixels_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features ``(B, P, F)`` of the selected layer and the pooled image vector ``(B, F)``
        (CLIP: post-LN CLS; ResNet: the mean of the last map, whose cells are the features in row-major
        order), from one pass."""
        pixels_B3HW = pixels_B3HW.to(self.model.dtype)
        if self.is_resnet:
            out = self.model(pixel_values=pixels_B3HW)
            return out.last_hidden_state.flatten(2).transpose(1, 2), out.pooler_output.flatten(1)
        out = self.model(pixel_values=pixels_B3HW, output_hidden_states=True)
        feats_BPF = out.hidden_states[self.feature_layer]
        return (feats_BPF[:, 1:] if self.drop_cls else feats_BPF), out.pooler_output

    def forward(self, pixels_B3HW: torch.Tensor) -> torch.Tensor:
        """Patch features of the selected layer, ``(B, 3, H, W) -> (B, P, F)``."""
        return self.features_and_pooled(pixels_B3HW)[0]


class ImageProcessor:
    """CLIP preprocessing to ``pixels_B3HW`` (SPEC 3.4): resize, centre-crop, rescale, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.mean_3 = torch.tensor(mean, dtype=torch.float32)
        self.std_3 = torch.tensor(std, dtype=torch.float32)

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig) -> ImageProcessor:
        """Processor matching a vision tower config."""
        return cls(cfg.image_size, cfg.image_mean, cfg.image_std)

    def __call__(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """Process one image or a sequence of images into ``(B, 3, S, S)`` float32."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images to process")
            return torch.stack([self.process_one(im) for im in images])
        return self.process_one(images)[None]

    def process_one(self, image: Any) -> torch.Tensor:
        """One image -> normalised ``(3, S, S)``."""
        x_3HW = _to_unit_tensor(image)
        x_3HW = _resize_center_crop(x_3HW, self.image_size)
        return (x_3HW - self.mean_3[:, None, None]) / self.std_3[:, None, None]


def _to_unit_tensor(image: Any) -> torch.Tensor:
    """PIL image / HWC uint8 array / CHW tensor -> float32 (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if x.dim() != 3 or x.shape[0] != 3:
            raise UnreadableImageError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        return x
    if hasattr(image, "convert"):
        try:
            image = image.convert("RGB")  # PIL decodes lazily: corrupt data fails here
        except (OSError, SyntaxError, ValueError) as e:
            raise UnreadableImageError(f"cannot decode image {_describe(image)}: {e}") from e
    try:
        arr = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"cannot decode image {_describe(image)}: {e}") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise UnreadableImageError(
            f"expected an RGB image (H, W, 3) uint8, got {type(image).__name__} with array shape "
            f"{arr.shape} dtype {arr.dtype}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _describe(image: Any) -> str:
    name = getattr(image, "filename", "") or ""
    return repr(name) if name else type(image).__name__


def _resize_center_crop(x_3HW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop ``size x size``."""
    _, h, w = x_3HW.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x_3HW = F.interpolate(x_3HW[None], size=(nh, nw), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x_3HW = x_3HW[:, top:top + size, left:left + size]
    return x_3HW
