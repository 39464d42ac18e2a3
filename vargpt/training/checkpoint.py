"""Self-describing, atomically written checkpoints: ``model.safetensors`` + ``config.json`` (+ trainer state).

A checkpoint directory is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint where a complete one is expected; the previous one survives until
the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights) and non-contiguous views: store plain copies.
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        if ptr != -1:
            seen.setdefault(ptr, k)
    return out


def save_checkpoint(
    out_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    extra_dirs: dict[str, str | Path] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        out_dir: final directory (replaced if it exists).
        model_state: tensors to store in ``model.safetensors``.
        config: JSON-serialisable config dict (``config.json``).
        trainer_state: optional optimiser/scheduler/step/RNG state (``trainer_state.pt``).
        extra_files: optional ``{name: text or bytes}`` written next to the weights.
        extra_dirs: optional ``{name: existing dir}`` copied in (e.g. a text tokenizer).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint(
    ckpt_dir: str | Path, *, with_trainer_state: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read ``(model_state, config, trainer_state or None)`` from a checkpoint directory."""
    d = Path(ckpt_dir)
    if not (d / MODEL_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        raise CheckpointError(f"{d} is not a checkpoint directory (needs {MODEL_FILE} and {CONFIG_FILE})")
    state = load_file(str(d / MODEL_FILE))
    config = json.loads((d / CONFIG_FILE).read_text())
    trainer = None
    if with_trainer_state and (d / TRAINER_FILE).is_file():
        trainer = torch.load(d / TRAINER_FILE, map_location="cpu", weights_only=False)
    return state, config, trainer


def is_checkpoint(ckpt_dir: str | Path) -> bool:
    """True if ``ckpt_dir`` holds a complete checkpoint."""
    d = Path(ckpt_dir)
    return (d / MODEL_FILE).is_file() and (d / CONFIG_FILE).is_file()


def rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy and torch RNGs (for exact resume)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
