"""Special tokens of VARGPT, their ids, span finders, and escaping of untrusted user text.

* ``<image>``            an input image slot (expanded to P vision-feature slots inside the model).
* ``<image_gen_start>``  emitted by the LLM to switch from next-token to next-scale prediction.
* ``<image_gen>``        dataset placeholder for an image the assistant must generate; the model input
                         expands it to ``<image_gen_start>`` + L generation slots + ``<image_gen_end>``.
* ``<image_gen_end>``    closes a generated image; text resumes after it.
* ``<image_gen_pad>``    one generation slot (never written by users or datasets).

User text must never be able to trigger image generation or inject image slots by *typing* a token
string. :func:`escape` rewrites such substrings so they tokenize as ordinary text; the chat template
escapes every user/system turn and only inserts real placeholders where the caller passes images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IMAGE = "<image>"
IMAGE_GEN_START = "<image_gen_start>"
IMAGE_GEN = "<image_gen>"
IMAGE_GEN_END = "<image_gen_end>"
IMAGE_GEN_PAD = "<image_gen_pad>"
PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"

#: Tokens added to the text tokenizer, in id order after the base vocabulary.
ADDED_TOKENS: tuple[str, ...] = (IMAGE, IMAGE_GEN_START, IMAGE_GEN_END, IMAGE_GEN_PAD, IMAGE_GEN)
#: Strings that untrusted text may not contain verbatim.
RESERVED: tuple[str, ...] = (*ADDED_TOKENS, PAD, BOS, EOS)

# A zero-width joiner after "<" breaks every reserved string (all start with "<") without changing
# how the text reads; tokenizers see an ordinary character sequence instead of the special token.
_ESCAPE_MARK = "\u2060"
_RESERVED_RE = re.compile("|".join(re.escape(t) for t in sorted(RESERVED, key=len, reverse=True)))


def escape(text: str) -> str:
    """Make ``text`` safe: every reserved token string is broken so it can only tokenize as text.

    Idempotent: escaping escaped text changes nothing.
    """
    return _RESERVED_RE.sub(lambda m: "<" + _ESCAPE_MARK + m.group(0)[1:], text)


def unescape(text: str) -> str:
    """Inverse of :func:`escape` for display."""
    return text.replace("<" + _ESCAPE_MARK, "<")


def contains_reserved(text: str) -> bool:
    """True if ``text`` contains any reserved token string verbatim."""
    return _RESERVED_RE.search(text) is not None


def count(text: str, token: str) -> int:
    """Number of verbatim occurrences of ``token`` in ``text``."""
    return text.count(token)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens in one text tokenizer."""

    image: int
    image_gen_start: int
    image_gen_end: int
    image_gen_pad: int
    image_gen: int
    pad: int
    eos: int
    bos: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenIds:  # noqa: ANN001 - any HF tokenizer
        """Look the ids up in an HF tokenizer; raises ``KeyError`` naming a missing token."""

        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id and tok != tokenizer.unk_token:
                raise KeyError(f"tokenizer has no special token {tok!r}; add vargpt.special_tokens.ADDED_TOKENS")
            return int(i)

        return cls(
            image=tid(IMAGE), image_gen_start=tid(IMAGE_GEN_START), image_gen_end=tid(IMAGE_GEN_END),
            image_gen_pad=tid(IMAGE_GEN_PAD), image_gen=tid(IMAGE_GEN),
            pad=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tid(PAD)),
            eos=int(tokenizer.eos_token_id),
            bos=None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        )


def find_spans(ids: Sequence[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` index spans strictly between each ``start_id`` and the next ``end_id``.

    An unterminated final span runs to the end of ``ids``.
    """
    spans: list[tuple[int, int]] = []
    open_at: int | None = None
    for i, t in enumerate(ids):
        if t == start_id and open_at is None:
            open_at = i + 1
        elif t == end_id and open_at is not None:
            spans.append((open_at, i))
            open_at = None
    if open_at is not None:
        spans.append((open_at, len(ids)))
    return spans


def positions(ids: Iterable[int], token_id: int) -> list[int]:
    """Indices where ``token_id`` occurs."""
    return [i for i, t in enumerate(ids) if t == token_id]
