"""The batched mixed-modal reply loop: text by next-token, images by next-scale, in one LLM context.

One loop serves chat, batched chat, streaming, text-to-image and question answering
(:mod:`vargpt.generation.pipeline` wraps it). Every row (conversation) is in one of three states:

* ``text``: the LLM picks the next token (greedy or sampled, the row's own generator). ``</s>`` ends
  the reply; ``<image_gen_start>`` is fed to the LLM and moves the row to ``image``;
* ``image``: the row waits until no row is in ``text``; then all waiting rows generate their image
  together: the prefix (up to and including the start token) is in the LLM cache, the next-scale loop
  (:func:`next_scale_steps` with :class:`VARGPTScaleStep`) adds one block of slots per scale, the
  VQ-VAE decodes the codes; then ``<image_gen_end>`` is fed and the row returns to ``text`` (SPEC 3.8,
  without the official code's one-image/B=1 limits, SPEC 3.10 item 5);
* ``done``.

Rows that are not taking part in a step are fed masked dummy slots (:class:`LLMContext`), so they
neither see nor disturb anything, and every random draw of row b comes from ``generators[b]``; a row's
result is therefore the same whether it runs alone or in a batch (up to float rounding). The loop
yields :data:`Event` objects (text deltas, per-scale previews, finished images, finished replies);
nothing here writes files.

Limits per reply (:class:`ReplyOptions`, ``SamplingConfig``): ``max_new_tokens`` counts every token the
text loop picks (including ``<image_gen_start>``), not image slots; ``max_images`` bans the start token
once reached; ``min_images`` bans ``</s>`` until reached and forces ``<image_gen_start>`` when the
text budget or the context would otherwise run out. The LLM context (``max_position_embeddings``)
is never exceeded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vargpt.config import SamplingConfig
from vargpt.data.records import image_to_tensor, resize_center_crop
from vargpt.generation.next_scale import next_scale_steps, to_pil
from vargpt.generation.prompts import ChatPrompt, codes_to_tensors
from vargpt.generation.text import LLMContext, next_tokens
from vargpt.generation.vargpt_step import VARGPTScaleStep
from vargpt.llm.merge import merge_image_features
from vargpt.special_tokens import IMAGE_GEN
from vargpt.understanding.answer import left_pad
from vargpt.understanding.vision_tower import ImageProcessor

__all__ = ["Event", "ImageDone", "ImagePreview", "ReplyDone", "ReplyOptions", "Response", "TextDelta",
           "generate_replies", "left_pad"]


# --------------------------------------------------------------------------------------------------
# Results and events
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One assistant reply.

    Attributes:
        text: the reply text; each generated image stands as a ``<image_gen>`` placeholder.
        images: the generated images, in order (PIL RGB).
        token_ids: the reply's ids: text ids, with one ``<image_gen>`` id per image (``</s>`` excluded).
        image_codes: per image, the per-scale codes (S tensors of shape (pn^2,)); pass them back as
            that assistant turn's ``"images"`` to continue the conversation exactly.
        previews: per image, the per-scale preview images (empty unless previews were requested).
        seed: the seed of this reply's generator (reproduces it), or None if an explicit generator was used.
        finish_reason: why the reply ended: ``"stop"`` (the model wrote ``</s>``), ``"length"`` (the text
            budget ``max_new_tokens`` or the LLM context ran out: the model had not finished) or
            ``"image"`` (``ReplyOptions.stop_after_images``: ended by the caller after its last image).
        forced_images: how many of the images the loop started itself because ``ReplyOptions.min_images``
            was not yet met and the text budget or the context was about to run out (0: the model started
            every image on its own).
    """

    text: str
    images: list[Image.Image]
    token_ids: list[int]
    image_codes: list[list[torch.Tensor]] = field(default_factory=list)
    previews: list[list[Image.Image]] = field(default_factory=list)
    seed: int | None = None
    finish_reason: str = "stop"
    forced_images: int = 0


@dataclass(frozen=True)
class TextDelta:
    """New reply text of row ``row`` (concatenating a row's deltas gives ``Response.text``)."""

    row: int
    text: str


@dataclass(frozen=True)
class ImagePreview:
    """The image of row ``row`` decoded after scale ``scale`` (the last one equals the final image)."""

    row: int
    scale: int
    image: Image.Image


@dataclass(frozen=True)
class ImageDone:
    """Row ``row`` finished its ``index``-th image (its placeholder was just sent as a :class:`TextDelta`)."""

    row: int
    index: int
    image: Image.Image
    codes: list[torch.Tensor]


@dataclass(frozen=True)
class ReplyDone:
    """Row ``row``'s reply is complete."""

    row: int
    response: Response


Event = TextDelta | ImagePreview | ImageDone | ReplyDone
"""What :func:`generate_replies` yields."""


@dataclass(frozen=True)
class ReplyOptions:
    """Per-call limits of the reply loop (the sampling settings are a :class:`SamplingConfig`)."""

    max_images: int = 4
    """Images per reply; ``<image_gen_start>`` is banned once reached."""
    min_images: int = 0
    """``</s>`` is banned until this many images exist; the start token is forced before the budget ends."""
    stop_after_images: bool = False
    """End a reply right after its ``max_images``-th image (no trailing text; used for text-to-image)."""
    min_new_tokens: int = 0
    """``</s>`` is banned before this many text tokens (benchmarks use it to fix the length)."""
    previews: bool = False
    """Decode and yield an :class:`ImagePreview` after every scale."""
    text_deltas: bool = True
    """Yield :class:`TextDelta` events while decoding (off: only the final text is decoded)."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_embeds(model, prompts: Sequence[ChatPrompt], processor: ImageProcessor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Left-padded prompts -> ``(embeds_BTD, mask_BT, llm_attention_mask)`` with every image slot filled.

    Input images go through the vision tower and projector into the ``<image>`` slots; earlier
    generated images become teacher-forcing embeddings in their generation slots (as in training).
    """
    device = model.vae_local.quantize.embedding.weight.device
    ids_BT, mask_BT = left_pad([p.ids for p in prompts], model.token_ids.pad)
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    embeds_BTD = model.language_model.embed(ids_BT)
    inputs = [im for p in prompts for im in p.input_images]
    if inputs:
        feats_NPD = model.image_embeds(processor(inputs).to(device), None)
        embeds_BTD = merge_image_features(embeds_BTD, ids_BT, model.token_ids.image, feats_NPD.to(embeds_BTD.dtype))
    history = [_history_codes(model, im, device) for p in prompts for im in p.history_images]
    if history:
        gen_codes = [torch.cat(scale) for scale in zip(*history, strict=True)]
        gen_NLD = model.gen_slot_embeds(gen_codes, model.gen_condition(len(history), device))
        slots_BT = ids_BT == model.token_ids.image_gen_pad
        embeds_BTD = embeds_BTD.masked_scatter(slots_BT[..., None], gen_NLD.to(embeds_BTD.dtype))
    return embeds_BTD, mask_BT, model.llm_attention_mask(ids_BT, mask_BT)


def _history_codes(model, image: Any, device: torch.device) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(image, Image.Image):  # re-tokenise a generated image (lossy; codes are exact)
        pixels = image_to_tensor(resize_center_crop(image, model.cfg.vqvae.image_size))[None].to(device)
        return model.vae_local.encode(pixels)
    return codes_to_tensors(image, device)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    length: int
    status: str
    segments: list[list[int]] = field(default_factory=lambda: [[]])
    token_ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    codes: list[list[torch.Tensor]] = field(default_factory=list)
    previews: list[list[Image.Image]] = field(default_factory=list)
    n_text: int = 0
    shown: str = ""
    finish_reason: str = ""
    forced_images: int = 0


class _ReplyLoop:
    """State of one batch of replies; :meth:`run` is the loop (see the module docstring)."""

    def __init__(self, model, tokenizer, prompts, *, sampling, generators, options, null_ids) -> None:  # noqa: ANN001
        self.model, self.tokenizer, self.sampling, self.options = model, tokenizer, sampling, options
        self.generators, self.null_ids = list(generators), null_ids
        self.tid = model.token_ids
        self.llm = model.language_model
        self.L = model.cfg.vqvae.tokens_total
        self.max_pos = model.cfg.llm.max_position_embeddings
        self.B = len(prompts)
        self.rows = [_Row(len(p.ids), "image" if p.ids[-1] == self.tid.image_gen_start else "text")
                     for p in prompts]
        self.banned_V = self._never_in_text().to(model.vae_local.quantize.embedding.weight.device)

    def _never_in_text(self) -> torch.Tensor:
        t = self.tid
        banned = torch.zeros(self.llm.vocab_size, dtype=torch.bool)
        banned[len(self.tokenizer):] = True  # embedding rows beyond the tokenizer (vocab padding)
        specials = set(self.tokenizer.all_special_ids) | {t.image, t.image_gen_pad, t.image_gen, t.image_gen_end, t.pad}
        banned[sorted(i for i in specials - {t.eos, t.image_gen_start} if i < len(banned))] = True
        return banned

    # ---- text ------------------------------------------------------------------------------------
    def _rules(self, text_rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Banned ids (per row, or one row for all) and forced ids (-1 = free; None = none) of the text rows."""
        o, t = self.options, self.tid
        bans: list[tuple[int, int]] = []
        forced = [-1] * len(text_rows)
        for j, b in enumerate(text_rows):
            row = self.rows[b]
            room = self.max_pos - row.length  # positions left
            need_image = len(row.images) < o.min_images
            if len(row.images) >= o.max_images or room < self.L + 2:
                bans.append((j, t.image_gen_start))
            if need_image or row.n_text < o.min_new_tokens:
                bans.append((j, t.eos))
            if need_image and (row.n_text + 1 >= self.sampling.max_new_tokens or room < self.L + 3):
                forced[j] = t.image_gen_start
        banned = self.banned_V[None]
        if bans:
            banned = banned.repeat(len(text_rows), 1)
            rows_idx, ids_idx = zip(*bans, strict=True)
            banned[list(rows_idx), list(ids_idx)] = True
        forced_B = torch.tensor(forced, device=device) if max(forced) >= 0 else None
        return banned, forced_B

    def _text_step(self, text_rows: list[int]) -> Iterator[Event]:
        s = self.sampling
        device = self.logits_BV.device
        banned, forced = self._rules(text_rows, device)
        chosen = next_tokens(self.logits_BV[text_rows], temperature=s.text_temperature, top_k=s.text_top_k,
                             top_p=s.text_top_p, generators=[self.generators[b] for b in text_rows],
                             banned_BV=banned, forced_B=forced).tolist()
        feed, active = [self.tid.pad] * self.B, [False] * self.B
        forced_ids = forced.tolist() if forced is not None else [-1] * len(text_rows)
        for b, tok, forced_id in zip(text_rows, chosen, forced_ids, strict=True):
            row = self.rows[b]
            row.forced_images += forced_id == self.tid.image_gen_start
            if tok == self.tid.eos:
                row.status, row.finish_reason = "done", "stop"
                continue
            row.n_text += 1
            row.length += 1
            if tok == self.tid.image_gen_start:
                row.status = "image"
            else:
                row.segments[-1].append(tok)
                row.token_ids.append(tok)
                yield from self._delta(b)
                if row.n_text >= s.max_new_tokens or row.length >= self.max_pos:
                    row.status, row.finish_reason = "done", "length"
                    continue
            feed[b], active[b] = tok, True
        if any(active):
            self._feed(torch.tensor(feed, device=device), torch.tensor(active, device=device))

    def _feed(self, ids_B: torch.Tensor, active_B: torch.Tensor) -> None:
        out = self.ctx.extend(self.llm.embed(ids_B[:, None]), active_B)
        self.logits_BV = self.llm.logits(out.hidden_BTD[:, -1])

    def _render(self, row: _Row) -> str:
        decode = self.tokenizer.decode
        parts = [decode(seg, skip_special_tokens=False, clean_up_tokenization_spaces=False) for seg in row.segments]
        return IMAGE_GEN.join(parts).lstrip()

    def _delta(self, b: int, *, final: bool = False) -> Iterator[Event]:
        if not (self.options.text_deltas or final):
            return
        row = self.rows[b]
        text = self._render(row)
        if (not final and text.endswith("\ufffd")) or not text.startswith(row.shown):
            return  # an unfinished character (or a re-merged token): wait for more ids
        if len(text) > len(row.shown):
            yield TextDelta(b, text[len(row.shown):])
            row.shown = text

    # ---- images ----------------------------------------------------------------------------------
    def _uncond_context(self, device: torch.device) -> LLMContext | None:
        if self.sampling.cfg_mode != "uncond_class":
            return None
        ids_BT = torch.tensor([self.null_ids] * self.B, dtype=torch.long, device=device)
        ctx = LLMContext(self.llm)
        ctx.prefill(self.llm.embed(ids_BT), torch.ones_like(ids_BT))
        return ctx

    def _image_step(self, wait_rows: list[int]) -> Iterator[Event]:
        m, o = self.model, self.options
        device = self.logits_BV.device
        active_B = torch.zeros(self.B, dtype=torch.bool, device=device)
        active_B[wait_rows] = True
        spare = torch.Generator(device=device).manual_seed(0)  # draws of rows that are not generating
        gens = [self.generators[b] if bool(active_B[b]) else spare for b in range(self.B)]
        step = VARGPTScaleStep(m, self.ctx, generator=gens, active_B=active_B, uncond=self._uncond_context(device))
        sel = torch.tensor(wait_rows, device=device)
        codes, S, images = [], m.cfg.vqvae.num_scales, []
        for event in next_scale_steps(m.vargpt_gen, m.vae_local.quantize, m.gen_condition(2 * self.B, device),
                                      sampling=self.sampling, step=step, generator=gens):
            codes.append(event.idx_Bl[sel])
            if o.previews or event.si == S - 1:
                images = to_pil((m.vae_local.decode(event.f_hat_BZhw[sel]) + 1) / 2)
            if o.previews:
                for j, b in enumerate(wait_rows):
                    if event.si == 0:
                        self.rows[b].previews.append([])
                    self.rows[b].previews[-1].append(images[j])
                    yield ImagePreview(b, event.si, images[j])
        yield from self._finish_images(wait_rows, images, codes, device)

    def _finish_images(self, wait_rows, images, codes, device) -> Iterator[Event]:  # noqa: ANN001
        o = self.options
        feed_B = torch.full((self.B,), self.tid.image_gen_end, dtype=torch.long, device=device)
        active_B = torch.zeros(self.B, dtype=torch.bool, device=device)
        for j, b in enumerate(wait_rows):
            row = self.rows[b]
            row.images.append(images[j])
            row.codes.append([c[j] for c in codes])
            row.token_ids.append(self.tid.image_gen)
            row.segments.append([])
            row.length += self.L
            yield from self._delta(b, final=True)
            yield ImageDone(b, len(row.images) - 1, images[j], row.codes[-1])
            if o.stop_after_images and len(row.images) >= o.max_images:
                row.status, row.finish_reason = "done", "image"
            else:
                row.status, row.length = "text", row.length + 1
                active_B[b] = True
        if bool(active_B.any()):
            self._feed(feed_B, active_B)

    # ---- driver ----------------------------------------------------------------------------------
    def run(self, embeds_BTD: torch.Tensor, mask_BT: torch.Tensor, attention_mask: torch.Tensor,
            seeds: Sequence[int | None]) -> Iterator[Event]:
        self.ctx = LLMContext(self.llm)
        out = self.ctx.prefill(embeds_BTD, mask_BT, attention_mask=attention_mask)
        self.logits_BV = self.llm.logits(out.hidden_BTD[:, -1])
        while True:
            text_rows = [b for b, r in enumerate(self.rows) if r.status == "text"]
            wait_rows = [b for b, r in enumerate(self.rows) if r.status == "image"]
            if text_rows:
                yield from self._text_step(text_rows)
            elif wait_rows:
                yield from self._image_step(wait_rows)
            else:
                break
        for b, row in enumerate(self.rows):
            yield from self._delta(b, final=True)
            yield ReplyDone(b, Response(self._render(row), row.images, row.token_ids, row.codes, row.previews,
                                        seeds[b], row.finish_reason, row.forced_images))


@torch.no_grad()
def generate_replies(
    model,  # noqa: ANN001 - VARGPT
    tokenizer,  # noqa: ANN001 - HF tokenizer
    prompts: Sequence[ChatPrompt],
    *,
    processor: ImageProcessor,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    seeds: Sequence[int | None] | None = None,
    options: ReplyOptions | None = None,
    null_ids: Sequence[int] = (),
) -> Iterator[Event]:
    """Generate the replies of a batch of encoded conversations, yielding events as they happen.

    Args:
        model: a :class:`vargpt.model.VARGPT` in eval mode.
        tokenizer: its text tokenizer (decodes the reply text).
        prompts: encoded conversations (:func:`vargpt.generation.prompts.encode_chat`); a prompt ending
            in ``<image_gen_start>`` starts its reply with an image.
        processor: the vision tower's image processor.
        sampling: text and image sampling settings (``seed`` is not read; see ``generators``).
        generators: one RNG per row; every random draw of row b (text, codes, CFG noise) uses
            ``generators[b]``.
        seeds: reported in each :class:`Response` (the seeds the generators were made from).
        options: per-reply limits and what to yield (default :class:`ReplyOptions`).
        null_ids: the prompt-free context for ``sampling.cfg_mode == "uncond_class"``.

    Yields:
        :data:`Event` objects; one :class:`ReplyDone` per row at the end, in row order.
    """
    if len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    loop = _ReplyLoop(model, tokenizer, prompts, sampling=sampling, generators=generators,
                      options=options or ReplyOptions(), null_ids=list(null_ids))
    embeds_BTD, mask_BT, attention_mask = prompt_embeds(model, prompts, processor)
    yield from loop.run(embeds_BTD, mask_BT, attention_mask, list(seeds or [None] * len(prompts)))
