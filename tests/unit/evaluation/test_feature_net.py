"""The FID feature network: trains on a tiny ShapesWorld, reloads, and separates real from broken images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.data.records import load_image, load_records, unique_images
from vargpt.evaluation.feature_net import FeatureNet, FeatureNetConfig, load_feature_net, train_feature_net
from vargpt.evaluation.generation import fid_from_features
from vargpt.training.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from vargpt.data.shapesworld import write_dataset

    root = tmp_path_factory.mktemp("fn")
    write_dataset(root / "data", n_train=200, n_test=50, seed=0, progress=False)
    summary = train_feature_net(root / "data", root / "net", steps=40, batch_size=32, progress=False)
    return root, summary


def test_trains_and_lowers_loss(trained):
    root, s = trained
    assert s["steps"] == 40 and s["n_train_images"] == 200 and s["n_test_images"] == 50
    assert len(s["classes"]) > 20  # colour x shape names of one-object images
    assert s["train_loss_last"] < 0.75 * s["train_loss_first"]
    assert s["heldout_loss_after"] < s["heldout_loss_before"]
    assert json.loads((root / "net" / "feature_net.json").read_text())["steps"] == 40
    assert (root / "net" / "loss.png").is_file()


def test_reload_and_fid_separates_real_from_blank(trained):
    root, _ = trained
    extractor = load_feature_net(root / "net")
    test = unique_images(load_records(root / "data", "test"))
    train = unique_images(load_records(root / "data", "train"))[:50]
    feats = extractor(test)
    assert feats.shape == (50, 64) and feats.dtype == np.float64
    assert np.allclose(extractor([load_image(p) for p in test[:3]]), feats[:3], atol=1e-5)  # paths == PIL
    rng = np.random.default_rng(0)
    grey = [Image.fromarray((128 + rng.normal(0, 4, (32, 32, 3))).clip(0, 255).astype(np.uint8)) for _ in train]
    fid_real = fid_from_features(extractor(train), feats)
    fid_grey = fid_from_features(extractor(grey), feats)
    assert fid_grey > 2 * fid_real


def test_forward_shapes_without_classes():
    net = FeatureNet(FeatureNetConfig(image_size=16, width=8, feature_dim=12, recon_size=8))
    f, logits, recon = net(torch.zeros(2, 3, 16, 16))
    assert f.shape == (2, 12) and logits is None and recon.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        FeatureNetConfig(image_size=30)


def test_load_rejects_other_checkpoints(tmp_path):
    from vargpt.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "x", model_state={"w": torch.zeros(1)}, config={"kind": "something"})
    with pytest.raises(CheckpointError, match="not a feature-net"):
        load_feature_net(tmp_path / "x")
