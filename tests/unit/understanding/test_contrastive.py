"""Contrastive and answer losses of the vision-tower pretraining, and their per-pair terms (replay)."""

import torch
import torch.nn.functional as F

from vargpt.understanding.contrastive import contrastive_loss, multi_hot_cross_entropy


def test_contrastive_loss_is_clip_loss_with_one_positive_and_per_pair_terms_average_to_it():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    eye = torch.eye(5, dtype=torch.bool)
    assert torch.allclose(contrastive_loss(img, txt, 10.0, eye), clip)
    per = contrastive_loss(img, txt, 10.0, eye, reduction="none")
    assert per.shape == (5,) and torch.allclose(per.mean(), clip)
    zero = torch.tensor([0])
    expected0 = 0.5 * (F.cross_entropy(logits[:1], zero) + F.cross_entropy(logits.T[:1], zero))
    assert torch.allclose(per[0], expected0)


def test_multi_hot_cross_entropy_skips_rows_without_targets():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([[True, False, False], [False, True, True], [False, False, False]])
    per = multi_hot_cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(per[0], F.cross_entropy(logits[:1], torch.tensor([0])))
    assert torch.allclose(per[1], -logits[1].log_softmax(-1)[1:].mean())
    assert per[2] == 0
    assert torch.allclose(multi_hot_cross_entropy(logits, targets), per[:2].mean())


def test_vision_pretraining_loss_returns_per_pair_losses_that_average_to_it():
    from vargpt.config import VisionTowerConfig
    from vargpt.training.base_vision import _make_loss
    from vargpt.training.loop import SAMPLE_LOSSES
    from vargpt.understanding.contrastive import ContrastiveModel, TextEncoder
    from vargpt.understanding.vision_tower import VisionTower

    torch.manual_seed(0)
    vt = VisionTowerConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, projection_dim=16)
    model = ContrastiveModel(VisionTower.from_config(vt), TextEncoder(20, width=16, depth=1, heads=2, max_len=8),
                             16, answer_head=True)
    B = 4
    answers = torch.zeros(B, 20, dtype=torch.bool)
    answers[[0, 1, 2], [3, 4, 5]] = True  # pair 3 has no question
    batch = {"pixels": torch.randn(B, 3, 16, 16), "ids": torch.randint(1, 20, (B, 6)),
             "mask": torch.ones(B, 6, dtype=torch.long), "positives": torch.eye(B, dtype=torch.bool),
             "question_ids": torch.randint(1, 20, (B, 5)), "question_mask": torch.ones(B, 5, dtype=torch.long),
             "answers": answers}
    out = _make_loss(answer_weight=4.0)(model, batch)
    per = out[SAMPLE_LOSSES]
    assert per.shape == (B,) and not per.requires_grad
    # the batch loss weighs the answer term over the 3 pairs with a question, the per-pair terms over all 4
    assert torch.allclose(per.sum(), B * out["contrastive"] + 3 * 4.0 * out["answer"], atol=1e-5)
    assert all(v.numel() == 1 for k, v in out.items() if k != SAMPLE_LOSSES)
