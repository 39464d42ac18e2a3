"""The KV-cached next-scale loop against teacher forcing, with CFG halves and B > 1 (SPEC 2.10)."""

from __future__ import annotations

import pytest
import torch

from vargpt.config import SamplingConfig, VARGPTConfig
from vargpt.generation.cache import DecoderKVCache
from vargpt.generation.next_scale import (
    class_condition,
    generate_class_images,
    next_scale_steps,
    to_pil,
)
from vargpt.generation.sampling import cfg_mix, cfg_scale
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.visual_decoder.decoder import VisualDecoder


@pytest.fixture(scope="module")
def parts():
    cfg = VARGPTConfig.from_name("tiny")
    torch.manual_seed(0)
    decoder = VisualDecoder(cfg.visual_decoder, cfg.vqvae).eval()
    with torch.no_grad():  # make every block and the head matter (init gammas and head are tiny)
        for block in decoder.blocks:
            block.ada_lin[1].weight.normal_(0, 0.05)
        decoder.head.weight.normal_(0, 0.1)
        decoder.class_emb.weight.normal_(0, 1.0)
    vqvae = MultiScaleVQVAE(cfg.vqvae).eval()
    return cfg, decoder, vqvae


def _codes(vq, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vq.vocab_size, (B, pn * pn), generator=g) for pn in vq.patch_nums]


@pytest.mark.parametrize("cfg_strength", [0.0, 2.5])
def test_cached_loop_equals_teacher_forcing(parts, cfg_strength):
    cfg, decoder, vqvae = parts
    B, S = 3, cfg.vqvae.num_scales
    idx = _codes(cfg.vqvae, B)
    labels = torch.tensor([1, 7, 30])
    with torch.no_grad():
        cond = class_condition(decoder, labels)
        assert cond.shape == (2 * B, cfg.visual_decoder.width)
        x_BlZ = vqvae.quantize.teacher_forcing_input(idx)
        x_2BLC = decoder.embed_tokens(cond, torch.cat((x_BlZ, x_BlZ)))
        tf = decoder.forward_blocks(x_2BLC, cond, attn_bias=decoder.causal_bias())
    sampling = SamplingConfig(cfg=cfg_strength, top_k=0, top_p=0.0)
    events = list(next_scale_steps(decoder, vqvae.quantize, cond, sampling=sampling, forced_idx=idx))
    assert [e.si for e in events] == list(range(S))
    for e in events:
        b, end = decoder.offsets[e.si]
        t = cfg_scale(e.si, S, cfg_strength, "linear")
        ref = cfg_mix(tf[:B, b:end], tf[B:, b:end], t)
        assert e.logits_BlK.shape == (B, end - b, cfg.vqvae.vocab_size)
        assert (e.logits_BlK - ref).abs().max() < 1e-4
    # the final f_hat is the quantizer's reconstruction from the same codes
    assert torch.allclose(events[-1].f_hat_BZhw, vqvae.quantize.idx_to_fhat(idx), atol=1e-5)


def test_step_function_seam(parts):
    """A per-token step (stand-in for projector-in -> LLM -> projector-out) is applied to the block inputs."""
    cfg, decoder, vqvae = parts
    B = 2
    idx = _codes(cfg.vqvae, B, seed=3)
    lin = torch.nn.Linear(cfg.visual_decoder.width, cfg.visual_decoder.width)
    seen = []

    def step(si, x_BlC):
        seen.append((si, x_BlC.shape[0]))
        return lin(x_BlC)

    with torch.no_grad():
        cond = class_condition(decoder, torch.tensor([2, 5]))
        x_BlZ = vqvae.quantize.teacher_forcing_input(idx)
        h = lin(decoder.embed_tokens(cond, torch.cat((x_BlZ, x_BlZ))))
        tf = decoder.forward_blocks(h, cond, attn_bias=decoder.causal_bias())
    sampling = SamplingConfig(cfg=0.0)
    events = list(next_scale_steps(decoder, vqvae.quantize, cond, sampling=sampling, step=step, forced_idx=idx))
    assert seen == [(si, 2 * B) for si in range(cfg.vqvae.num_scales)]
    for e in events:
        b, end = decoder.offsets[e.si]
        assert (e.logits_BlK - tf[:B, b:end]).abs().max() < 1e-4


def test_sampling_is_seeded_and_batched(parts):
    cfg, decoder, vqvae = parts
    labels = torch.tensor([0, 1, 2, 3])
    sampling = SamplingConfig(cfg=1.5, top_k=50, top_p=0.9)
    a = generate_class_images(decoder, vqvae, labels, sampling=sampling, generator=torch.Generator().manual_seed(1))
    b = generate_class_images(decoder, vqvae, labels, sampling=sampling, generator=torch.Generator().manual_seed(1))
    c = generate_class_images(decoder, vqvae, labels, sampling=sampling, generator=torch.Generator().manual_seed(2))
    assert [i.shape for i in a.idx_list] == [(4, pn * pn) for pn in cfg.vqvae.patch_nums]
    assert all(torch.equal(x, y) for x, y in zip(a.idx_list, b.idx_list, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.idx_list, c.idx_list, strict=True))
    assert a.images_B3HW.shape == (4, 3, cfg.vqvae.image_size, cfg.vqvae.image_size)
    assert a.images_B3HW.min() >= 0 and a.images_B3HW.max() <= 1
    assert torch.allclose(a.images_B3HW, (vqvae.decode(a.idx_list) + 1) / 2, atol=1e-5)
    # SamplingConfig.seed seeds the loop when no generator is passed
    seeded = SamplingConfig(cfg=1.5, top_k=50, top_p=0.9, seed=11)
    d = generate_class_images(decoder, vqvae, labels, sampling=seeded)
    e = generate_class_images(decoder, vqvae, labels, sampling=seeded)
    assert all(torch.equal(x, y) for x, y in zip(d.idx_list, e.idx_list, strict=True))
    pil = to_pil(a.images_B3HW)
    assert len(pil) == 4 and pil[0].size == (cfg.vqvae.image_size,) * 2 and pil[0].mode == "RGB"


def test_more_smooth_path_runs(parts):
    cfg, decoder, vqvae = parts
    sampling = SamplingConfig(cfg=1.0, top_k=20, top_p=0.0, more_smooth=True)
    events = list(next_scale_steps(decoder, vqvae.quantize, class_condition(decoder, torch.tensor([3, 4])),
                                   sampling=sampling, generator=torch.Generator().manual_seed(0)))
    assert len(events) == cfg.vqvae.num_scales
    assert torch.isfinite(events[-1].f_hat_BZhw).all()


def test_odd_rows_rejected(parts):
    cfg, decoder, vqvae = parts
    with pytest.raises(ValueError, match="2B rows"):
        next(next_scale_steps(decoder, vqvae.quantize, torch.zeros(3, cfg.visual_decoder.width)))


def test_decoder_cache_object():
    cache = DecoderKVCache(3)
    assert len(cache) == 3 and cache.length == 0
    k = torch.randn(2, 4, 5, 8)
    cache[0].append(k, k)
    cache[1].append(k, k)
    cache[2].append(k, k)
    cache[0].append(k[:, :, :2], k[:, :, :2])
    assert cache[0].length == 7 and cache.length == 7
    cache.reset()
    assert cache.length == 0 and all(layer.k_BHLc is None for layer in cache.layers)


def test_partial_forcing_keeps_the_given_scales_and_samples_the_rest(parts):
    cfg, decoder, vqvae = parts
    B, S = 2, cfg.vqvae.num_scales
    idx = _codes(cfg.vqvae, B, seed=3)
    cond = class_condition(decoder, torch.tensor([2, 5]))
    sampling = SamplingConfig(cfg=1.0, top_k=0, top_p=0.0)

    def run(forced):
        return [e.idx_Bl for e in next_scale_steps(decoder, vqvae.quantize, cond, sampling=sampling, forced_idx=forced,
                                                   generator=torch.Generator().manual_seed(0))]

    free = run(None)
    assert all(torch.equal(a, b) for a, b in zip(run([None] * S), free, strict=True))
    k = 3
    partial = run(idx[:k] + [None] * (S - k))
    assert all(torch.equal(partial[si], idx[si]) for si in range(k))
    # the sampled scales follow the forced prefix, not the free run's (different coarse scales given)
    assert any(not torch.equal(partial[si], free[si]) for si in range(k, S))
