"""``vargpt chat`` and ``vargpt generate``: parser builders and handlers over :class:`Pipeline`.

``vargpt/cli.py`` calls :func:`add_chat_parser` and :func:`add_generate_parser` on its subparsers; each
sets ``func`` to its handler. Only this module (and ``cli.py``) write files: every file is written to
a hidden temporary name in the output folder and renamed into place, so nothing is ever half-written.
Heavy imports (torch, the pipeline) happen inside the handlers, so ``vargpt --help`` stays fast.

    vargpt chat --model DIR [--image PATH ...] [MESSAGE]      # one-shot, or a REPL without MESSAGE
    vargpt generate --model DIR --prompt TEXT [-n N] [--seed S] --out DIR

REPL commands: ``/image PATH`` attaches an image to the next message, ``/reset`` clears the
conversation, ``/quit`` (or end of input) leaves. Generated images are saved under ``--out`` and their
paths printed where they stand in the reply.

``generate`` writes ``NNNNN.png`` per sample, optional ``NNNNN_previews.png`` (the per-scale previews
side by side, upscaled to the image size) and ``index.jsonl`` with one line per sample:
``{"prompt", "file", "seed", "base_seed", "text"[, "previews"]}``. Rerunning with the same prompts,
``-n`` and ``--seed`` reproduces every image, whatever ``--batch-size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vargpt.files import atomic_write
from vargpt.generation.errors import GENERATION_ERRORS, GenerationInputError, OutputDirError

__all__ = ["add_chat_parser", "add_generate_parser", "run_chat", "run_generate"]

DEFAULT_CHAT_OUT = Path("vargpt_out")


def _write(text: str, stream: Any = None) -> None:
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model folder (written by save_pretrained)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g = p.add_argument_group("sampling (default: the checkpoint's settings)")
    g.add_argument("--seed", type=int, default=None, help="base seed (default: random)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance strength at the last scale")
    g.add_argument("--cfg-mode", choices=("noise", "uncond_class"), default=None,
                   help="unconditional branch: Gaussian noise (paper) or the LLM on a prompt-free context")
    g.add_argument("--top-k", type=int, default=None, help="image-code top-k (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="image-code nucleus mass (0 = off)")
    g.add_argument("--temperature", type=float, default=None, help="image-code temperature")
    g.add_argument("--text-temperature", type=float, default=None, help="text temperature (0 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="text tokens per reply")


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``chat`` to the ``vargpt`` subparsers: one-shot with MESSAGE, else an interactive REPL."""
    p = subparsers.add_parser("chat", help="chat with text and images in, text and images out",
                              description="Chat with a VARGPT model. With MESSAGE: one reply, then exit. "
                                          "Without: a REPL (/image PATH attaches an image, /reset, /quit).")
    p.add_argument("message", nargs="?", default=None, help="the message (omit for an interactive session)")
    _add_common(p)
    p.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                   help="input image for the (first) message; repeatable")
    p.add_argument("--out", type=Path, default=DEFAULT_CHAT_OUT, help="where generated images go (./vargpt_out)")
    p.add_argument("--max-images", type=int, default=None, help="images per reply")
    p.set_defaults(func=run_chat)
    return p


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to the ``vargpt`` subparsers: batched, seeded text-to-image into a folder."""
    p = subparsers.add_parser("generate", help="text-to-image: PNGs + index.jsonl",
                              description="Generate images for prompts (batched, seeded); writes NNNNN.png and "
                                          "index.jsonl into --out.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeatable")
    src.add_argument("--prompts-file", type=Path, metavar="FILE", help="one prompt per line (blank lines skipped)")
    _add_common(p)
    p.add_argument("-n", "--n-per-prompt", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="samples generated at once")
    p.add_argument("--previews", action="store_true", help="also write NNNNN_previews.png (one tile per scale)")
    p.add_argument("--lead-in", action="store_true",
                   help="let the model write its lead-in text before the image (default: start the image at once)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run_generate)
    return p


# --------------------------------------------------------------------------------------------------
# Files (atomic)
# --------------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """Raise :class:`OutputDirError` unless ``out`` is, or can be created as, a writable folder."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputDirError(f"cannot use {out} as the output folder: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to the output folder {out} ({probe} is not writable)")


def make_out_dir(out: Path) -> Path:
    """Create ``out`` (with parents) and prove it writable; raises :class:`OutputDirError`."""
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".vargpt-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"cannot write to the output folder {out}: {e.strerror or e}") from e
    return out


def _atomic(path: Path, write: Any) -> Path:
    try:
        return atomic_write(path, write)
    except OSError as e:
        raise OutputDirError(f"cannot write {path}: {e.strerror or e}") from e


def save_png(image: Any, path: Path) -> Path:
    """Write a PIL image as PNG atomically."""
    return _atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """Write JSON lines atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def preview_strip(previews: list[Any], size: tuple[int, int]) -> Any:
    """The per-scale previews side by side, each upscaled (nearest) to ``size``."""
    from PIL import Image

    w, h = size
    strip = Image.new("RGB", (w * len(previews), h))
    for i, im in enumerate(previews):
        strip.paste(im.resize(size, Image.Resampling.NEAREST), (i * w, 0))
    return strip


# --------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------


def _sampling(pipe: Any, args: argparse.Namespace, **fixed: Any) -> Any:
    names = ("seed", "cfg", "cfg_mode", "top_k", "top_p", "temperature", "text_temperature", "max_new_tokens",
             "max_images")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return dataclasses.replace(pipe.default_sampling, **{**overrides, **fixed})


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return list(args.prompt)
    try:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationInputError(f"cannot read the prompts file {args.prompts_file}: {e}") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise GenerationInputError(f"no prompts in {args.prompts_file}")
    return prompts


def run_generate(args: argparse.Namespace) -> None:
    """Handler of ``vargpt generate``."""
    prompts = _read_prompts(args)
    check_out_dir(args.out)
    from vargpt.generation.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    base_seed = args.seed if args.seed is not None else secrets.randbits(31)
    sampling = _sampling(pipe, args, seed=base_seed)
    samples = pipe.iter_images(prompts, n_per_prompt=args.n_per_prompt, sampling=sampling,
                               batch_size=args.batch_size, previews=args.previews, lead_in=args.lead_in)
    rows: list[dict] = []
    out = None
    for i, g in enumerate(samples):  # inputs are all checked before the first sample is made
        out = out or make_out_dir(args.out)
        row = {"prompt": g.prompt, "file": save_png(g.image, out / f"{i:05d}.png").name, "seed": g.seed,
               "base_seed": base_seed, "text": g.text}
        if args.previews:
            row["previews"] = save_png(preview_strip(g.previews, g.image.size), out / f"{i:05d}_previews.png").name
        rows.append(row)
    index = write_jsonl(rows, (out or make_out_dir(args.out)) / "index.jsonl")
    _write(json.dumps({"out": str(args.out), "images": len(rows), "index": str(index), "base_seed": base_seed}) + "\n")


class _ChatSession:
    """A conversation on the command line: history, pending images, and where images are saved."""

    def __init__(self, pipe: Any, sampling: Any, out: Path) -> None:
        self.pipe, self.sampling, self.out = pipe, sampling, out
        self.history: list[dict] = []

    def turn(self, text: str, images: list[Path]) -> None:
        from vargpt.generation.reply import ImageDone, ReplyDone, TextDelta
        from vargpt.special_tokens import IMAGE_GEN

        user = {"role": "user", "content": text, "images": [str(p) for p in images]}
        response = None
        for event in self.pipe.stream([*self.history, user], sampling=self.sampling, previews=False):
            if isinstance(event, TextDelta):
                _write(event.text.replace(IMAGE_GEN, ""))
            elif isinstance(event, ImageDone):
                _write(f"\n[image: {self._save(event.image)}]\n")
            elif isinstance(event, ReplyDone):
                response = event.response
        _write("\n")
        self.history += [user, {"role": "assistant", "content": response.text, "images": response.image_codes}]

    def _save(self, image: Any) -> Path:
        out = make_out_dir(self.out)
        taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"image_(\d+)\.png", p.name))]
        return save_png(image, out / f"image_{max(taken, default=-1) + 1:04d}.png")


def run_chat(args: argparse.Namespace) -> None:
    """Handler of ``vargpt chat``: one reply to MESSAGE, or a REPL reading stdin."""
    check_out_dir(args.out)
    from vargpt.generation.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    session = _ChatSession(pipe, _sampling(pipe, args), args.out)
    if args.message is not None:
        session.turn(args.message, list(args.image))
        return
    _repl(session, list(args.image))


def _repl(session: _ChatSession, pending: list[Path]) -> None:
    from vargpt.errors import USER_ERRORS
    from vargpt.generation.prompts import load_input_image

    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return
        line = line.strip()
        try:
            if line.startswith("/image "):
                path = Path(line[len("/image "):].strip())
                load_input_image(path)  # fail now, not with the next message
                pending.append(path)
                _write(f"[attached {path}]\n")
            elif line == "/reset":
                session.history, pending = [], []
                _write("[conversation cleared]\n")
            elif line.startswith("/"):
                _write(f"unknown command {line.split()[0]}; use /image PATH, /reset or /quit\n")
            elif line:
                session.turn(line, pending)
                pending = []
        except (*USER_ERRORS, *GENERATION_ERRORS) as e:  # report and keep the session going
            _write(f"error: {e}\n", sys.stderr)
