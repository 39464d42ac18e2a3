"""VisualDecoder: SPEC section 4 key layout, init (SPEC 2.9), the embed/blocks seam, class dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vargpt.config import VARGPTConfig
from vargpt.visual_decoder.decoder import VisualDecoder


@pytest.fixture(scope="module")
def tiny():
    cfg = VARGPTConfig.from_name("tiny")
    return cfg.visual_decoder, cfg.vqvae


def _spec_section4_shapes(dc, vq) -> dict[str, tuple[int, ...]]:
    """``vargpt_gen.*`` keys and shapes as listed in SPEC section 4, written out for the tiny sizes."""
    C, L, S, Z, K, H = dc.width, vq.tokens_total, vq.num_scales, vq.z_channels, vq.vocab_size, dc.num_heads
    M = dc.mlp_hidden
    shapes = {
        "word_embed.weight": (C, Z), "word_embed.bias": (C,), "class_emb.weight": (dc.num_classes + 1, C),
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_embed.weight": (S, C),
        "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (K, C), "head.bias": (K,),
    }
    for i in range(dc.depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "attn.scale_mul_1H11": (1, H, 1, 1), p + "attn.q_bias": (C,), p + "attn.v_bias": (C,),
            p + "attn.zero_k_bias": (C,), p + "attn.mat_qkv.weight": (3 * C, C),
            p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
            p + "ffn.fc1.weight": (M, C), p + "ffn.fc1.bias": (M,),
            p + "ffn.fc2.weight": (C, M), p + "ffn.fc2.bias": (C,),
            p + "ada_lin.1.weight": (6 * C, C), p + "ada_lin.1.bias": (6 * C,),
        }
    return shapes


def test_state_dict_matches_spec_section4_strict(tiny):
    dc, vq = tiny
    dc = dc.__class__(**{**dc.__dict__, "class_embed": "table"})  # VAR's class table (tiny adds a word table)
    model = VisualDecoder(dc, vq)
    shapes = _spec_section4_shapes(dc, vq)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == shapes
    # An upstream-style state dict (random values, recomputed-or-stored buffers) loads strictly.
    state = {k: torch.randn(s) for k, s in shapes.items()}
    state["lvl_1L"] = model.lvl_1L.clone()
    state["attn_bias_for_masking"] = model.attn_bias_for_masking.clone()
    for i in range(dc.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(dc.width)
    other = VisualDecoder(dc, vq)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.head.weight, state["head.weight"])
    assert other.lvl_1L.dtype == torch.int64


def test_init_weights_spec_2_9(tiny):
    dc, vq = tiny
    torch.manual_seed(0)
    model = VisualDecoder(dc, vq)
    C, std = dc.width, dc.resolved_init_std
    assert math.isclose(std, math.sqrt(1 / (3 * C)))
    assert model.head.bias.abs().sum() == 0
    assert model.head.weight.std().item() == pytest.approx(std * dc.init_head, rel=0.1)
    assert model.pos_1LC.std().item() == pytest.approx(std, rel=0.1)
    for block in model.blocks:
        ada = block.ada_lin[1].weight
        assert ada[: 2 * C].std().item() == pytest.approx(std * dc.init_adaln_gamma, rel=0.1)
        assert ada[2 * C:].std().item() == pytest.approx(std * dc.init_adaln, rel=0.1)
        assert block.ffn.fc2.weight.std().item() == pytest.approx(std / math.sqrt(2 * dc.depth), rel=0.1)
        assert block.ffn.fc1.weight.std().item() == pytest.approx(std, rel=0.1)
        assert torch.allclose(block.attn.scale_mul_1H11, torch.full_like(block.attn.scale_mul_1H11, math.log(4)))
        assert block.attn.q_bias.abs().sum() == 0 and block.ada_lin[1].bias.abs().sum() == 0


def test_no_global_patching_linear_built_after_is_initialised(tiny):
    VisualDecoder(*tiny)
    lin, ln = nn.Linear(64, 64), nn.LayerNorm(64)
    assert lin.weight.abs().sum() > 0 and lin.weight.std() > 0.01  # kaiming-uniform default init
    assert torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))


def test_seam_forward_equals_embed_then_blocks(tiny):
    dc, vq = tiny
    model = VisualDecoder(dc, vq).eval()
    B, L = 3, vq.tokens_total
    labels = torch.tensor([0, 4, dc.num_classes])
    x_BlZ = torch.randn(B, L - 1, vq.z_channels)
    logits = model(labels, x_BlZ)
    assert logits.shape == (B, L, vq.vocab_size)
    cond = model.condition(labels)
    h = model.embed_tokens(cond, x_BlZ)
    assert h.shape == (B, L, dc.width)
    assert torch.equal(model.forward_blocks(h, cond, attn_bias=model.causal_bias()), logits)
    # embed_start / embed_scale are slices of embed_tokens.
    assert torch.allclose(model.embed_start(cond), h[:, :1], atol=1e-6)
    b, e = model.offsets[2]
    assert torch.allclose(model.embed_scale(2, x_BlZ[:, b - 1:e - 1]), h[:, b:e], atol=1e-6)


def test_class_dropout_only_in_training(tiny):
    dc, vq = tiny
    model = VisualDecoder(dc, vq)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head_nm.ada_lin[1].weight.normal_()
    labels = torch.zeros(64, dtype=torch.long)
    x = torch.randn(64, vq.tokens_total - 1, vq.z_channels)
    model.eval()
    ref = model(labels, x)
    assert torch.equal(model(labels, x), ref)
    uncond = model.eval()(torch.full_like(labels, dc.num_classes), x)
    model.train()
    out = model(labels, x)
    dropped = torch.isclose(out, uncond, atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, ref, atol=1e-5).flatten(1).all(1)
    assert (dropped | kept).all()
    assert 0 < dropped.sum() < 64 * 0.5  # rate 0.1 of 64 rows


def test_scale_loss_weighting_gives_every_scale_the_same_weight():
    from vargpt.visual_decoder.loss import code_loss, token_weights

    patch_nums = (1, 2, 3)
    w_tok, w_scale = token_weights(patch_nums, "token"), token_weights(patch_nums, "scale")
    assert torch.allclose(w_tok.sum(), torch.tensor(1.0)) and torch.allclose(w_scale.sum(), torch.tensor(1.0))
    assert torch.allclose(w_scale[:1].sum(), w_scale[1:5].sum())
    assert torch.allclose(w_scale[1:5].sum(), w_scale[5:].sum())
    g = torch.Generator().manual_seed(0)
    logits, gt = torch.randn(2, 14, 5, generator=g), torch.randint(0, 5, (2, 14), generator=g)
    assert torch.allclose(code_loss(logits, gt, w_tok), torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                                                         gt.flatten()))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gt.flatten(), reduction="none").view(2, 14)
    per_scale = torch.stack([ce[:, :1].mean(), ce[:, 1:5].mean(), ce[:, 5:].mean()])
    assert torch.allclose(code_loss(logits, gt, w_scale), per_scale.mean())
    with pytest.raises(ValueError, match="weighting"):
        token_weights(patch_nums, "pixel")


def test_power_loss_weighting_puts_count_to_the_power_on_each_scale():
    from vargpt.config import ConfigError, VisualDecoderConfig
    from vargpt.visual_decoder.loss import token_weights

    patch_nums = (1, 2, 3)  # 1, 4, 9 tokens
    assert torch.allclose(token_weights(patch_nums, "power", 1.0), token_weights(patch_nums, "token"))
    assert torch.allclose(token_weights(patch_nums, "power", 0.0), token_weights(patch_nums, "scale"))
    w = token_weights(patch_nums, "power", 1.5)
    totals = torch.stack([w[:1].sum(), w[1:5].sum(), w[5:].sum()])
    expected = torch.tensor([1.0, 4.0 ** 1.5, 9.0 ** 1.5])
    assert torch.allclose(totals, expected / expected.sum(), atol=1e-6)
    assert torch.allclose(w[5:], w[5].expand(9))  # even within a scale
    with pytest.raises(ConfigError, match="loss_power"):
        VisualDecoderConfig(depth=1, width=8, num_heads=2, num_classes=2, loss_weighting="power", loss_power=-1.0)


def test_min_scale_share_lifts_the_first_scales():
    from vargpt.config import ConfigError, VisualDecoderConfig
    from vargpt.visual_decoder.loss import token_weights

    patch_nums = (1, 2, 3)  # power 2: shares 1 : 16 : 81
    w = token_weights(patch_nums, "power", 2.0, min_share=0.1)
    totals = torch.stack([w[:1].sum(), w[1:5].sum(), w[5:].sum()])
    lifted = torch.tensor([0.1, 16 / 98, 81 / 98])  # 1/98 raised to 0.1, then all renormalised
    assert torch.allclose(totals, lifted / lifted.sum(), atol=1e-6)
    assert torch.allclose(w[1:5], w[1].expand(4)) and torch.allclose(w.sum(), torch.tensor(1.0))
    assert torch.equal(token_weights(patch_nums, "power", 2.0, min_share=0.0), token_weights(patch_nums, "power", 2.0))
    with pytest.raises(ValueError, match="min_share"):
        token_weights(patch_nums, "token", min_share=0.5)
    with pytest.raises(ConfigError, match="loss_min_scale_share"):
        VisualDecoderConfig(depth=1, width=8, num_heads=2, num_classes=2, loss_min_scale_share=0.2)


def test_sincos_positions_are_local_across_scales():
    from vargpt.config import ConfigError, VisualDecoderConfig
    from vargpt.tokenizer.scales import scale_offsets
    from vargpt.visual_decoder.decoder import sincos_positions

    patch_nums, C, std = (1, 2, 4, 8), 64, 0.05
    pos_LC = sincos_positions(patch_nums, C, std=std)
    assert pos_LC.shape == (sum(p * p for p in patch_nums), C)
    assert math.isclose(float(pos_LC.pow(2).mean().sqrt()), std, rel_tol=1e-4)
    offsets = scale_offsets(patch_nums)
    coarse = pos_LC[offsets[1][0]:offsets[1][1]]  # 2x2: (0,0) (0,1) (1,0) (1,1)
    fine = pos_LC[offsets[3][0]:offsets[3][1]].view(8, 8, C)
    for k, (qi, qj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        sim = torch.nn.functional.cosine_similarity(fine, coarse[k].view(1, 1, C), dim=-1)
        i, j = divmod(int(sim.argmax()), 8)
        assert (i // 4, j // 4) == (qi, qj)  # the most similar fine token lies under the coarse one
    # neighbours are more alike than distant tokens
    assert torch.cosine_similarity(fine[3, 3], fine[3, 4], 0) > torch.cosine_similarity(fine[3, 3], fine[3, 7], 0)
    # the decoder uses it only when asked; the default stays VAR's random init
    tiny = VARGPTConfig.from_name("tiny")
    dc_var = VisualDecoderConfig(**{**tiny.visual_decoder.__dict__, "pos_init": "trunc_normal"})
    dc_sc = VisualDecoderConfig(**{**tiny.visual_decoder.__dict__, "pos_init": "sincos"})
    dec = VisualDecoder(dc_sc, tiny.vqvae)
    assert torch.allclose(dec.pos_1LC[0], sincos_positions(tiny.vqvae.patch_nums, dc_sc.width,
                                                           std=dc_sc.resolved_init_std))
    assert not torch.allclose(VisualDecoder(dc_var, tiny.vqvae).pos_1LC[0], dec.pos_1LC[0])
    with pytest.raises(ConfigError, match="pos_init"):
        VisualDecoderConfig(pos_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions((1, 2), 6, std=1.0)


def test_rope_2d_makes_attention_depend_on_offsets_only():
    """The 2D rotary code: a query/key score depends on the two tokens' offset, not on where they are, and
    tokens of every scale share the frame (a 1x1 token sits at the image centre)."""
    from vargpt.visual_decoder.blocks import apply_rope
    from vargpt.visual_decoder.decoder import rope_2d_angles

    patch_nums, c = (1, 2, 4, 8), 16
    cos_Lc, sin_Lc = rope_2d_angles(patch_nums, c)
    assert cos_Lc.shape == sin_Lc.shape == (1 + 4 + 16 + 64, c)
    torch.testing.assert_close(cos_Lc ** 2 + sin_Lc ** 2, torch.ones_like(cos_Lc))
    fine = 1 + 4 + 16  # first 8x8 token
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, c, generator=g), torch.randn(1, 1, 1, c, generator=g)

    def score(qi: int, ki: int) -> float:
        rq = apply_rope(q, cos_Lc[qi:qi + 1], sin_Lc[qi:qi + 1])
        rk = apply_rope(k, cos_Lc[ki:ki + 1], sin_Lc[ki:ki + 1])
        assert torch.allclose(rq.norm(), q.norm())  # a rotation: cosine attention keeps its form
        return float((rq * rk).sum())

    def cell(i: int, j: int) -> int:
        return fine + 8 * i + j

    # the same offset (+1 row, +2 columns) at two places gives the same score; another offset does not
    assert score(cell(1, 1), cell(2, 3)) == pytest.approx(score(cell(4, 3), cell(5, 5)), abs=1e-5)
    assert score(cell(1, 1), cell(2, 3)) != pytest.approx(score(cell(1, 1), cell(3, 2)), abs=1e-3)
    # a token scores itself as without the code (offset 0), wherever it is
    assert score(cell(1, 1), cell(1, 1)) == pytest.approx(float((q * k).sum()), abs=1e-5)
    assert score(cell(6, 2), cell(6, 2)) == pytest.approx(float((q * k).sum()), abs=1e-5)
    # one frame for all scales: the 1x1 token (centre, 4 cells in) sees 8x8 cell (4, 4) at offset (0.5, 0.5),
    # as the 2x2 token (1, 1) (6 cells in) sees cell (6, 6)
    assert score(0, cell(4, 4)) == pytest.approx(score(1 + 3, cell(6, 6)), abs=1e-5)
    assert score(0, cell(4, 4)) != pytest.approx(score(1 + 3, cell(4, 4)), abs=1e-3)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles((1, 2), 6)


def test_rope_2d_is_off_in_var_and_on_in_tiny(tiny):
    from vargpt.config import VisualDecoderConfig

    dc, vq = tiny
    assert dc.rope_2d and not VARGPTConfig.from_name("vargpt-v1-7b").visual_decoder.rope_2d
    torch.manual_seed(0)
    with_rope = VisualDecoder(dc, vq).eval()
    with torch.no_grad():  # VAR's init makes the attention branch ~1e-3 of the output: use larger weights
        for p in with_rope.parameters():
            p.normal_(0.0, 0.1)
    without = VisualDecoder(VisualDecoderConfig(**{**dc.__dict__, "rope_2d": False}), vq).eval()
    without.load_state_dict(with_rope.state_dict(), strict=True)  # no new parameters or saved buffers
    labels = torch.tensor([0, 1])
    x = torch.randn(2, vq.tokens_total - 1, vq.z_channels)
    with torch.no_grad():
        a, b = with_rope(labels, x), without(labels, x)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # the 1x1 token sees only itself: offset 0, no rotation
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 0.05


def test_word_class_embedding_composes_class_names(tiny):
    """``class_embed="words"``: a named class's condition is the sum of its words' embeddings (shared across
    classes), the unconditional class keeps its table row, and the table mode is VAR's lookup."""
    from vargpt.config import ConfigError, VisualDecoderConfig

    dc, vq = tiny
    names = ("red star", "blue star", "red circle")
    dec = VisualDecoder(VisualDecoderConfig(**{**dc.__dict__, "class_embed": "words", "class_names": names}), vq)
    with torch.no_grad():
        dec.class_word_emb.weight.normal_()
        dec.class_word_emb.weight[-1].zero_()  # padding row
    cond = dec.condition(torch.tensor([0, 1, 2, dec.uncond_label]))
    words = sorted({"red", "star", "blue", "circle"})
    w = {n: dec.class_word_emb.weight[words.index(n)] for n in words}
    torch.testing.assert_close(cond[0], w["red"] + w["star"])
    torch.testing.assert_close(cond[1], w["blue"] + w["star"])
    torch.testing.assert_close(cond[2], w["red"] + w["circle"])
    torch.testing.assert_close(cond[3], dec.class_emb.weight[dec.uncond_label])
    # an unnamed class (fewer names than num_classes) or an empty name conditions on its table row
    torch.testing.assert_close(dec.condition(torch.tensor([3]))[0], dec.class_emb.weight[3])
    words_cfg = {**dc.__dict__, "class_embed": "words"}
    empty = VisualDecoder(VisualDecoderConfig(**{**words_cfg, "class_names": ("", "a b")}), vq)
    torch.testing.assert_close(empty.condition(torch.tensor([0]))[0], empty.class_emb.weight[0])
    # the same names rebuild the same word table, so a saved decoder reloads exactly
    again = VisualDecoder(dec.cfg, vq)
    again.load_state_dict(dec.state_dict(), strict=True)
    torch.testing.assert_close(again.condition(torch.tensor([0, 1, 2])), cond[:3])
    # VAR's table mode: a plain lookup, no word table
    table = VisualDecoder(dc.__class__(**{**dc.__dict__, "class_embed": "table"}), vq)
    assert not hasattr(table, "class_word_emb")
    torch.testing.assert_close(table.condition(torch.tensor([2])), table.class_emb.weight[2:3])
    with pytest.raises(ConfigError, match="class_embed"):
        VisualDecoderConfig(class_embed="bag")


def test_with_composed_classes_samples_unseen_word_combinations(tiny):
    """``with_composed_classes``: new classes made of known words get the sum of those words' embeddings, old
    labels keep their conditions and logits, and what cannot be composed is refused with a ConfigError."""
    from vargpt.config import ConfigError, VisualDecoderConfig

    dc, vq = tiny
    names = ("small red star left", "large blue circle top", "small blue star top")
    dec = VisualDecoder(VisualDecoderConfig(**{**dc.__dict__, "class_embed": "words", "class_names": names}), vq)
    with torch.no_grad():
        dec.class_word_emb.weight[:-1].normal_()
    dec.eval()
    composed, labels = dec.with_composed_classes(["large red circle left", "small blue circle top"])
    assert labels.tolist() == [3, 4] and composed.cfg.class_names[3:] == ("large red circle left",
                                                                          "small blue circle top")
    assert not composed.training and composed is not dec and dec.cfg.class_names == names  # a copy
    words = sorted({w for n in names for w in n.split()})
    w = {n: dec.class_word_emb.weight[words.index(n)] for n in words}
    with torch.no_grad():
        cond = composed.condition(torch.tensor([0, 1, 2, 3, 4, dec.uncond_label]))
        torch.testing.assert_close(cond[3], w["large"] + w["red"] + w["circle"] + w["left"])
        torch.testing.assert_close(cond[4], w["small"] + w["blue"] + w["circle"] + w["top"])
        torch.testing.assert_close(cond[[0, 1, 2, 5]], dec.condition(torch.tensor([0, 1, 2, dec.uncond_label])))
        x = torch.randn(2, vq.tokens_total - 1, vq.z_channels)
        torch.testing.assert_close(composed(torch.tensor([0, 2]), x), dec(torch.tensor([0, 2]), x))
        assert (composed(torch.tensor([3, 4]), x) - dec(torch.tensor([0, 2]), x)).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="green"):
        dec.with_composed_classes(["small green star left"])
    with pytest.raises(ConfigError, match="empty"):
        dec.with_composed_classes([" "])
    with pytest.raises(ConfigError, match="num_classes"):
        dec.with_composed_classes(["small red star left"] * dc.num_classes)
    with pytest.raises(ConfigError, match="class_embed='words'"):
        table = VisualDecoderConfig(**{**dc.__dict__, "class_embed": "table", "class_names": names})
        VisualDecoder(table, vq).with_composed_classes(["small red star top"])
