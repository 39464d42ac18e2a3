"""Inference speed of VARGPT generation and understanding at equal weights; prints ONE JSON object.

    python benchmarks/generation.py --threads 2                 # random tiny weights (speed only)
    python benchmarks/generation.py --model runs/tiny/vargpt    # a trained checkpoint

Reported:

* ``speedup_batched_vs_official``: images/s of :meth:`Pipeline.generate_images` (batch ``--batch``,
  KV-cached LLM and visual decoder) over an official-style loop (SPEC 3.8 / 3.10 item 5): B=1, one
  prompt after another, KV-cached LLM, noise CFG, but the visual decoder recomputed over the whole
  token prefix at every scale (no decoder KV cache). Both include the VQ-VAE decoding and PIL conversion.
  ``speedup_batched_vs_b1`` isolates batching: the same pipeline called with ``batch_size=1``.
* ``speedup_kv_cache``: our KV-cached loop over a no-cache loop that recomputes the LLM over
  prompt + every slot so far *and* the decoder over every token so far at each scale (same batch, same
  per-row generators; codes only). ``kv_same_codes_fraction`` checks both sample the same codes.
* ``understanding_decode_ratio_vs_hf``: greedy decode tokens/s of our reply loop (``Pipeline.answer``'s
  path, batch ``--qa-batch``, one image per prompt) over transformers' ``LlavaForConditionalGeneration
  .generate`` on the same weights (converted with ``to_hf_llava_state``; parity of logits checked:
  ``hf_max_logit_diff``). Decode rate = B * (N - 1) / (t(N tokens) - t(1 token)): prefill cancels.

Timings are best-of-``--repeats`` with the variants interleaved (robust to a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from vargpt.config import SamplingConfig, VARGPTConfig
from vargpt.generation.next_scale import make_generator, next_scale_steps, to_pil
from vargpt.generation.pipeline import Pipeline, derive_seed
from vargpt.generation.reply import ReplyDone, ReplyOptions, generate_replies, left_pad, prompt_embeds
from vargpt.generation.sampling import cfg_mix, cfg_scale, sample, sample_per_row
from vargpt.generation.text import LLMContext
from vargpt.generation.vargpt_step import VARGPTScaleStep
from vargpt.llm.backbone import positions_from_padding

PROMPTS = ["please draw a red circle", "a small blue square on the left", "draw a green triangle",
           "what colour is the square", "paint a yellow star at the top", "a purple heart in the center"]


def _timed(*fns, repeats: int) -> list[float]:  # noqa: ANN002
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _tiny_pipeline(preset: str, seed: int) -> Pipeline:
    """Random weights of ``preset`` with a small offline BPE tokenizer (speed does not need training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vargpt import special_tokens as st
    from vargpt.model import VARGPT
    from vargpt.special_tokens import SpecialTokenIds

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPTS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", st.PAD, st.BOS, st.EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=st.PAD, bos_token=st.BOS,
                                 eos_token=st.EOS, additional_special_tokens=list(st.ADDED_TOKENS))
    torch.manual_seed(seed)
    model = VARGPT.from_config(VARGPTConfig.from_name(preset), SpecialTokenIds.from_tokenizer(hf))
    return Pipeline(model, hf)


# --------------------------------------------------------------------------------------------------
# Reference loops
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def official_style_image(pipe: Pipeline, prompt: str, sampling: SamplingConfig, seed: int):  # noqa: ANN201
    """One image the official way: B=1, LLM cache, noise CFG, decoder recomputed over the prefix per scale."""
    m = pipe.model
    dec, q = m.vargpt_gen, m.vae_local.quantize
    gen = make_generator(seed)
    p = pipe.encode([{"role": "user", "content": prompt}], None, force_image=True)
    out = m.language_model(m.language_model.embed(torch.tensor([p.ids])), use_cache=True, compute_logits=False)
    cache = out.cache
    cond = m.gen_condition(2, torch.device("cpu"))
    S, pn_last = len(dec.patch_nums), dec.patch_nums[-1]
    f_hat = cond.new_zeros(1, dec.vq.z_channels, pn_last, pn_last)
    x = dec.embed_start(cond)
    h_all = []
    for si, pn in enumerate(dec.patch_nums):
        hidden = m.language_model(m.image_gen_projector(x[:1]), cache=cache, use_cache=True,
                                  compute_logits=False).hidden_BTD
        noise = torch.randn(hidden.shape, generator=gen)
        hidden_2 = torch.cat([hidden, noise])
        if si == 0:
            cond = m.decoder_condition(cond, hidden_2[:, 0])
        h_all.append(m.decoder_inputs(hidden_2, torch.cat([x[:1], x[:1]])))
        h = torch.cat(h_all, dim=1)
        logits = dec.forward_blocks(h, cond, attn_bias=dec.causal_bias(h.shape[1]))[:, -pn * pn:]
        logits = cfg_mix(logits[:1], logits[1:], cfg_scale(si, S, sampling.cfg, sampling.cfg_schedule))
        idx = sample(logits, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature,
                     generator=gen)
        f_hat, nxt = q.next_scale_input(si, f_hat, q.embed(idx, pn))
        if nxt is not None:
            x = dec.embed_scale(si + 1, nxt).repeat(2, 1, 1)
    return to_pil((m.vae_local.decode(f_hat) + 1) / 2)[0]


def _prefix(pipe: Pipeline, prompts: list[str]):  # noqa: ANN202
    encoded = [pipe.encode([{"role": "user", "content": p}], None, force_image=True) for p in prompts]
    return encoded, prompt_embeds(pipe.model, encoded, pipe.processor)


@torch.no_grad()
def cached_codes(pipe: Pipeline, prompts: list[str], sampling: SamplingConfig, seeds: list[int]) -> list:
    """Codes of our loop: prefill once, then one cached LLM + decoder step per scale."""
    m = pipe.model
    _, (embeds, mask, attn) = _prefix(pipe, prompts)
    ctx = LLMContext(m.language_model)
    ctx.prefill(embeds, mask, attention_mask=attn)
    gens = [make_generator(s) for s in seeds]
    step = VARGPTScaleStep(m, ctx, generator=gens)
    cond = m.gen_condition(2 * len(prompts), torch.device("cpu"))
    return [e.idx_Bl for e in next_scale_steps(m.vargpt_gen, m.vae_local.quantize, cond, sampling=sampling,
                                                step=step, generator=gens)]


@torch.no_grad()
def no_cache_codes(pipe: Pipeline, prompts: list[str], sampling: SamplingConfig, seeds: list[int]) -> list:
    """Codes without any KV cache: every scale re-runs the LLM over prompt + all slots, the decoder over all."""
    m = pipe.model
    dec, q, llm = m.vargpt_gen, m.vae_local.quantize, m.language_model
    encoded, _ = _prefix(pipe, prompts)
    B = len(prompts)
    ids, mask = left_pad([p.ids for p in encoded], m.token_ids.pad)
    text_embeds = llm.embed(ids)
    gens = [make_generator(s) for s in seeds]
    cond = m.gen_condition(2 * B, torch.device("cpu"))
    S, pn_last = len(dec.patch_nums), dec.patch_nums[-1]
    f_hat = cond.new_zeros(B, dec.vq.z_channels, pn_last, pn_last)
    slots, noise_all, idx_list = [dec.embed_start(cond)[:B]], [], []
    for si, pn in enumerate(dec.patch_nums):
        x = torch.cat(slots, dim=1)
        full_mask = torch.cat([mask, mask.new_ones(B, x.shape[1])], dim=1)
        embeds = torch.cat([text_embeds, m.image_gen_projector(x)], dim=1)
        attn = full_mask if m.cfg.gen_projector.llm_attention == "causal" else _block_mask(m, ids, full_mask, x)
        hidden = llm(embeds, attention_mask=attn, position_ids=positions_from_padding(full_mask),
                     compute_logits=False).hidden_BTD[:, -x.shape[1]:]
        noise_all.append(torch.stack([torch.randn(pn * pn, hidden.shape[-1], generator=g) for g in gens]))
        hidden_2 = torch.cat([hidden, torch.cat(noise_all, dim=1)])
        h = m.decoder_inputs(hidden_2, torch.cat([x, x]))
        cond_2 = m.decoder_condition(cond, hidden_2[:, 0])
        logits = dec.forward_blocks(h, cond_2, attn_bias=dec.causal_bias(h.shape[1]))[:, -pn * pn:]
        logits = cfg_mix(logits[:B], logits[B:], cfg_scale(si, S, sampling.cfg, sampling.cfg_schedule))
        idx = sample_per_row(logits, gens, top_k=sampling.top_k, top_p=sampling.top_p,
                             temperature=sampling.temperature)
        idx_list.append(idx)
        f_hat, nxt = q.next_scale_input(si, f_hat, q.embed(idx, pn))
        if nxt is not None:
            slots.append(dec.embed_scale(si + 1, nxt))
    return idx_list


def _block_mask(m, ids, full_mask, x):  # noqa: ANN001, ANN202
    slot_ids = torch.full((ids.shape[0], x.shape[1]), m.token_ids.image_gen_pad)
    return m.llm_attention_mask(torch.cat([ids, slot_ids], dim=1), full_mask)


# --------------------------------------------------------------------------------------------------
# Understanding vs transformers
# --------------------------------------------------------------------------------------------------


def hf_llava(pipe: Pipeline, vt_cfg):  # noqa: ANN001, ANN201
    """transformers' LlavaForConditionalGeneration holding exactly our understanding weights."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    from vargpt.understanding.llava import Llava, to_hf_llava_state

    m, cfg = pipe.model, pipe.model.cfg
    ours = Llava(m.vision_tower, m.multi_modal_projector, m.language_model, image_token_id=m.token_ids.image)
    vis, txt = m.vision_tower.hf_config_dict(), m.language_model.hf_config_dict()
    hf_cfg = LlavaConfig(
        vision_config=AutoConfig.for_model(vis.pop("model_type"), **vis),
        text_config=AutoConfig.for_model(txt.pop("model_type"), **txt),
        image_token_id=m.token_ids.image, vision_feature_layer=vt_cfg.feature_layer,
        vision_feature_select_strategy="default" if vt_cfg.drop_cls else "full",
        projector_hidden_act=cfg.projector.hidden_act, multimodal_projector_bias=True,
        image_seq_length=vt_cfg.tokens_per_image)
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llava_state(ours.state_dict()), strict=False)
    if unexpected or [k for k in missing if "post_layernorm" not in k]:
        raise RuntimeError(f"LLaVA conversion: missing {missing}, unexpected {unexpected}")
    return hf


def understanding(pipe: Pipeline, batch: int, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s vs transformers. HF LLaVA holds ViT towers only: a ResNet tower is replaced on both
    sides by a random ViT giving as many features of the same width (the tower runs once per prompt,
    before decoding; projector and LLM are the model's)."""
    from vargpt.understanding.llava import vit_stand_in

    m = pipe.model
    if not m.vision_tower.is_resnet:
        return _understanding(pipe, batch, new_tokens, repeats, m.cfg.vision_tower)
    tower = m.vision_tower
    m.vision_tower, vt_cfg = vit_stand_in(m.cfg.vision_tower)
    try:
        return {**_understanding(pipe, batch, new_tokens, repeats, vt_cfg), "understanding_tower": "vit_stand_in"}
    finally:
        m.vision_tower = tower


def _understanding(pipe: Pipeline, batch: int, new_tokens: int, repeats: int, vt_cfg) -> dict:  # noqa: ANN001
    from PIL import Image

    m = pipe.model
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(batch)]
    qs = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    prompts = [pipe.encode([{"role": "user", "content": q, "images": [im]}])
               for q, im in zip(qs, images, strict=True)]
    ids, mask = left_pad([p.ids for p in prompts], m.token_ids.pad)
    pixels = pipe.processor(images)
    hf = hf_llava(pipe, vt_cfg)

    def ours(n: int):
        s = dataclasses.replace(pipe.default_sampling, text_temperature=0.0, max_new_tokens=n)
        opts = ReplyOptions(max_images=0, min_new_tokens=n, text_deltas=False)
        events = generate_replies(m, pipe.tokenizer, prompts, processor=pipe.processor, sampling=s,
                                  generators=[make_generator(0)] * batch, options=opts)
        return [e.response for e in events if isinstance(e, ReplyDone)]

    @torch.no_grad()
    def theirs(n: int):
        return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=m.token_ids.pad)

    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        emb, emask, attn = prompt_embeds(m, prompts, pipe.processor)
        mine = m.language_model.logits(m.language_model(emb, attention_mask=attn, compute_logits=False)
                                       .hidden_BTD[:, -1])
    assert all(len(r.token_ids) == new_tokens for r in ours(new_tokens))
    assert theirs(new_tokens).shape[1] == ids.shape[1] + new_tokens
    t_o1, t_on, t_h1, t_hn = _timed(lambda: ours(1), lambda: ours(new_tokens), lambda: theirs(1),
                                    lambda: theirs(new_tokens), repeats=repeats)
    rate_ours = batch * (new_tokens - 1) / (t_on - t_o1)
    rate_hf = batch * (new_tokens - 1) / (t_hn - t_h1)
    return {
        "understanding_decode_ratio_vs_hf": round(rate_ours / rate_hf, 3),
        "understanding_decode_tokens_per_s": round(rate_ours, 1),
        "hf_decode_tokens_per_s": round(rate_hf, 1),
        "understanding_batch": batch, "understanding_new_tokens": new_tokens,
        "hf_max_logit_diff": float((ref - mine).abs().max()),
    }


# --------------------------------------------------------------------------------------------------
# Image generation
# --------------------------------------------------------------------------------------------------


def matmul_gflop_per_image(pipe: Pipeline) -> tuple[float, float]:
    """Weight-matmul GFLOP per image (attention and VQ-VAE excluded): ours, and official-style (decoder recompute).

    LLM body and gen-projector-in run on L tokens, gen-projector-out and the decoder on 2L (CFG halves);
    recomputing the decoder over the prefix at scale k costs end_k tokens instead of pn_k^2.
    """
    m = pipe.model
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    llm = sum(n(layer) for layer in m.language_model.model.model.layers)
    dec = sum(n(b) for b in m.vargpt_gen.blocks) + n(m.vargpt_gen.head) + n(m.vargpt_gen.head_nm)
    ends = [end for _, end in m.vargpt_gen.offsets]
    shared = (llm + n(m.image_gen_projector)) * ends[-1] + n(m.image_gen_projector_out) * 2 * ends[-1]
    return 2 * (shared + dec * 2 * ends[-1]) / 1e9, 2 * (shared + dec * 2 * sum(ends)) / 1e9


def matmul_peak_gflop_per_s(repeats: int) -> float:
    """Throughput of one representative fp32 matmul (B=16 x L=130 tokens, 192 -> 512) on this machine now."""
    a, w = torch.randn(2080, 192), torch.randn(512, 192)
    (t,) = _timed(lambda: [a @ w.T for _ in range(10)], repeats=repeats)
    return 10 * 2 * a.shape[0] * a.shape[1] * w.shape[0] / t / 1e9


def image_speed(pipe: Pipeline, batch: int, n_official: int, repeats: int) -> dict:
    sampling = dataclasses.replace(pipe.default_sampling, seed=0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = [derive_seed(0, i) for i in range(batch)]
    t_batched, t_b1, t_official = _timed(
        lambda: pipe.generate_images(prompts, sampling=sampling, batch_size=batch),
        lambda: pipe.generate_images(prompts[:n_official], sampling=sampling, batch_size=1),
        lambda: [official_style_image(pipe, p, sampling, s)
                 for p, s in zip(prompts[:n_official], seeds[:n_official], strict=True)],
        repeats=repeats)
    t_cached, t_uncached = _timed(lambda: cached_codes(pipe, prompts, sampling, seeds),
                                  lambda: no_cache_codes(pipe, prompts, sampling, seeds), repeats=repeats)
    a, b = cached_codes(pipe, prompts, sampling, seeds), no_cache_codes(pipe, prompts, sampling, seeds)
    same = sum(int(torch.equal(x, y)) for x, y in zip(a, b, strict=True)) / len(a)
    # tokens processed per image without / with caches: the speed-up a compute-bound run can reach
    prompt_len = sum(len(pipe.encode([{"role": "user", "content": p}], None, force_image=True).ids)
                     for p in prompts) / batch
    ends = [end for _, end in pipe.model.vargpt_gen.offsets]
    ours_gflop, official_gflop = matmul_gflop_per_image(pipe)
    return {
        "speedup_batched_vs_official": round((batch / t_batched) / (n_official / t_official), 3),
        "matmul_gflop_per_image": round(ours_gflop, 3),
        "official_matmul_gflop_per_image": round(official_gflop, 3),
        "batched_matmul_gflop_per_s": round(ours_gflop * batch / t_batched, 1),
        "matmul_peak_gflop_per_s": round(matmul_peak_gflop_per_s(repeats), 1),
        "speedup_batched_vs_b1": round((batch / t_batched) / (n_official / t_b1), 3),
        "batched_images_per_s": round(batch / t_batched, 2),
        "b1_images_per_s": round(n_official / t_b1, 2),
        "official_style_images_per_s": round(n_official / t_official, 2),
        "speedup_kv_cache": round(t_uncached / t_cached, 3),
        "kv_cached_images_per_s": round(batch / t_cached, 2),
        "no_cache_images_per_s": round(batch / t_uncached, 2),
        "kv_same_codes_fraction": same,
        "kv_token_ratio_llm": round(sum(prompt_len + e for e in ends) / (prompt_len + ends[-1]), 3),
        "kv_token_ratio_decoder": round(sum(ends) / ends[-1], 3),
        "image_batch": batch,
    }


def main() -> None:
    """Parse arguments, run, print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="images generated at once")
    p.add_argument("--official-images", type=int, default=4, help="images timed in the B=1 loops")
    p.add_argument("--qa-batch", type=int, default=8)
    p.add_argument("--qa-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model) if args.model else _tiny_pipeline(args.preset, args.seed)
    report: dict = {"threads": torch.get_num_threads(), "preset": pipe.model.cfg.name,
                    "weights": args.model or "random"}
    report |= image_speed(pipe, args.batch, args.official_images, args.repeats)
    report |= understanding(pipe, args.qa_batch, args.qa_tokens, args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
