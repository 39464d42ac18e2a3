"""Blocks of the VAR transformer: AdaLN chunk order, cosine attention, KV cache (SPEC 2.4-2.7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vargpt.generation.cache import KVCache
from vargpt.visual_decoder.blocks import AdaLNBeforeHead, AdaLNSelfAttn, SelfAttention

C, H = 16, 2


def _ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_adaln_chunk_order_by_hand():
    block = AdaLNSelfAttn(C, H, 4 * C).eval()
    _randomize(block)
    x, cond = torch.randn(2, 5, C), torch.randn(2, C)
    mod = block.ada_lin[1](F.silu(cond))
    # SPEC 2.4: rows [0:C]=gamma1, [C:2C]=gamma2, [2C:3C]=scale1, [3C:4C]=scale2, [4C:5C]=shift1, [5C:6C]=shift2
    g1, g2, s1, s2, b1, b2 = (mod[:, i * C:(i + 1) * C, None].transpose(1, 2) for i in range(6))
    h = x + g1 * block.attn(_ln(x) * (1 + s1) + b1)
    expect = h + g2 * block.ffn(_ln(h) * (1 + s2) + b2)
    assert torch.allclose(block(x, cond), expect, atol=1e-6)


def test_head_norm_scale_then_shift():
    head_nm = AdaLNBeforeHead(C)
    _randomize(head_nm)
    x, cond = torch.randn(3, 4, C), torch.randn(3, C)
    mod = head_nm.ada_lin[1](F.silu(cond))
    scale, shift = mod[:, None, :C], mod[:, None, C:]
    assert torch.allclose(head_nm(x, cond), _ln(x) * (1 + scale) + shift, atol=1e-6)


def test_cosine_attention_by_hand():
    attn = SelfAttention(C, H)
    _randomize(attn)
    with torch.no_grad():
        attn.scale_mul_1H11[0, 0] = 10.0  # clamped to ln 100
    x = torch.randn(2, 6, C)
    bias = torch.zeros(6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    qkv = x @ attn.mat_qkv.weight.T + torch.cat((attn.q_bias, torch.zeros(C), attn.v_bias))
    q, k, v = (t.view(2, 6, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    sigma = torch.exp(attn.scale_mul_1H11.clamp(max=math.log(100)))
    logits = sigma * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, C)
    assert torch.allclose(attn(x, attn_bias=bias), attn.proj(out), atol=1e-5)
    assert attn.zero_k_bias.abs().sum() == 0
    assert "zero_k_bias" in attn.state_dict()


def test_kv_cache_scale_by_scale_equals_masked():
    attn = SelfAttention(C, H)
    _randomize(attn)
    x = torch.randn(2, 5, C)
    d = torch.tensor([0, 1, 1, 1, 1])
    bias = torch.zeros(5, 5).masked_fill(d[None, :] > d[:, None], float("-inf"))
    full = attn(x, attn_bias=bias)
    cache = KVCache()
    a = attn(x[:, :1], cache=cache)
    b = attn(x[:, 1:], cache=cache)
    assert cache.length == 5
    assert torch.allclose(torch.cat((a, b), 1), full, atol=1e-6)
    cache.reset()
    assert cache.length == 0
