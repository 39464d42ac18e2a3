"""LLMBackbone: embeddings path, 4D float masks, block-wise KV-cache extension, left padding."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vargpt.config import LLMConfig
from vargpt.llm.backbone import (
    LLMBackbone,
    add_special_tokens,
    additive_mask,
    block_causal_mask,
    block_extension_mask,
    positions_from_padding,
)
from vargpt.special_tokens import ADDED_TOKENS

ARCHS = ["llama", "qwen2"]
IMPLS = ["eager", "sdpa"]


def tiny_llm(arch: str, impl: str) -> LLMBackbone:
    cfg = LLMConfig(architecture=arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=128, attn_implementation=impl)
    torch.manual_seed(0)
    return LLMBackbone.from_config(cfg).eval()


# ---- pure helpers --------------------------------------------------------------------------------


def test_block_causal_mask_pattern():
    m = block_causal_mask([1, 2, 1], past=2)
    assert m.shape == (1, 1, 4, 6) and m.dtype == torch.float32
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert (m[m != 0] == torch.finfo(torch.float32).min).all()


def test_plain_causal_is_blocks_of_one():
    m = block_causal_mask([1] * 5)
    assert torch.equal(m[0, 0] == 0, torch.ones(5, 5, dtype=torch.bool).tril())


def test_block_extension_mask_is_zeros_with_padding_hidden():
    m = block_extension_mask(2, 3, past=4)
    assert m.shape == (2, 1, 3, 7) and (m == 0).all()
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    m = block_extension_mask(2, 3, past=4, padding_mask=pad)
    assert (m[0, 0, :, :2] < 0).all() and (m[0, 0, :, 2:] == 0).all() and (m[1] == 0).all()


def test_additive_mask_rejects_float_and_shapes():
    with pytest.raises(TypeError):
        additive_mask(torch.zeros(2, 2))
    assert additive_mask(torch.ones(3, 2, 2, dtype=torch.bool)).shape == (3, 1, 2, 2)


def test_positions_from_padding_left_and_right():
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_padding(pad).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert positions_from_padding(pad, 2).tolist() == [[1, 2], [2, 2]]


# ---- the module ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_on_embeddings_equals_forward_on_ids(arch):
    bb = tiny_llm(arch, "sdpa")
    ids = torch.randint(0, 64, (2, 9))
    out = bb(bb.embed(ids))
    ref = bb.model(input_ids=ids).logits
    assert out.hidden_BTD.shape == (2, 9, 32)
    torch.testing.assert_close(out.logits_BTV, ref, atol=1e-6, rtol=0)
    assert bb(bb.embed(ids), compute_logits=False).logits_BTV is None
    torch.testing.assert_close(bb.logits(out.hidden_BTD), out.logits_BTV)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_scale_by_scale_with_cache_equals_one_block_causal_pass(arch, impl):
    bb = tiny_llm(arch, impl)
    B, prefix, blocks = 2, 5, [1, 4, 9]
    emb = torch.randn(B, prefix + sum(blocks), 32)
    full = bb(emb, attention_mask=block_causal_mask([1] * prefix + blocks)).logits_BTV

    with torch.no_grad():
        out = bb(emb[:, :prefix], use_cache=True)
        cache, pieces, start = out.cache, [out.logits_BTV], prefix
        for n in blocks:
            past = cache.get_seq_length()
            pos = (past + torch.arange(n))[None].expand(B, -1)
            o = bb(emb[:, start:start + n], attention_mask=block_extension_mask(B, n, past=past),
                   position_ids=pos, cache=cache)
            cache, start = o.cache, start + n
            pieces.append(o.logits_BTV)
    step = torch.cat(pieces, dim=1)
    assert (step - full).abs().max() < 1e-5
    causal = bb(emb).logits_BTV  # the 4D mask must matter: plain causal differs inside blocks
    assert (causal - full).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_bool_4d_mask_is_made_additive_under_eager(arch):
    bb = tiny_llm(arch, "eager")
    emb = torch.randn(1, 8, 32)
    allowed = block_causal_mask([2, 2, 4]) == 0
    a = bb(emb, attention_mask=allowed).logits_BTV
    b = bb(emb, attention_mask=block_causal_mask([2, 2, 4])).logits_BTV
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_matches_unpadded(arch, impl):
    bb = tiny_llm(arch, impl)
    long_ids, short_ids = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 4))
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_ids], 1)])
    pad = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = bb(bb.embed(ids), attention_mask=pad, use_cache=True)
        ref_long = bb(bb.embed(long_ids)).logits_BTV
        ref_short = bb(bb.embed(short_ids)).logits_BTV
        assert (out.logits_BTV[0] - ref_long[0]).abs().max() < 1e-5
        assert (out.logits_BTV[1, 3:] - ref_short[0]).abs().max() < 1e-5
        # one cached decode step with the extended 2D mask
        nxt = torch.randint(0, 64, (2, 1))
        pad2 = torch.cat([pad, torch.ones(2, 1, dtype=torch.long)], 1)
        step = bb(bb.embed(nxt), attention_mask=pad2, cache=out.cache).logits_BTV
        ref = bb(bb.embed(torch.cat([short_ids, nxt[1:]], 1))).logits_BTV
        assert (step[1, -1] - ref[0, -1]).abs().max() < 1e-5


def test_block_mask_with_left_padding_and_padding_queries_finite():
    bb = tiny_llm("llama", "eager")
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]])
    emb = torch.randn(1, 6, 32)
    out = bb(emb, attention_mask=block_causal_mask([1, 1, 1, 3], padding_mask=pad),
             position_ids=positions_from_padding(pad)).logits_BTV
    ref = bb(emb[:, 2:], attention_mask=block_causal_mask([1, 3])).logits_BTV
    assert torch.isfinite(out).all()
    assert (out[:, 2:] - ref).abs().max() < 1e-5


def _toy_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>")


def test_add_special_tokens_resizes_embeddings():
    tok = _toy_tokenizer()
    cfg = LLMConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, max_position_embeddings=32)
    bb = LLMBackbone.from_config(cfg)
    added = add_special_tokens(tok, bb)
    assert added == list(ADDED_TOKENS)
    assert bb.vocab_size == len(tok) == 6 + len(ADDED_TOKENS)
    assert bb.model.get_output_embeddings().weight.shape[0] == len(tok)
    assert tok("a <image> b", add_special_tokens=False).input_ids[1] == tok.convert_tokens_to_ids("<image>")
    assert add_special_tokens(tok, bb) == []  # idempotent


def test_separate_image_tokens_mask():
    from vargpt.llm.backbone import causal_allowed, separate_image_tokens

    pad = torch.tensor([[0, 1, 1, 1, 1, 1]])  # left padding, then: text, image, image, image, text
    img = torch.tensor([[False, False, True, True, True, False]])
    allowed = separate_image_tokens(causal_allowed(pad), img)[0].int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0],  # a padding row sees only itself (never empty)
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],  # an image slot: the text before it and itself
        [0, 1, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 1],  # text after the image sees every slot
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_goes_through_without_deprecated_arguments(arch):
    """The KV cache is passed and read back under the name the installed transformers uses (``cache``
    from 5.25, ``past_key_values`` before; the old name goes in 5.40): no FutureWarning, and the same
    cache object comes back, extended."""
    import warnings

    bb = tiny_llm(arch, "sdpa")
    emb = torch.randn(1, 6, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        cache = bb.new_cache()
        out = bb(emb[:, :4], cache=cache)
        assert out.cache is cache and cache.get_seq_length() == 4
        assert bb(emb[:, 4:], cache=out.cache).cache.get_seq_length() == 6
