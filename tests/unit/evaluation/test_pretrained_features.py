"""Optional Inception / CLIP backends: clear errors without packages or weights; never a download."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vargpt.config import ConfigError
from vargpt.evaluation.pretrained_features import BackendUnavailableError, ClipModel, InceptionFeatures, clip_score


@pytest.mark.parametrize("backend", [InceptionFeatures, ClipModel])
def test_no_weights_path_is_a_named_error(backend):
    with pytest.raises(BackendUnavailableError, match="local weights file"):
        backend(None)


@pytest.mark.parametrize("backend", [InceptionFeatures, ClipModel])
def test_missing_weights_file(backend, tmp_path):
    with pytest.raises(BackendUnavailableError, match="not found"):
        backend(tmp_path / "nope.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_missing_torch_fidelity_is_a_named_error(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(BackendUnavailableError, match="pip install torch-fidelity"):
        InceptionFeatures(weights)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_missing_open_clip_is_a_named_error(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"")
    with pytest.raises(BackendUnavailableError, match="open_clip_torch"):
        ClipModel(weights)


def test_error_is_a_user_error():
    assert issubclass(BackendUnavailableError, ConfigError)


def test_clip_score_formula():
    class Fake:
        def image_embeddings(self, images):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

        def text_embeddings(self, texts):
            return torch.tensor([[0.6, 0.8], [0.0, -1.0]])

    assert clip_score(Fake(), ["a", "b"], ["x", "y"]) == pytest.approx((60.0 + 0.0) / 2)
    with pytest.raises(ValueError):
        clip_score(Fake(), ["a"], [])


def test_inception_with_local_weights():
    import os

    path = os.environ.get("VARGPT_INCEPTION_WEIGHTS")
    if not path or importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("set VARGPT_INCEPTION_WEIGHTS and install torch-fidelity to run")
    from PIL import Image

    feats = InceptionFeatures(path)([Image.new("RGB", (32, 32), (255, 0, 0))] * 2)
    assert feats.shape == (2, 2048)


def test_clip_with_local_weights():
    import os

    path = os.environ.get("VARGPT_CLIP_WEIGHTS")
    if not path or importlib.util.find_spec("open_clip") is None:
        pytest.skip("set VARGPT_CLIP_WEIGHTS (ViT-B-32 open_clip checkpoint) and install open_clip_torch to run")
    from PIL import Image

    model = ClipModel(path, model_name=os.environ.get("VARGPT_CLIP_MODEL", "ViT-B-32"))
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    assert clip_score(model, [red], ["a red square"]) > clip_score(model, [red], ["a photo of a dog"])
