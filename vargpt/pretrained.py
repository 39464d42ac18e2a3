"""Whole-model directories: ``config.json`` + ``model.safetensors`` + the text tokenizer's files.

``save_pretrained(model, tokenizer, dir)`` writes one self-describing directory atomically;
``load_pretrained(dir)`` rebuilds the model from its config alone (no registration, no pickle).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from vargpt.config import VARGPTConfig
from vargpt.special_tokens import SpecialTokenIds
from vargpt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:  # noqa: ANN001 - VARGPT, HF tokenizer
    """Write ``model`` (a :class:`vargpt.model.VARGPT`) and its tokenizer to ``out_dir`` atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return save_checkpoint(out_dir, model_state=model.state_dict(), config=model.cfg.to_dict(), extra_files=files)


def load_tokenizer(path: str | Path):  # noqa: ANN201 - PreTrainedTokenizerFast
    """Load the text tokenizer stored in a model or tokenizer directory (local files only)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no text tokenizer in {path}: {e}") from e


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training-stage output folder holding one in ``model/``."""
    p = Path(path)
    return p / "model" if (p / "model" / "config.json").is_file() else p


def load_pretrained(model_dir: str | Path, *, device: str | torch.device = "cpu"):  # noqa: ANN201
    """Return ``(model, tokenizer)`` from a directory written by :func:`save_pretrained`.

    ``model_dir`` may also be a stage output folder (``vargpt train stageN --out DIR``): its ``model/``.

    Raises:
        CheckpointError: the directory is not a complete VARGPT checkpoint.
    """
    from vargpt.model import VARGPT

    model_dir = resolve_model_dir(model_dir)
    state, config, _ = load_checkpoint(model_dir, with_trainer_state=False)
    cfg = VARGPTConfig.from_dict(config)
    tokenizer = load_tokenizer(model_dir)
    model = VARGPT.from_config(cfg, SpecialTokenIds.from_tokenizer(tokenizer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), tokenizer


def with_vocab_size(cfg: VARGPTConfig, vocab_size: int) -> VARGPTConfig:
    """``cfg`` with the LLM vocabulary set to ``vocab_size`` (after adding special tokens)."""
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=vocab_size))
