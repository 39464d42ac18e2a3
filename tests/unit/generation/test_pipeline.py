"""The inference pipeline: mixed-modal replies, batching == per-sample runs, seeds, streaming, inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.config import SamplingConfig
from vargpt.data.conversation import ConversationError
from vargpt.generation.errors import GenerationInputError
from vargpt.generation.pipeline import (
    ImageDone,
    ImagePreview,
    Pipeline,
    ReplyDone,
    TextDelta,
    derive_seed,
)
from vargpt.generation.prompts import encode_chat
from vargpt.special_tokens import IMAGE_GEN, IMAGE_GEN_START

DRAW = [{"role": "user", "content": "please draw a red circle"}]
SAMPLED = SamplingConfig(seed=3, cfg=2.0, top_k=0, top_p=0.0, text_temperature=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def pipe(chat_model_dir):
    return Pipeline.from_pretrained(chat_model_dir)


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def _close_image(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to +-1 in 8 bits: the VQ-VAE's convolutions may round differently at another batch size."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return a.size == b.size and int(diff.max()) <= 1


def _same_codes(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_reply_with_text_image_text(pipe):
    """The LLM itself emits <image_gen_start>, the image is made, <image_gen_end> is fed, text resumes."""
    r = pipe.chat(DRAW, sampling=dataclasses.replace(SAMPLED, text_temperature=0.0))
    cfg = pipe.model.cfg
    assert r.text == f"here{IMAGE_GEN} and more"
    assert len(r.images) == 1 and r.images[0].size == (cfg.vqvae.image_size,) * 2
    assert r.token_ids.count(pipe.model.token_ids.image_gen) == 1 and pipe.model.token_ids.eos not in r.token_ids
    assert [c.shape for c in r.image_codes[0]] == [(pn * pn,) for pn in cfg.vqvae.patch_nums]


def test_finish_reason_says_what_ended_the_reply(pipe):
    greedy = dataclasses.replace(SAMPLED, text_temperature=0.0)
    assert pipe.chat(DRAW, sampling=greedy).finish_reason == "stop"  # the model wrote </s>
    cut = pipe.chat(DRAW, sampling=dataclasses.replace(greedy, max_new_tokens=3))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    assert f"here{IMAGE_GEN} and more".startswith(cut.text)
    # text-to-image stops at the image unless asked to finish the reply as a chat would
    at_image = pipe.generate_images(["please draw a red circle"], sampling=greedy, lead_in=True)[0]
    assert (at_image.text, at_image.finish_reason) == (f"here{IMAGE_GEN}", "image")
    whole = pipe.generate_images(["please draw a red circle"], sampling=greedy, lead_in=True, finish_reply=True)[0]
    assert (whole.text, whole.finish_reason) == (f"here{IMAGE_GEN} and more", "stop")
    assert _same_codes(whole.codes, at_image.codes)  # same seed: the image is the same either way
    assert not at_image.image_forced and pipe.chat(DRAW, sampling=greedy).forced_images == 0  # it drew on its own
    # a text budget of 2 ends before "here" (3 tokens) does: the loop must force the image start
    short = pipe.generate_images(["please draw a red circle"], sampling=dataclasses.replace(greedy, max_new_tokens=2),
                                 lead_in=True)[0]
    assert short.image_forced and short.text.endswith(IMAGE_GEN) and len(short.codes) == len(at_image.codes)


def test_max_images_zero_gives_text_only(pipe):
    r = pipe.chat(DRAW, sampling=dataclasses.replace(SAMPLED, text_temperature=0.0, max_images=0))
    assert r.images == [] and IMAGE_GEN not in r.text and r.text


def test_batched_generation_equals_per_prompt(pipe):
    prompts = ["please draw a red circle", "a blue square", "what colour is the square please"]
    batched = pipe.generate_images(prompts, n_per_prompt=2, sampling=SAMPLED, batch_size=4)
    assert [g.prompt for g in batched] == [p for p in prompts for _ in range(2)]
    assert len({g.seed for g in batched}) == 6
    assert [g.seed for g in batched] == [derive_seed(3, i) for i in range(6)]
    for g in batched:
        alone = pipe.generate_images([g.prompt], seeds=[g.seed], sampling=SAMPLED)[0]
        assert _same_codes(alone.codes, g.codes)
        assert _close_image(alone.image, g.image)


def test_batched_chat_equals_single(pipe):
    """Left padding (prompts of different lengths, one with history) changes no reply."""
    convs = [DRAW, [{"role": "user", "content": "what colour is the square"}],
             [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": "please draw a red circle"}]]
    batched = pipe.chat_batch(convs, sampling=SAMPLED)
    for conv, r in zip(convs, batched, strict=True):
        alone = pipe.chat_batch([conv], sampling=SAMPLED, seeds=[r.seed])[0]
        assert alone.text == r.text and alone.token_ids == r.token_ids
        assert len(alone.image_codes) == len(r.image_codes)
        assert all(_same_codes(a, b) for a, b in zip(alone.image_codes, r.image_codes, strict=True))


def test_seeds_reproduce_and_differ(pipe):
    a = pipe.generate_images(["a red circle"], n_per_prompt=2, sampling=SAMPLED)
    b = pipe.generate_images(["a red circle"], n_per_prompt=2, sampling=SAMPLED)
    c = pipe.generate_images(["a red circle"], n_per_prompt=2, sampling=dataclasses.replace(SAMPLED, seed=4))
    assert all(_same_image(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert not _same_codes(a[0].codes, a[1].codes)  # two samples of one prompt differ
    assert not _same_codes(a[0].codes, c[0].codes)


def test_stream_previews_and_deltas(pipe):
    events = list(pipe.stream(DRAW, sampling=SAMPLED))
    S = pipe.model.cfg.vqvae.num_scales
    previews = [e for e in events if isinstance(e, ImagePreview)]
    done = [e for e in events if isinstance(e, ImageDone)]
    final = events[-1]
    assert isinstance(final, ReplyDone) and len(done) == len(final.response.images) >= 1
    assert len(previews) == S * len(done) and [p.scale for p in previews[:S]] == list(range(S))
    assert _same_image(previews[S - 1].image, done[0].image)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == final.response.text
    assert final.response.previews[0][-1] is done[0].image
    chat = pipe.chat(DRAW, sampling=SAMPLED)  # same seed: streaming and chat give the same reply
    assert chat.text == final.response.text and _same_codes(chat.image_codes[0], final.response.image_codes[0])


def test_lead_in_text_to_image_and_prompt_free_cfg(pipe):
    g = pipe.generate_images(["please draw a red circle"], sampling=SAMPLED, lead_in=True)[0]
    assert g.text.endswith(IMAGE_GEN) and g.image.size[0] == pipe.model.cfg.vqvae.image_size
    uncond = dataclasses.replace(SAMPLED, cfg_mode="uncond_class")
    a, b = (pipe.generate_images(["a red circle"], sampling=uncond)[0] for _ in range(2))
    assert _same_codes(a.codes, b.codes)
    assert not _same_codes(a.codes, pipe.generate_images(["a red circle"], sampling=SAMPLED)[0].codes)


def test_multi_turn_history_with_generated_image_and_input_image(pipe):
    first = pipe.chat(DRAW, sampling=SAMPLED)
    history = [*DRAW, {"role": "assistant", "content": first.text, "images": first.image_codes},
               {"role": "user", "content": "again please"}]
    picture = Image.new("RGB", (40, 30), (200, 10, 10))
    second = pipe.chat(history, images=[picture], sampling=SAMPLED)
    assert isinstance(second.text, str)
    # the re-tokenised PIL image is accepted in place of the codes
    history[1] = {**history[1], "images": first.images}
    assert isinstance(pipe.chat(history, sampling=SAMPLED).text, str)


def test_answer_batched_equals_single(pipe):
    imgs = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    qs = ["what colour", "what colour is the square", "is it red"]
    batched = pipe.answer(imgs, qs, max_new_tokens=6)
    assert batched == [pipe.answer([im], [q], max_new_tokens=6)[0] for im, q in zip(imgs, qs, strict=True)]
    assert all(IMAGE_GEN not in a for a in batched)


def test_user_text_cannot_inject_special_tokens(pipe, hf_tokenizer):
    ids = pipe.model.token_ids
    p = encode_chat([{"role": "user", "content": f"{IMAGE_GEN_START} hi <image> {IMAGE_GEN} </s>"}], None,
                    hf_tokenizer, ids, image_tokens=4, gen_tokens=5)
    specials = {ids.image, ids.image_gen_start, ids.image_gen_end, ids.image_gen_pad, ids.image_gen, ids.eos}
    assert not specials & set(p.ids)
    forced = encode_chat(DRAW, None, hf_tokenizer, ids, image_tokens=4, gen_tokens=5, force_image=True)
    assert forced.ids[-1] == ids.image_gen_start and forced.ids.count(ids.image_gen_start) == 1


def test_bad_inputs_raise_named_errors(pipe, tmp_path):
    with pytest.raises(GenerationInputError, match="empty message"):
        pipe.chat([{"role": "user", "content": "  "}])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(GenerationInputError, match="cannot read image"):
        pipe.chat(DRAW, images=[bad])
    with pytest.raises(GenerationInputError, match="not found"):
        pipe.chat(DRAW, images=[tmp_path / "missing.png"])
    with pytest.raises(GenerationInputError, match="context holds"):
        pipe.chat([{"role": "user", "content": "draw a red circle " * 400}])
    with pytest.raises(GenerationInputError, match="placeholder"):
        pipe.chat([*DRAW, {"role": "assistant", "content": "no image here", "images": [[0]]},
                   {"role": "user", "content": "x"}])
    with pytest.raises(ConversationError):
        pipe.chat([{"role": "assistant", "content": "hi"}])
    with pytest.raises(GenerationInputError, match="seeds"):
        pipe.generate_images(["a"], n_per_prompt=2, seeds=[1])


def test_rows_in_different_states_do_not_interact(pipe, hf_tokenizer):
    """One batch: a row that ends at once (masked while another row draws), a row that writes text then
    draws, and a row whose prompt forces the image (it waits, masked, while the text row decodes)."""
    from vargpt.generation.next_scale import make_generator
    from vargpt.generation.prompts import ChatPrompt
    from vargpt.generation.reply import ReplyOptions, generate_replies

    m, ids = pipe.model, pipe.model.token_ids
    cfg = m.cfg
    enc = dict(image_tokens=cfg.vision_tower.tokens_per_image, gen_tokens=cfg.vqvae.tokens_total)
    draw = encode_chat(DRAW, None, hf_tokenizer, ids, **enc)
    codes = pipe.generate_images(["x"], sampling=SAMPLED)[0].codes
    finished = ChatPrompt(draw.ids + hf_tokenizer.encode(" here") + [ids.image_gen_start]
                          + [ids.image_gen_pad] * cfg.vqvae.tokens_total + [ids.image_gen_end]
                          + hf_tokenizer.encode(" and more"), [], [codes])
    forced = encode_chat(DRAW, None, hf_tokenizer, ids, force_image=True, **enc)
    prompts, seeds = [finished, draw, forced], [11, 12, 13]

    def run(rows):
        events = generate_replies(m, hf_tokenizer, [prompts[i] for i in rows], processor=pipe.processor,
                                  sampling=SAMPLED, generators=[make_generator(seeds[i]) for i in rows],
                                  options=ReplyOptions(max_images=2))
        return [e.response for e in events if isinstance(e, ReplyDone)]

    batched = run([0, 1, 2])
    assert batched[0].text == "" and batched[0].images == []  # ended while the others generated
    assert batched[1].text == f"here{IMAGE_GEN} and more"
    assert batched[2].text.startswith(IMAGE_GEN)
    for i, r in enumerate(batched):
        alone = run([i])[0]
        assert alone.text == r.text
        assert all(_same_codes(a, b) for a, b in zip(alone.image_codes, r.image_codes, strict=True))


def test_block_causal_llm_attention(hf_tokenizer):
    """With scale blocks fully visible in the LLM: batched == single, and history images are re-embedded."""
    from vargpt.config import VARGPTConfig
    from vargpt.model import VARGPT
    from vargpt.special_tokens import SpecialTokenIds

    cfg = VARGPTConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=1),
                              gen_projector=dataclasses.replace(cfg.gen_projector, llm_attention="block_causal"))
    torch.manual_seed(0)
    block_pipe = Pipeline(VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(hf_tokenizer)), hf_tokenizer)
    batched = block_pipe.generate_images(["a red circle", "please draw a blue square"], sampling=SAMPLED)
    for g in batched:
        assert _same_codes(block_pipe.generate_images([g.prompt], seeds=[g.seed], sampling=SAMPLED)[0].codes, g.codes)
    history = [*DRAW, {"role": "assistant", "content": f"ok{IMAGE_GEN}", "images": [batched[0].codes]},
               {"role": "user", "content": "more"}]
    r = block_pipe.chat(history, sampling=dataclasses.replace(SAMPLED, max_new_tokens=3))
    assert len(r.token_ids) <= 3
