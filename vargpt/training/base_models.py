"""The tiny base models VARGPT starts from (what the paper inherits from LLaVA-1.5), trained in order.

=============  ===========================================  =========================================
step           function                                     output directory
=============  ===========================================  =========================================
tokenizer      :func:`~.base_text.train_text_tokenizer`     ``tokenizer/`` (PreTrainedTokenizerFast)
llm            :func:`~.base_text.train_llm`                ``llm/`` (checkpoint/, tokenizer/)
vision         :func:`~.base_vision.train_vision_tower`     ``vision/`` (checkpoint/)
align          :func:`~.base_llava.train_alignment`         ``align/`` (checkpoint/, tokenizer/)
instruct       :func:`~.base_llava.train_instruct`          ``llava/`` (checkpoint/, tokenizer/)
=============  ===========================================  =========================================

Every step reads only a dataset folder in the format of :mod:`vargpt.data.records` (nothing dataset
specific), runs offline on CPU in fp32, shows tqdm progress, checkpoints with exact resume, and returns a
metrics dict. :func:`train_base_models` runs them all; :func:`~.base_llava.load_llava` loads the result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vargpt.config import VARGPTConfig
from vargpt.training.base_llava import (
    ALIGN_TRAIN,
    build_llava,
    build_understanding_data,
    load_llava,
    train_alignment,
    train_instruct,
)
from vargpt.training.base_text import load_llm, load_split, load_text_tokenizer, train_llm, train_text_tokenizer
from vargpt.training.base_vision import load_vision_tower, train_vision_tower

__all__ = [
    "load_llava", "load_llm", "load_text_tokenizer", "load_vision_tower", "train_alignment",
    "train_base_models", "train_instruct", "train_llm", "train_text_tokenizer", "train_vision_tower",
]

STEPS: tuple[str, ...] = ("tokenizer", "llm", "vision", "align", "instruct")


def train_base_models(
    data_dir: str | Path, out_dir: str | Path, *, preset: str = "tiny", resume: bool = True,
    progress: bool = True, step_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train tokenizer, LLM, vision tower, projector alignment and instruction tuning, in order.

    Args:
        data_dir: dataset folder.
        out_dir: receives ``tokenizer/ llm/ vision/ align/ llava/``.
        preset: config preset.
        resume: continue interrupted steps from their checkpoints.
        step_overrides: keyword overrides per step name (see :data:`STEPS`), e.g.
            ``{"vision": {"max_steps": 100, "tower_overrides": {"patch_size": 8}}}``.

    Returns:
        ``{step: metrics, ..., "train_seconds": total wall seconds}``.
    """
    out, kw = Path(out_dir), step_overrides or {}
    common = {"preset": preset, "resume": resume, "progress": progress}
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {
        "tokenizer": train_text_tokenizer(data_dir, out / "tokenizer", preset=preset, **kw.get("tokenizer", {})),
    }
    metrics["llm"] = train_llm(data_dir, out / "tokenizer", out / "llm", **common, **kw.get("llm", {}))
    metrics["vision"] = train_vision_tower(data_dir, out / "tokenizer", out / "vision", **common,
                                           **kw.get("vision", {}))
    # Images are read and preprocessed (or, for a frozen tower, encoded) once for the alignment step; the
    # instruction step computes features with the tower alignment leaves (trained or not).
    model, tokenizer, processor, _ = build_llava(out / "llm", out / "vision", preset=preset)
    align_kw = kw.get("align", {})
    align_trainable = align_kw.get("trainable", ALIGN_TRAIN.trainable)
    tower_trains = any(g.startswith("vision_tower") for g in align_trainable)
    data = build_understanding_data(
        load_split(data_dir, "train"), load_split(data_dir, "test"), tokenizer, model.vision_tower, processor,
        system_prompt=VARGPTConfig.from_name(preset).chat.system_prompt,
        max_length=model.llm.model.config.max_position_embeddings, pixels=tower_trains)
    metrics["align"] = train_alignment(data_dir, out / "llm", out / "vision", out / "align", **common, data=data,
                                       **align_kw)
    metrics["instruct"] = train_instruct(data_dir, out / "align", out / "llava", **common,
                                         data=None if tower_trains else data, **kw.get("instruct", {}))
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    return metrics
