"""The user-facing inference API: mixed-modal chat, batched text-to-image, streaming, answers.

    >>> pipe = Pipeline.from_pretrained("runs/tiny/vargpt")
    >>> r = pipe.chat([{"role": "user", "content": "Please draw a red circle."}])
    >>> r.text, r.images                                # "Here is a red circle.<image_gen>", [PIL]
    >>> imgs = pipe.generate_images(["a red circle", "a blue square"], n_per_prompt=4,
    ...                             sampling=SamplingConfig(seed=0))
    >>> for event in pipe.stream(messages): ...         # TextDelta / ImagePreview / ImageDone / ReplyDone
    >>> pipe.answer([image], ["What colour is the circle?"])

Every call returns values (PIL images, text); nothing here writes files (STYLE 10); the CLI does.

**Seeds.** Each sample i of a call (conversation i of :meth:`chat_batch`, image i of
:meth:`generate_images`, counted prompt-major) gets its own generator seeded with
``derive_seed(sampling.seed, i)``; every random draw of that sample (text tokens, image codes, CFG
noise) uses it and nothing else. Hence results do not depend on batch size or on the other prompts in
the batch, and one sample can be regenerated alone by passing its reported ``seed`` back
(``seeds=[r.seed]``). ``sampling.seed=None`` picks a fresh random base seed.

**Text-to-image.** :meth:`generate_images` puts the prompt in a user turn and, by default, appends
``<image_gen_start>`` right after ``ASSISTANT:`` (the assistant is asked to draw, as the official
text-to-image evaluation does); ``lead_in=True`` instead lets the model write its own lead-in text
first (as in the training answers, e.g. "Here is a red circle.") and forces the start token only if
the text budget would run out. Reserved token strings in prompts are escaped, never rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vargpt.config import SamplingConfig
from vargpt.generation.errors import GenerationInputError
from vargpt.generation.next_scale import make_generator
from vargpt.generation.prompts import ChatPrompt, ImageInput, encode_chat, null_prompt_ids
from vargpt.generation.reply import (
    Event,
    ImageDone,
    ImagePreview,
    ReplyDone,
    ReplyOptions,
    Response,
    TextDelta,
    generate_replies,
)
from vargpt.understanding.vision_tower import ImageProcessor

__all__ = ["Event", "GeneratedImage", "GenerationInputError", "ImageDone", "ImagePreview", "Pipeline", "ReplyDone",
           "Response", "TextDelta", "derive_seed"]


def derive_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a call with base ``seed`` (a hash: distinct, stable, 63-bit)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class GeneratedImage:
    """One text-to-image sample.

    Attributes:
        prompt: the prompt as given.
        image: the generated image (PIL RGB).
        text: the assistant's reply text (``<image_gen>`` where the image stands).
        seed: this sample's seed (pass ``seeds=[seed]`` to regenerate it alone).
        previews: per-scale previews (empty unless requested); the last equals ``image``.
        codes: per-scale codes, S tensors (pn^2,).
        finish_reason: ``"image"`` (ended after the image, the default), or with ``finish_reply=True``
            the reply's own ending: ``"stop"`` or ``"length"`` (:class:`~vargpt.generation.reply.Response`).
        image_forced: with ``lead_in=True``, the model had not started the image itself when its text budget
            ran out, so the start was forced (it wrote text instead of drawing).
    """

    prompt: str
    image: Image.Image
    text: str
    seed: int
    previews: list[Image.Image] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "image"
    image_forced: bool = False


class Pipeline:
    """A loaded VARGPT model with its tokenizer and image processor.

    Args:
        model: a :class:`vargpt.model.VARGPT` (put in eval mode).
        tokenizer: its HF text tokenizer.
    """

    def __init__(self, model, tokenizer) -> None:  # noqa: ANN001
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = ImageProcessor.from_config(model.cfg.vision_tower)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        """Load a directory written by :func:`vargpt.pretrained.save_pretrained` (raises ``CheckpointError``)."""
        from vargpt.pretrained import load_pretrained

        model, tokenizer = load_pretrained(model_dir, device=device)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return self.model.vae_local.quantize.embedding.weight.device

    @property
    def default_sampling(self) -> SamplingConfig:
        """The checkpoint's sampling settings (``VARGPTConfig.sampling``)."""
        return self.model.cfg.sampling

    # ---- public API ------------------------------------------------------------------------------
    def __call__(self, messages: Sequence[Any], images: Sequence[ImageInput] | None = None, *,
                 sampling: SamplingConfig | None = None) -> Response:
        """Same as :meth:`chat`."""
        return self.chat(messages, images, sampling=sampling)

    def chat(self, messages: Sequence[Any], images: Sequence[ImageInput] | None = None, *,
             sampling: SamplingConfig | None = None) -> Response:
        """Reply to a conversation with text and images (see :mod:`vargpt.generation.prompts` for inputs)."""
        return self.chat_batch([messages], None if images is None else [images], sampling=sampling)[0]

    def chat_batch(self, conversations: Sequence[Sequence[Any]],
                   images: Sequence[Sequence[ImageInput] | None] | None = None, *,
                   sampling: SamplingConfig | None = None, batch_size: int = 16,
                   seeds: Sequence[int] | None = None) -> list[Response]:
        """Reply to many conversations in batches.

        ``images[i]`` goes to conversation i's last user turn; ``seeds`` (one per conversation)
        override the derivation from ``sampling.seed``.
        """
        if images is not None and len(images) != len(conversations):
            raise GenerationInputError(f"{len(images)} image lists for {len(conversations)} conversations")
        sampling = sampling or self.default_sampling
        prompts = [self.encode(c, None if images is None else images[i]) for i, c in enumerate(conversations)]
        seeds = self._check_seeds(seeds, sampling, len(prompts))
        options = ReplyOptions(max_images=sampling.max_images, text_deltas=False)
        return [r for _, rs in self._batches(prompts, seeds, sampling, options, batch_size) for r in rs]

    def stream(self, messages: Sequence[Any], images: Sequence[ImageInput] | None = None, *,
               sampling: SamplingConfig | None = None, previews: bool = True) -> Iterator[Event]:
        """Reply to one conversation as a stream of events (all with ``row == 0``).

        Yields :class:`TextDelta` as text is decoded, one :class:`ImagePreview` per scale while an
        image is generated (when ``previews``; the last equals the final image), :class:`ImageDone` with
        the final image, and finally :class:`ReplyDone` with the whole :class:`Response`.
        """
        sampling = sampling or self.default_sampling
        prompt = self.encode(messages, images)
        seed = self._seeds(sampling, 1)[0]
        yield from generate_replies(
            self.model, self.tokenizer, [prompt], processor=self.processor, sampling=sampling,
            generators=[make_generator(seed, self.device)], seeds=[seed],
            options=ReplyOptions(max_images=sampling.max_images, previews=previews), null_ids=self._null_ids())

    def generate_images(
        self,
        prompts: Sequence[str],
        *,
        n_per_prompt: int = 1,
        sampling: SamplingConfig | None = None,
        batch_size: int = 16,
        seeds: Sequence[int] | None = None,
        previews: bool = False,
        lead_in: bool = False,
        finish_reply: bool = False,
    ) -> list[GeneratedImage]:
        """Text-to-image for many prompts at once (see the module docstring for seeds and forcing).

        Args:
            prompts: image descriptions (user turns; escaped).
            n_per_prompt: samples per prompt.
            sampling: settings (default: the checkpoint's); ``seed`` is the base seed.
            batch_size: samples per batch.
            seeds: explicit per-sample seeds (``len(prompts) * n_per_prompt``), overriding the derivation.
            previews: keep the per-scale previews.
            lead_in: let the model write its lead-in text before the image instead of forcing the start.
            finish_reply: after the image, let the reply go on as a chat would, until the model writes
                ``</s>`` or the text budget ends (``.text`` then holds what follows the image, and
                ``.finish_reason`` says which ended it); no second image is started. Default: stop at
                the image.

        Returns:
            ``len(prompts) * n_per_prompt`` samples, prompt-major.
        """
        return list(self.iter_images(prompts, n_per_prompt=n_per_prompt, sampling=sampling, batch_size=batch_size,
                                     seeds=seeds, previews=previews, lead_in=lead_in, finish_reply=finish_reply))

    def iter_images(
        self,
        prompts: Sequence[str],
        *,
        n_per_prompt: int = 1,
        sampling: SamplingConfig | None = None,
        batch_size: int = 16,
        seeds: Sequence[int] | None = None,
        previews: bool = False,
        lead_in: bool = False,
        finish_reply: bool = False,
    ) -> Iterator[GeneratedImage]:
        """:meth:`generate_images` as an iterator: samples are yielded batch by batch, in order.

        All inputs are checked before the first batch runs.
        """
        if n_per_prompt < 1:
            raise GenerationInputError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
        sampling = dataclasses.replace(sampling or self.default_sampling, max_images=1)
        encoded = [self.encode([{"role": "user", "content": p}], force_image=not lead_in, reserve_image=True)
                   for p in prompts]
        items = [i for i in range(len(prompts)) for _ in range(n_per_prompt)]
        seeds = self._check_seeds(seeds, sampling, len(items))
        options = ReplyOptions(max_images=1, min_images=1, stop_after_images=not finish_reply, previews=previews,
                               text_deltas=False)
        for start, responses in self._batches([encoded[i] for i in items], seeds, sampling, options, batch_size):
            for i, r in zip(items[start:start + len(responses)], responses, strict=True):
                yield GeneratedImage(prompts[i], r.images[0], r.text, r.seed, r.previews[0] if r.previews else [],
                                     r.image_codes[0], r.finish_reason, r.forced_images > 0)

    def answer(self, images: Sequence[ImageInput], questions: Sequence[str], *, max_new_tokens: int = 16,
               batch_size: int = 64) -> list[str]:
        """Greedy text answers, one per (image, question) pair (batched; no image generation)."""
        if len(images) != len(questions):
            raise GenerationInputError(f"{len(images)} images but {len(questions)} questions")
        sampling = dataclasses.replace(self.default_sampling, text_temperature=0.0, max_new_tokens=max_new_tokens,
                                       max_images=0)
        prompts = [self.encode([{"role": "user", "content": q, "images": [im]}], None)
                   for im, q in zip(images, questions, strict=True)]
        options = ReplyOptions(max_images=0, text_deltas=False)
        batches = self._batches(prompts, [0] * len(prompts), sampling, options, batch_size)
        return [r.text.strip() for _, rs in batches for r in rs]

    # ---- internals -------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Any], images: Sequence[ImageInput] | None = None, *,
               force_image: bool = False, reserve_image: bool = False) -> ChatPrompt:
        """Encode one conversation (:func:`vargpt.generation.prompts.encode_chat`) and check it fits the context.

        Args:
            force_image: end the prompt with ``<image_gen_start>``.
            reserve_image: require room for one image after the prompt (``force_image`` implies it).

        Raises:
            GenerationInputError: bad input, or the prompt (plus one image when required) is longer
                than ``max_position_embeddings``.
        """
        cfg = self.model.cfg
        prompt = encode_chat(messages, images, self.tokenizer, self.model.token_ids,
                             image_tokens=cfg.vision_tower.tokens_per_image, gen_tokens=cfg.vqvae.tokens_total,
                             system_prompt=cfg.chat.system_prompt, force_image=force_image)
        L = cfg.vqvae.tokens_total  # an image takes <image_gen_start>, L slots and <image_gen_end>
        need = len(prompt.ids) + (L + 1 if force_image else L + 2 if reserve_image else 1)
        if need > cfg.llm.max_position_embeddings:
            raise GenerationInputError(
                f"the conversation is {len(prompt.ids)} tokens long (images included) and needs {need} positions, "
                f"but the model's context holds {cfg.llm.max_position_embeddings}; shorten it")
        return prompt

    @staticmethod
    def _seeds(sampling: SamplingConfig, n: int) -> list[int]:
        base = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return [derive_seed(base, i) for i in range(n)]

    def _null_ids(self) -> list[int]:
        return null_prompt_ids(self.tokenizer, self.model.token_ids, system_prompt=self.model.cfg.chat.system_prompt)

    def _check_seeds(self, seeds: Sequence[int] | None, sampling: SamplingConfig, n: int) -> list[int]:
        if seeds is None:
            return self._seeds(sampling, n)
        if len(seeds) != n:
            raise GenerationInputError(f"{len(seeds)} seeds for {n} samples")
        return [int(s) for s in seeds]

    def _batches(self, prompts: Sequence[ChatPrompt], seeds: Sequence[int], sampling: SamplingConfig,
                 options: ReplyOptions, batch_size: int) -> Iterator[tuple[int, list[Response]]]:
        """``(offset, responses)`` per batch of ``batch_size`` prompts."""
        if batch_size < 1:
            raise GenerationInputError(f"batch_size must be >= 1, got {batch_size}")
        null_ids = self._null_ids()
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            gens = [make_generator(s, self.device) for s in chunk_seeds]
            events = generate_replies(self.model, self.tokenizer, chunk, processor=self.processor, sampling=sampling,
                                      generators=gens, seeds=chunk_seeds, options=options, null_ids=null_ids)
            yield start, [e.response for e in events if isinstance(e, ReplyDone)]
