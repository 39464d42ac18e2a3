"""The one chat template (vicuna style, SPEC 3.3). The prompt format lives here and nowhere else.

Rendered layout (system prompt optional)::

    {system} USER: {user} ASSISTANT: {assistant}</s>USER: {user} ASSISTANT:

Dataset records are *trusted*: their ``<image>``/``<image_gen>`` placeholders are real. Text typed by a
user at inference is *untrusted*: :func:`render_prompt` escapes reserved token strings in it (see
:func:`vargpt.special_tokens.escape`), and real ``<image>`` slots are only inserted for images the
caller actually passes (:func:`user_turn_with_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vargpt.special_tokens import EOS, IMAGE, escape


class _Turn(Protocol):
    role: str
    content: str


class ConversationError(ValueError):
    """The conversation cannot be rendered (empty, wrong role order)."""


USER_TAG = "USER:"
ASSISTANT_TAG = "ASSISTANT:"


def _clean(text: str, trusted: bool) -> str:
    return text if trusted else escape(text)


def render_segments(
    messages: Sequence[_Turn], *, system_prompt: str = "", trusted: bool = True
) -> list[tuple[str, bool]]:
    """Render a conversation into text pieces; the flag is True for assistant target text.

    Target pieces are the assistant content followed by ``</s>``; everything else (system text, user
    turns, role tags) is context. Tokenize each piece separately and concatenate, so that target
    boundaries never fall inside a token. A ``system`` message overrides ``system_prompt``.

    Raises:
        ConversationError: no messages, or a turn order other than [system] (user assistant)* [user].
    """
    if not messages:
        raise ConversationError("empty conversation: pass at least one user message")
    msgs = list(messages)
    if msgs[0].role == "system":
        system_prompt, msgs = msgs[0].content, msgs[1:]
    segments: list[tuple[str, bool]] = []
    prefix = (_clean(system_prompt, trusted) + " ") if system_prompt else ""
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ConversationError(f"message {i} has role {m.role!r}; expected {expected!r} "
                                    "(turns must alternate user/assistant after an optional system message)")
        if m.role == "user":
            segments.append((f"{prefix}{USER_TAG} {_clean(m.content, trusted)} {ASSISTANT_TAG}", False))
            prefix = ""
        else:
            segments.append((f" {_clean(m.content, trusted)}{EOS}", True))
    return segments


def render_prompt(
    messages: Sequence[_Turn], *, system_prompt: str = "", add_generation_prompt: bool = True,
    trusted: bool = False,
) -> str:
    """Render a conversation as one string, ending with ``ASSISTANT:`` when a reply is expected.

    ``trusted=False`` (the default, for user input) escapes reserved token strings in every turn.
    """
    segments = render_segments(messages, system_prompt=system_prompt, trusted=trusted)
    if add_generation_prompt and messages[-1].role != "user":
        raise ConversationError("the last message must be from the user to ask for a reply")
    return "".join(text for text, _ in segments)


def user_turn_with_images(text: str, n_images: int) -> str:
    """Untrusted user text with ``n_images`` real ``<image>`` slots in front, as LLaVA places them.

    The text is escaped here, so the result must then be rendered with ``trusted=True``.
    """
    return "".join(f"{IMAGE}\n" for _ in range(n_images)) + escape(text)
