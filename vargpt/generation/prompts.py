"""Chat input at inference -> prompt ids and the images behind their slots (untrusted text, escaped).

Messages are ``{"role", "content"}`` dicts (or :class:`vargpt.data.records.Message`), optionally with
``"images"``: a list of images for that turn. Where images go:

* **user turns**: the turn's ``"images"`` (PIL images or file paths) become real ``<image>`` slots
  placed in front of the turn's text (LLaVA's placement); the ``images=`` argument of the pipeline is
  appended to the *last* user turn's images. Every slot is expanded to P vision-feature slots.
* **assistant turns** (history): each ``<image_gen>`` placeholder in the content stands for an image
  the assistant generated earlier (as :class:`Response.text` writes it); the turn's ``"images"`` must
  hold exactly one entry per placeholder: the per-scale codes (``Response.image_codes``, exact) or a
  PIL image / path (re-tokenised by the VQ-VAE). They become ``<image_gen_start>`` + L slots +
  ``<image_gen_end>`` holding the images' teacher-forcing embeddings, exactly as in training. An
  assistant turn without ``"images"`` keeps its placeholders as plain (escaped) text.

All text (system, user and assistant) is untrusted: reserved token strings such as
``<image_gen_start>`` are escaped (:func:`vargpt.special_tokens.escape`), so typed text can never
inject special tokens; only the images actually passed create slots. The conversation is rendered by
the one chat template (:func:`vargpt.data.conversation.render_segments`) and tokenised segment by
segment exactly as :func:`vargpt.data.collate.encode_record` does in training (no BOS).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vargpt.data.conversation import ConversationError, render_segments
from vargpt.data.records import DatasetError, Message, load_image
from vargpt.generation.errors import GenerationInputError
from vargpt.special_tokens import IMAGE, IMAGE_GEN, SpecialTokenIds, escape

__all__ = ["ChatPrompt", "GenerationInputError", "ImageInput", "codes_to_tensors", "encode_chat", "load_input_image",
           "null_prompt_ids"]

ImageInput = Image.Image | str | Path
"""An input image: a PIL image or the path of an image file."""

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_GEN)}|{re.escape(IMAGE)})")


@dataclass(frozen=True)
class ChatPrompt:
    """One encoded conversation, ready for the model.

    Attributes:
        ids: prompt ids ending with ``ASSISTANT:`` (and ``<image_gen_start>`` when forced); every input
            image expanded to P ``<image>`` slots, every history image to start + L slots + end.
        input_images: the images behind the ``<image>`` slots, in order (PIL, RGB).
        history_images: the earlier generated images behind the generation slots, in order: per-scale
            code lists or PIL images.
    """

    ids: list[int]
    input_images: list[Image.Image]
    history_images: list[Any]


def load_input_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a PIL image or a file path.

    Raises:
        GenerationInputError: the file is missing or not a readable image.
    """
    if isinstance(image, (str, Path)):
        try:
            return load_image(image)
        except DatasetError as e:
            raise GenerationInputError(str(e)) from e
    if isinstance(image, Image.Image):
        try:
            return image.convert("RGB")
        except (OSError, ValueError) as e:
            raise GenerationInputError(f"cannot decode the given image: {e}") from e
    raise GenerationInputError(f"an image must be a PIL image or a file path, got {type(image).__name__}")


def _as_turn(message: Any, i: int) -> tuple[str, str, list[Any]]:
    if isinstance(message, Message):
        return message.role, message.content, []
    if isinstance(message, Mapping) and "role" in message and "content" in message:
        if not isinstance(message["content"], str):
            raise GenerationInputError(f"message {i}: content must be a string")
        return str(message["role"]), message["content"], list(message.get("images") or [])
    raise GenerationInputError(f"message {i}: expected a dict with 'role' and 'content', got {message!r:.80}")


def _assistant_content(content: str, images: list[Any], i: int) -> str:
    pieces = content.split(IMAGE_GEN)
    if images and len(pieces) - 1 != len(images):
        raise GenerationInputError(
            f"message {i}: the assistant turn has {len(pieces) - 1} {IMAGE_GEN} placeholder(s) but "
            f"{len(images)} image(s); pass one image (or Response.image_codes entry) per placeholder")
    joiner = IMAGE_GEN if images else escape(IMAGE_GEN)
    return joiner.join(escape(p) for p in pieces)


def encode_chat(
    messages: Sequence[Any],
    images: Sequence[ImageInput] | None,
    tokenizer,  # noqa: ANN001 - HF tokenizer
    token_ids: SpecialTokenIds,
    *,
    image_tokens: int,
    gen_tokens: int,
    system_prompt: str = "",
    force_image: bool = False,
) -> ChatPrompt:
    """Encode a conversation that ends with a user turn (see the module docstring for image rules).

    Args:
        messages: the conversation, ``[system] (user assistant)* user``.
        images: extra input images for the last user turn.
        tokenizer, token_ids: the text tokenizer and its special ids.
        image_tokens: P, slots per input image; gen_tokens: L, slots per generated image.
        system_prompt: the default system text (trusted config; a ``system`` message overrides it and
            is escaped).
        force_image: append ``<image_gen_start>``: the assistant's reply starts with an image.

    Raises:
        GenerationInputError: empty last message, image/placeholder mismatch, unreadable image.
        ConversationError: no messages or a wrong role order.
    """
    turns = [_as_turn(m, i) for i, m in enumerate(messages)]
    if not turns or turns[-1][0] != "user":
        raise ConversationError("the conversation must end with a user message")
    extra = list(images or [])
    last = turns[-1]
    if not last[1].strip() and not (last[2] or extra):
        raise GenerationInputError("empty message: write some text or attach an image")
    turns[-1] = (last[0], last[1], last[2] + extra)
    rendered: list[Message] = []
    input_images: list[Image.Image] = []
    history: list[Any] = []
    for i, (role, content, turn_images) in enumerate(turns):
        if role == "user":
            input_images += [load_input_image(im) for im in turn_images]
            text = "".join(f"{IMAGE}\n" for _ in turn_images) + escape(content)
        elif role == "assistant":
            text = _assistant_content(content, turn_images, i)
            history += [im if isinstance(im, (list, tuple)) else load_input_image(im) for im in turn_images]
        elif turn_images:
            raise GenerationInputError(f"message {i}: a {role} turn cannot carry images")
        else:
            text = escape(content)
        rendered.append(Message(role, text))
    ids: list[int] = []
    for segment, _ in render_segments(rendered, system_prompt=system_prompt, trusted=True):
        ids += _tokenize(segment, tokenizer, token_ids, image_tokens, gen_tokens)
    if force_image:
        ids.append(token_ids.image_gen_start)
    return ChatPrompt(ids, input_images, history)


def _tokenize(text: str, tokenizer, ids: SpecialTokenIds, image_tokens: int, gen_tokens: int) -> list[int]:  # noqa: ANN001
    """One rendered segment -> ids, placeholders expanded (as :func:`vargpt.data.collate.encode_record`)."""
    out: list[int] = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece == IMAGE:
            out += [ids.image] * image_tokens
        elif piece == IMAGE_GEN:
            out += [ids.image_gen_start] + [ids.image_gen_pad] * gen_tokens + [ids.image_gen_end]
        elif piece:
            out += tokenizer.encode(piece, add_special_tokens=False)
    return out


def null_prompt_ids(tokenizer, token_ids: SpecialTokenIds, *, system_prompt: str = "") -> list[int]:  # noqa: ANN001
    """The prompt-free context of the ``uncond_class`` CFG mode: an empty user turn, then an image.

    ``USER:  ASSISTANT:<image_gen_start>``: the same template (and system text) as every prompt but no
    description, so the LLM's states on it are its unconditional prediction of an image.
    """
    segments = render_segments([Message("user", "")], system_prompt=system_prompt, trusted=True)
    ids = [t for seg, _ in segments for t in tokenizer.encode(seg, add_special_tokens=False)]
    return ids + [token_ids.image_gen_start]


def codes_to_tensors(codes: Sequence[Any], device: torch.device | str) -> list[torch.Tensor]:
    """Per-scale codes of one image (lists or tensors of shape (pn^2,)) -> list of (1, pn^2) long tensors."""
    return [torch.as_tensor(c, dtype=torch.long, device=device).reshape(1, -1) for c in codes]
