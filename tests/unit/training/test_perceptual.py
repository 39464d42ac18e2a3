"""Perceptual loss on a local transformers vision model: zero on equal images, gradients to the reconstruction
only, convolutional and ViT backbones, clear errors; never a download."""

from __future__ import annotations

import json

import pytest
import torch

from vargpt.training.checkpoint import CheckpointError
from vargpt.training.perceptual import PerceptualLoss


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet")
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4)
    CLIPVisionModel(cfg).save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return path


@pytest.mark.parametrize("which", ["resnet_dir", "clip_dir"])
def test_distance_is_zero_on_equal_images_and_positive_otherwise(which, request):
    loss = PerceptualLoss(request.getfixturevalue(which))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    d_same, d_diff = loss(x, x), loss(y, x)
    assert d_same.shape == (3,) and d_diff.shape == (3,)
    torch.testing.assert_close(d_same, torch.zeros(3), rtol=0, atol=1e-6)
    assert (d_diff > 1e-3).all()
    # Each image's distance is its own: computed alone it is the same.
    torch.testing.assert_close(loss(y[:1], x[:1]), d_diff[:1], rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_reconstruction_and_not_the_backbone(resnet_dir):
    loss = PerceptualLoss(resnet_dir)
    loss.train()
    assert not loss.backbone.training  # frozen statistics whatever the module's mode
    recon = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    target = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss(recon, target).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.backbone.parameters())


def test_layers_choose_the_hidden_states(resnet_dir):
    assert PerceptualLoss(resnet_dir).layers == (1, 2)  # ResNet: embedder output, then two stages
    only_last = PerceptualLoss(resnet_dir, layers=[-1])
    x, y = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    assert float(only_last(x, y)) != float(PerceptualLoss(resnet_dir, layers=[1])(x, y))
    with pytest.raises(ValueError, match="has 3 hidden states"):
        PerceptualLoss(resnet_dir, layers=[5])


def test_a_folder_without_a_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        PerceptualLoss(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))  # no weights next to it
    with pytest.raises(CheckpointError, match="transformers cannot load it"):
        PerceptualLoss(tmp_path)


def test_a_text_model_is_refused_clearly(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="a vision model is expected"):
        PerceptualLoss(tmp_path)
