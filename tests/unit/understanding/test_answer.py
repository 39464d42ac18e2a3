"""The greedy KV-cached answer loop: equals step-by-step full recomputation; batching/left padding is neutral."""

from __future__ import annotations

import pytest
import torch

from vargpt.config import LLMConfig, VisionTowerConfig
from vargpt.llm.backbone import LLMBackbone
from vargpt.llm.merge import expand_image_tokens
from vargpt.understanding.answer import greedy_generate, left_pad
from vargpt.understanding.llava import Llava
from vargpt.understanding.projector import UnderstandingProjector
from vargpt.understanding.vision_tower import VisionTower

VT = VisionTowerConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, projection_dim=16)
IMG, EOS = 39, 2


def _model(arch: str = "llama", image_attention: str = "causal") -> Llava:
    torch.manual_seed(0)
    llm = LLMBackbone.from_config(LLMConfig(architecture=arch, vocab_size=40, hidden_size=24, intermediate_size=48,
                                            num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    return Llava(VisionTower.from_config(VT), UnderstandingProjector(32, 24), llm, image_token_id=IMG,
                 image_attention=image_attention).eval()


def _reference(model: Llava, ids: list[int], pixels: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache)."""
    seq = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq]), pixels_N3HW=pixels).logits_BTV
        nxt = int(logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("image_attention", ["causal", "separate"])
def test_cached_batched_greedy_equals_recomputation(image_attention):
    for arch in ("llama", "qwen2"):
        model = _model(arch, image_attention)
        prompts = [expand_image_tokens([1, IMG, 5, 6, 7, 8], IMG, 4), expand_image_tokens([1, IMG, 9], IMG, 4)]
        pixels = torch.randn(2, 3, 16, 16)
        ids, mask = left_pad(prompts, pad_id=0)
        with torch.no_grad():
            got = greedy_generate(model, ids, mask, pixels_N3HW=pixels, eos_id=EOS, max_new_tokens=6)
            want = [_reference(model, p, pixels[i:i + 1], 6) for i, p in enumerate(prompts)]
        assert got == want


@pytest.mark.parametrize("image_attention", ["causal", "separate"])
def test_separate_image_slots_depend_only_on_their_own_feature(image_attention):
    """``image_attention="separate"``: changing slot 0's feature leaves the other slots' hidden states alone
    (with LLaVA's causal attention it does not), while the text after the image still reads it."""
    model = _model(image_attention=image_attention)
    ids = torch.tensor([expand_image_tokens([1, 5, IMG, 6, 7], IMG, 4)])
    slots = (ids[0] == IMG).nonzero().flatten()
    feats = torch.randn(1, 4, 32)
    changed = feats.clone()
    changed[0, 0] += 3.0
    with torch.no_grad():
        a = model(ids, image_feats_NPF=feats, attention_mask=torch.ones_like(ids)).hidden_BTD[0]
        b = model(ids, image_feats_NPF=changed, attention_mask=torch.ones_like(ids)).hidden_BTD[0]
    later_slots = (a[slots[1:]] - b[slots[1:]]).abs().max()
    assert (a[-1] - b[-1]).abs().max() > 1e-3
    assert torch.equal(a[: slots[0]], b[: slots[0]])
    if image_attention == "separate":
        assert later_slots < 1e-6
    else:
        assert later_slots > 1e-3


def test_llava_rejects_unknown_image_attention_and_image_slots_after_prefill():
    with pytest.raises(ValueError, match="image_attention"):
        _model(image_attention="bidirectional")
    model = _model(image_attention="separate")
    with torch.no_grad():
        cache = model(torch.tensor([[1, 5]]), use_cache=True).cache
        with pytest.raises(ValueError, match="prefill"):
            model(torch.tensor([[IMG] * 4]), image_feats_NPF=torch.randn(1, 4, 32), cache=cache)
