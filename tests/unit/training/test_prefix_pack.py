"""Shared-prefix packing of understanding conversations: same loss and gradients as the conversations apart."""

from __future__ import annotations

import pytest
import torch

from vargpt.config import LLMConfig, TrainConfig, VisionTowerConfig
from vargpt.data.collate import IGNORE_INDEX
from vargpt.llm.backbone import LLMBackbone, shared_prefix_allowed
from vargpt.training.base_llava import PrefixPack, UnderstandingData, UnderstandingSample, _loss, pack_shared_prefixes
from vargpt.understanding.llava import Llava
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import VisionTower

VT = VisionTowerConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, projection_dim=16)
IMG, P, X = 39, 4, IGNORE_INDEX


def _model(arch: str, image_attention: str) -> Llava:
    torch.manual_seed(0)
    llm = LLMBackbone.from_config(LLMConfig(architecture=arch, vocab_size=40, hidden_size=24, intermediate_size=48,
                                            num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    return Llava(VisionTower.from_config(VT), UnderstandingProjector(32, 24), llm, image_token_id=IMG,
                 image_attention=image_attention)


def _sample(question: list[int], answer: list[int], row: int) -> UnderstandingSample:
    """``<bos> USER <image x P> question ASSISTANT answer``, loss on the answer."""
    prompt = [1, 3] + [IMG] * P + question + [4]
    return UnderstandingSample(prompt + answer, [X] * len(prompt) + answer, [row])


def _samples() -> list[UnderstandingSample]:
    return [
        _sample([5, 6], [7, 2], 0), _sample([8], [9, 10, 2], 1), _sample([5, 11, 12], [13, 2], 0),
        _sample([14], [15, 2], 0), _sample([16, 17], [18, 2], 2), _sample([8, 6], [19, 2], 1),
    ]


def test_packs_share_the_prefix_and_keep_every_branch():
    packs = pack_shared_prefixes(_samples(), max_branches=2, image_token_id=IMG)
    assert [p.num_samples for p in packs] == [2, 1, 2, 1]  # row 0: 3 samples -> 2 + 1; row 1: 2; row 2: 1
    first = packs[0]
    n = 2 + P + 1  # <bos> USER, the image slots and the questions' common first token
    assert first.input_ids == [1, 3] + [IMG] * P + [5] + [6, 4, 7, 2] + [11, 12, 4, 13, 2]
    assert first.segments == [0] * n + [1] * 4 + [2] * 5
    assert first.positions == list(range(n)) + list(range(n, n + 4)) + list(range(n, n + 5))
    assert first.labels == [X] * (n + 2) + [7, 2] + [X] * 3 + [13, 2]
    assert first.image_rows == [0]
    single = packs[1]  # a pack of one is the plain sequence
    assert single.input_ids == _samples()[3].input_ids and set(single.segments) == {0}


def test_prefix_never_takes_a_supervised_token():
    # same question, different answers: the shared prefix must stop before "ASSISTANT" so that each
    # answer token is predicted inside its own branch
    a, b = _sample([5], [7, 2], 0), _sample([5], [8, 2], 0)
    (pack,) = pack_shared_prefixes([a, b], max_branches=4, image_token_id=IMG)
    n = pack.segments.count(0)
    assert pack.labels[:n] == [X] * n
    for branch in (1, 2):
        first = pack.segments.index(branch)
        assert pack.labels[first] == X


def test_shared_prefix_mask():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    allowed = shared_prefix_allowed(seg)[0]
    assert allowed[3].tolist() == [True, True, True, True, False, False]  # prefix + own branch, causal
    assert allowed[4].tolist() == [True, True, False, False, True, False]  # not the other branch
    assert not allowed[:5, 5].any() and allowed[5, 5]  # no token sees padding; padding sees itself


@pytest.mark.parametrize("image_attention", ["causal", "separate"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_gradients_equal_unpacked(arch, image_attention):
    model = _model(arch, image_attention)
    feats = torch.randn(3, P, 32)
    data = UnderstandingData(_samples(), feats, pad_id=0)
    packed = data.packed(3, IMG)
    assert len(packed) < len(data) and packed.num_conversations == len(data)

    def loss_and_grads(d: UnderstandingData) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = _loss(model, d.collate(list(d.samples)))["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want_loss, want_grads = loss_and_grads(data)
    got_loss, got_grads = loss_and_grads(packed)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_packing_validation():
    with pytest.raises(ValueError, match="max_branches"):
        pack_shared_prefixes(_samples(), max_branches=0, image_token_id=IMG)
    data = UnderstandingData(_samples(), torch.zeros(3, P, 32), pad_id=0).packed(2, IMG)
    with pytest.raises(ValueError, match="packed already"):
        data.packed(2, IMG)
    with pytest.raises(ValueError, match="prefix_pack"):
        TrainConfig(prefix_pack=-1)
    assert isinstance(data.samples[0], PrefixPack)
