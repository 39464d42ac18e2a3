"""Text-loop pieces: next-token choice (greedy, sampled per row, banned, forced) and the LLM context."""

from __future__ import annotations

import torch

from vargpt.config import LLMConfig
from vargpt.generation.sampling import sample_per_row
from vargpt.generation.text import LLMContext, ban_tokens, next_tokens
from vargpt.llm.backbone import LLMBackbone


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_greedy_ban_and_force():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 0.0]])
    assert next_tokens(logits).tolist() == [1, 0]
    banned = torch.tensor([[False, True, False, False], [False, False, False, False]])
    assert next_tokens(logits, banned_BV=banned).tolist() == [3, 0]
    assert next_tokens(logits, forced_B=torch.tensor([-1, 2])).tolist() == [1, 2]
    assert torch.equal(ban_tokens(logits, banned)[0], torch.tensor([0.0, float("-inf"), 1.0, 2.0]))
    assert logits[0, 1] == 5.0  # inputs are not mutated


def test_sampled_rows_use_only_their_own_generator():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    together = next_tokens(logits, temperature=1.0, generators=_gens(1, 2, 3))
    alone = [next_tokens(logits[i:i + 1], temperature=1.0, generators=_gens(s)) for i, s in enumerate((1, 2, 3))]
    assert together.tolist() == [int(a) for a in alone]
    draws = {tuple(next_tokens(logits, temperature=1.0, generators=_gens(s, s, s)).tolist()) for s in range(8)}
    assert len(draws) > 1
    # a forced row draws nothing: the next free draw of its generator is unchanged
    g_forced, g_ref = _gens(5, 5)
    next_tokens(logits[:1], temperature=1.0, generators=[g_forced], forced_B=torch.tensor([7]))
    assert torch.equal(torch.rand(2, generator=g_forced), torch.rand(2, generator=g_ref))


def test_sample_per_row_shapes_and_filters():
    logits = torch.full((2, 4, 10), -10.0)
    logits[..., 3] = 10.0
    idx = sample_per_row(logits, _gens(0, 1), top_k=1)
    assert idx.shape == (2, 4) and (idx == 3).all()


def test_context_inactive_rows_are_invisible():
    """Row 0 runs with masked dummy slots between its tokens; its states equal a clean run."""
    torch.manual_seed(0)
    llm = LLMBackbone.from_config(LLMConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64)).eval()
    tokens = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        clean = LLMContext(llm)
        ref = clean.prefill(llm.embed(tokens[:, :3]), torch.ones(1, 3)).hidden_BTD
        ref_next = [clean.extend(llm.embed(tokens[:, i:i + 1])).hidden_BTD for i in (3, 4)]

        ctx = LLMContext(llm)  # row 0 left-padded by 2, row 1 a different prompt
        ids = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), tokens[:, :3]], 1),
                         torch.randint(0, 50, (1, 5))])
        out = ctx.prefill(llm.embed(ids), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
        assert torch.allclose(out.hidden_BTD[0, 2:], ref[0], atol=1e-5)
        both = torch.tensor([True, True])
        only_1 = torch.tensor([False, True])
        ctx.extend(llm.embed(torch.randint(0, 50, (2, 4))), only_1, block=True)  # row 0 skips a 4-token block
        h3 = ctx.extend(llm.embed(torch.stack([tokens[0, 3:4], tokens[0, 3:4]])), both).hidden_BTD
        ctx.extend(llm.embed(torch.randint(0, 50, (2, 1))), only_1)  # and one more step
        h4 = ctx.extend(llm.embed(torch.stack([tokens[0, 4:5], tokens[0, 4:5]])), both).hidden_BTD
    assert torch.allclose(h3[0], ref_next[0][0], atol=1e-5) and torch.allclose(h4[0], ref_next[1][0], atol=1e-5)
    assert ctx.mask_BK.shape == (2, 5 + 4 + 1 + 1 + 1) and int(ctx.mask_BK[0].sum()) == 5


def test_growing_cache_equals_dynamic_cache():
    from vargpt.generation.cache import GrowingLLMCache

    torch.manual_seed(0)
    llm = LLMBackbone.from_config(LLMConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=256)).eval()
    ids = torch.randint(0, 50, (3, 90))
    with torch.no_grad():
        states = []
        for cache in (llm.new_cache(), GrowingLLMCache()):
            outs = [llm(llm.embed(ids[:, :5]), cache=cache, use_cache=True).hidden_BTD]
            for t in range(5, 80, 3):  # crosses the initial capacity and a doubling
                outs.append(llm(llm.embed(ids[:, t:t + 3]), cache=cache, use_cache=True).hidden_BTD)
            cache.crop(-4)  # drop 4 tokens, then re-append
            outs.append(llm(llm.embed(ids[:, 76:80]), cache=cache, use_cache=True).hidden_BTD)
            cache.batch_select_indices(torch.tensor([2, 0]))  # rows change: buffers must be rebuilt
            outs.append(llm(llm.embed(ids[[2, 0], 80:85]), cache=cache, use_cache=True).hidden_BTD)
            assert cache.get_seq_length() == 85
            states.append(outs)
    for a, b in zip(*states, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
