"""The dataset format: a folder with ``train.jsonl`` / ``test.jsonl`` (or LLaVA-1.5 JSON) and images.

One record per line::

    {"messages": [{"role": "user", "content": "<image>\\nWhat colour is the circle?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/000001.png"],
     "class": "red circle",          # optional
     "meta": {...}}                  # optional, free-form (evaluation uses it)

``<image>`` in a user (or system) turn is an input image; ``<image_gen>`` in an assistant turn is an
image the model must generate; ``images`` lists them in order of appearance. Paths are relative to the
dataset folder and may not escape it.

LLaVA-1.5 JSON (a list of ``{"image": path, "conversations": [{"from": "human"|"gpt", "value"}]}``,
file ``{split}.json``) is read into the same :class:`Record`.

Every problem raises :class:`DatasetError` whose message names the file, the line and what to fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vargpt.special_tokens import IMAGE, IMAGE_GEN

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A dataset record or image is invalid; the message says where and what to fix."""


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One training/evaluation example.

    Attributes:
        messages: the conversation.
        images: absolute image paths, in order of appearance of ``<image>``/``<image_gen>``.
        cls: optional class label (class-conditional generation, e.g. "red circle").
        meta: free-form metadata (question type, attributes ...).
        source: "file:line" for error messages.
    """

    messages: tuple[Message, ...]
    images: tuple[Path, ...] = ()
    cls: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    def placeholders(self) -> list[str]:
        """The placeholders (``<image>`` or ``<image_gen>``) in order of appearance."""
        out: list[str] = []
        for m in self.messages:
            out.extend(_placeholders_in(m.content))
        return out

    @property
    def input_images(self) -> list[Path]:
        """Images behind ``<image>`` placeholders."""
        return [p for p, t in zip(self.images, self.placeholders(), strict=True) if t == IMAGE]

    @property
    def generated_images(self) -> list[Path]:
        """Images behind ``<image_gen>`` placeholders (generation targets)."""
        return [p for p, t in zip(self.images, self.placeholders(), strict=True) if t == IMAGE_GEN]

    @property
    def is_generation(self) -> bool:
        """True if the assistant must generate at least one image."""
        return any(t == IMAGE_GEN for t in self.placeholders())

    @property
    def is_understanding(self) -> bool:
        """True if at least one image is an input."""
        return any(t == IMAGE for t in self.placeholders())

    def to_json(self, root: str | Path) -> dict[str, Any]:
        """The native-format object of this record (the inverse of :func:`parse_record`), with image
        paths relative to the dataset folder ``root`` (raises ``ValueError`` for an image outside it)."""
        base = Path(root).resolve()
        obj: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in self.messages],
                               "images": [Path(p).resolve().relative_to(base).as_posix() for p in self.images]}
        if self.cls is not None:
            obj["class"] = self.cls
        if self.meta:
            obj["meta"] = self.meta
        return obj


def _placeholders_in(text: str) -> list[str]:
    found: list[tuple[int, str]] = []
    for tok in (IMAGE, IMAGE_GEN):
        start = 0
        while (i := text.find(tok, start)) >= 0:
            found.append((i, tok))
            start = i + len(tok)
    return [t for _, t in sorted(found)]


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


class _ImageResolver:
    """Relative image path -> absolute path under ``root``, validated; each distinct path once.

    A dataset names the same image from many records (ShapesWorld: ~7 records per image), and
    ``Path.resolve`` costs a system call per path component, so one load of a 30k-record split spent
    most of its time resolving. The root is resolved once, each distinct string once.
    """

    def __init__(self, root: Path, check: bool) -> None:
        self.root, self.check = root, check
        self.base = root.resolve()
        self.seen: dict[str, Path] = {}

    def __call__(self, rel: Any, where: str) -> Path:
        if isinstance(rel, str) and (hit := self.seen.get(rel)) is not None:
            return hit
        if not isinstance(rel, str) or not rel:
            raise DatasetError(f"{where}: image path must be a non-empty string, got {rel!r}")
        if Path(rel).is_absolute():
            raise DatasetError(f"{where}: image path {rel!r} must be relative to the dataset folder")
        path = (self.base / rel).resolve()
        if not path.is_relative_to(self.base):
            raise DatasetError(f"{where}: image path {rel!r} escapes the dataset folder {self.root}")
        if self.check and not path.is_file():
            raise DatasetError(f"{where}: image file not found: {rel!r} (looked for {path})")
        self.seen[rel] = path
        return path


def parse_record(obj: Any, root: Path, where: str, *, check_images: bool = True,
                 resolver: _ImageResolver | None = None) -> Record:
    """Validate one JSON object of the native format and return a :class:`Record`.

    ``resolver`` (internal) shares resolved image paths across the records of one file.
    """
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"messages", "images", "class", "meta"}
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: messages, images, class, meta")
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise DatasetError(f"{where}: messages[{i}] has unknown role {m.get('role')!r}; use one of {ROLES}")
        if m["role"] != "assistant" and IMAGE_GEN in m["content"]:
            raise DatasetError(f"{where}: messages[{i}] ({m['role']}) contains {IMAGE_GEN}; "
                               "generated images belong in assistant turns")
        if m["role"] == "assistant" and IMAGE in m["content"]:
            raise DatasetError(f"{where}: messages[{i}] (assistant) contains {IMAGE}; "
                               f"input images belong in user turns (use {IMAGE_GEN} for generated ones)")
        messages.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant turn (nothing to learn or evaluate)")
    images_raw = obj.get("images", [])
    if not isinstance(images_raw, list):
        raise DatasetError(f"{where}: 'images' must be a list of relative paths")
    resolve = resolver or _ImageResolver(root, check_images)
    images = tuple(resolve(p, where) for p in images_raw)
    rec = Record(tuple(messages), images, obj.get("class"), obj.get("meta") or {}, where)
    n_slots = len(rec.placeholders())
    if n_slots != len(images):
        raise DatasetError(f"{where}: {n_slots} image placeholder(s) ({IMAGE}/{IMAGE_GEN}) in the messages "
                           f"but {len(images)} path(s) in 'images'; they must match one to one")
    if rec.cls is not None and not isinstance(rec.cls, str):
        raise DatasetError(f"{where}: 'class' must be a string, got {rec.cls!r}")
    if not isinstance(rec.meta, dict):
        raise DatasetError(f"{where}: 'meta' must be an object")
    return rec


def _llava_to_native(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise DatasetError(f"{where}: a LLaVA record needs a 'conversations' list")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for i, turn in enumerate(obj["conversations"]):
        if not isinstance(turn, dict) or turn.get("from") not in roles:
            raise DatasetError(f"{where}: conversations[{i}] has unknown 'from' "
                               f"{turn.get('from') if isinstance(turn, dict) else turn!r}; use human/gpt")
        messages.append({"role": roles[turn["from"]], "content": str(turn.get("value", ""))})
    image = obj.get("image")
    images = [image] if isinstance(image, str) else list(image or [])
    return {"messages": messages, "images": images}


def iter_records(data_dir: str | Path, split: str = "train", *, check_images: bool = True) -> Iterator[Record]:
    """Yield the records of ``split`` from ``{split}.jsonl`` (native) or ``{split}.json`` (LLaVA-1.5)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    jsonl, llava = root / f"{split}.jsonl", root / f"{split}.json"
    resolver = _ImageResolver(root, check_images)
    if jsonl.is_file():
        with jsonl.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{jsonl}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
                yield parse_record(obj, root, where, check_images=check_images, resolver=resolver)
    elif llava.is_file():
        try:
            data = json.loads(llava.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{llava}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list):
            raise DatasetError(f"{llava}: a LLaVA file must hold a JSON list of records")
        for n, obj in enumerate(data):
            where = f"{llava}[{n}]"
            yield parse_record(_llava_to_native(obj, where), root, where, check_images=check_images,
                               resolver=resolver)
    else:
        raise DatasetError(f"{root}: no {split}.jsonl (or LLaVA-style {split}.json) in the dataset folder")


def load_records(data_dir: str | Path, split: str = "train", *, check_images: bool = True) -> list[Record]:
    """Read and validate every record of ``split`` (see module docstring for the format).

    The last few files read are remembered in this process (keyed by path and a digest of the content):
    the steps of a pipeline run read the same split several times (each VARGPT stage reads it twice),
    and a re-read returns a new list of the same records (frozen; treat their ``meta`` as read-only)
    without parsing the file again (image files are checked when the split is first read). Splits of more
    than 200,000 records are not remembered.
    """
    root = Path(data_dir)
    files = [f for f in (root / f"{split}.jsonl", root / f"{split}.json") if f.is_file()]
    if not files:
        return list(iter_records(data_dir, split, check_images=check_images))  # raises the named error
    key = (str(root.resolve()), files[0].name, hashlib.sha1(files[0].read_bytes()).hexdigest(), check_images)
    if (hit := _RECENT_LOADS.pop(key, None)) is None:
        hit = tuple(iter_records(data_dir, split, check_images=check_images))
        if len(hit) > _RECENT_LOADS_MAX_RECORDS:
            return list(hit)
    _RECENT_LOADS[key] = hit  # (re)inserted last: the least recently read split is evicted first
    while len(_RECENT_LOADS) > _RECENT_LOADS_MAX:
        _RECENT_LOADS.pop(next(iter(_RECENT_LOADS)))
    return list(hit)


_RECENT_LOADS: dict[tuple, tuple[Record, ...]] = {}
_RECENT_LOADS_MAX = 4  # a dataset's train and test splits, twice over
_RECENT_LOADS_MAX_RECORDS = 200_000  # beyond this, memory matters more than seconds of parsing


def unique_images(records: list[Record]) -> list[Path]:
    """Every distinct image path of ``records``, in first-seen order."""
    return list(dict.fromkeys(p for r in records for p in r.images))


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image as RGB; if ``size`` is given, resize the shorter side and centre-crop to size x size.

    Raises:
        DatasetError: the file is missing, unreadable or corrupt.
    """
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e} (is it a valid PNG/JPEG?)") from e
    return img if size is None else resize_center_crop(img, size)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic; no-op if already there) and centre-crop a square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 tensor (3, H, W) in [-1, 1] (VAR's normalisation, SPEC 1.11)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_image(x_3HW: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB (rounded, clamped)."""
    arr = ((x_3HW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")
