"""merge: image features land exactly at the <image> slots, in order; mismatches raise."""

from __future__ import annotations

import pytest
import torch

from vargpt.llm.merge import ImageCountMismatchError, expand_image_tokens, merge_image_features

IMG = 9


def test_expand_image_tokens_with_labels():
    ids, labels = expand_image_tokens([1, IMG, 2, IMG], IMG, 3, labels=[-100, -100, 5, -100])
    assert ids == [1, IMG, IMG, IMG, 2, IMG, IMG, IMG]
    assert labels == [-100, -100, -100, -100, 5, -100, -100, -100]
    assert expand_image_tokens([1, 2], IMG, 3) == [1, 2]
    with pytest.raises(ValueError):
        expand_image_tokens([1], IMG, 0)


def test_merge_places_features_in_order():
    P, D = 2, 4
    ids = torch.tensor([expand_image_tokens([1, IMG, 2, IMG], IMG, P),
                        expand_image_tokens([3, IMG, 4, 4, 4], IMG, P)])
    embeds = torch.zeros(2, ids.shape[1], D)
    feats = torch.arange(3 * P * D, dtype=torch.float32).reshape(3, P, D) + 1
    out = merge_image_features(embeds, ids, IMG, feats)
    assert torch.equal(out[0, 1:3], feats[0]) and torch.equal(out[0, 4:6], feats[1])
    assert torch.equal(out[1, 1:3], feats[2])
    assert (out[ids != IMG] == 0).all()
    assert (embeds == 0).all()  # out of place


def test_merge_is_differentiable_in_features():
    ids = torch.tensor([[1, IMG, IMG, 2]])
    feats = torch.randn(1, 2, 3, requires_grad=True)
    merge_image_features(torch.zeros(1, 4, 3), ids, IMG, feats).sum().backward()
    assert torch.equal(feats.grad, torch.ones(1, 2, 3))


def test_merge_without_images_is_identity():
    e = torch.randn(1, 3, 4)
    assert merge_image_features(e, torch.tensor([[1, 2, 3]]), IMG, torch.zeros(0, 5, 4)) is e


@pytest.mark.parametrize("n_images", [1, 3])
def test_count_mismatch_raises(n_images):
    ids = torch.tensor([expand_image_tokens([1, IMG, IMG], IMG, 2)])
    with pytest.raises(ImageCountMismatchError, match="4 <image> slots"):
        merge_image_features(torch.zeros(1, 5, 4), ids, IMG, torch.zeros(n_images, 2, 4))


def test_run_not_multiple_of_p_raises():
    ids = torch.tensor([[IMG, 1, IMG, IMG, IMG]])  # 4 slots = 2 x 2 but runs of 1 and 3
    with pytest.raises(ImageCountMismatchError, match="not a multiple"):
        merge_image_features(torch.zeros(1, 5, 4), ids, IMG, torch.zeros(2, 2, 4))
