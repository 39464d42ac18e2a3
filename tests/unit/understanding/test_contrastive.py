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


def _tiny_contrastive_model():
    from vargpt.config import VisionTowerConfig
    from vargpt.understanding.contrastive import ContrastiveModel, TextEncoder
    from vargpt.understanding.vision_tower import VisionTower

    torch.manual_seed(0)
    vt = VisionTowerConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, projection_dim=16)
    return ContrastiveModel(VisionTower.from_config(vt), TextEncoder(20, width=16, depth=1, heads=2, max_len=8),
                            16, answer_head=True).eval()


def test_vision_pretraining_loss_returns_per_pair_losses_that_average_to_it():
    from vargpt.training.base_vision import _make_loss
    from vargpt.training.loop import SAMPLE_LOSSES

    model = _tiny_contrastive_model()
    B = 4
    answers = torch.zeros(3, 20, dtype=torch.bool)
    answers[[0, 1, 2], [3, 4, 5]] = True  # one question for each of pairs 0-2; pair 3 has none
    batch = {"pixels": torch.randn(B, 3, 16, 16), "ids": torch.randint(1, 20, (B, 6)),
             "mask": torch.ones(B, 6, dtype=torch.long), "positives": torch.eye(B, dtype=torch.bool),
             "question_ids": torch.randint(1, 20, (3, 5)), "question_mask": torch.ones(3, 5, dtype=torch.long),
             "answers": answers, "question_index": torch.arange(3), "question_pair": torch.arange(3)}
    out = _make_loss(answer_weight=4.0)(model, batch)
    per = out[SAMPLE_LOSSES]
    assert per.shape == (B,) and not per.requires_grad
    # the batch loss weighs the answer term over the 3 pairs with a question, the per-pair terms over all 4
    assert torch.allclose(per.sum(), B * out["contrastive"] + 3 * 4.0 * out["answer"], atol=1e-5)
    assert all(v.numel() == 1 for k, v in out.items() if k != SAMPLE_LOSSES)


def test_several_questions_about_one_image_each_get_their_own_answer_term():
    """M questions over B pairs: question m reads pair ``question_pair[m]``'s image and text row
    ``question_index[m]``; the answer loss is the mean over questions, a pair's term the mean of its own."""
    model = _tiny_contrastive_model()
    g = torch.Generator().manual_seed(1)
    B = 3
    base = {"pixels_B3HW": torch.randn(B, 3, 16, 16, generator=g), "ids_BT": torch.randint(1, 20, (B, 6), generator=g),
            "mask_BT": torch.ones(B, 6, dtype=torch.long), "positives_BB": torch.eye(B, dtype=torch.bool)}
    q_ids = torch.randint(1, 20, (2, 5), generator=g)  # two distinct question texts
    q_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    targets = torch.zeros(4, 20, dtype=torch.bool)
    targets[[0, 1, 2, 3], [3, 7, 7, 9]] = True
    pair, index = torch.tensor([0, 0, 2, 2]), torch.tensor([0, 1, 0, 1])  # pair 1 asks nothing
    with torch.no_grad():
        out = model(**base, question_ids_UQ=q_ids, question_mask_UQ=q_mask, answer_targets_MV=targets,
                    question_index_M=index, question_pair_M=pair)
        # each question alone, with its text as the only row: the same term
        alone = torch.stack([model(**base, question_ids_UQ=q_ids[index[m:m + 1]],
                                   question_mask_UQ=q_mask[index[m:m + 1]], answer_targets_MV=targets[m:m + 1],
                                   question_pair_M=pair[m:m + 1])["answer"] for m in range(4)])
    assert torch.allclose(out["answer"], alone.mean(), atol=1e-6)
    expected = torch.stack([alone[:2].mean(), torch.tensor(0.0), alone[2:].mean()])
    assert torch.allclose(out["answer_per_sample"], expected, atol=1e-6)
    assert not torch.allclose(alone[0], alone[2])  # another image, another answer term
