"""Atomic file writes: a file is either its previous version (or absent) or complete, never partial.

Used for the files whose presence tells a resumed run that something finished (the recipe's step markers,
a stage's ``metrics.json``) and for user-visible outputs (generated PNGs, ``index.jsonl``). Checkpoint
directories have their own directory-level equivalent in :mod:`vargpt.training.checkpoint`. Standard
library only, so importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_json_atomic"]


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace the file ``path`` at once: ``write(tmp)`` fills a temporary file in the same folder,
    which is then renamed over ``path``.

    A failure (or a crash) leaves the previous file, or none, never a partial one; on failure the temporary
    file is removed and the error re-raised. The temporary name carries the process id, so processes writing
    the same path never share one.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps_kwargs: Any) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, indent=2, **dumps_kwargs)`` and a newline, as UTF-8."""
    text = json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
