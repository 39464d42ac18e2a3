"""VARGPT's three training stages as data (paper section 3.2, Table 2; SPEC 3.9; ARCHITECTURE section 2).

A stage is a :class:`StageSpec`: which parameters train (globs over :class:`vargpt.model.VARGPT`'s
parameter names), which records it trains on, and its :class:`TrainConfig` (optimiser, schedule, loss
weights). One loop (:func:`vargpt.training.loop.train`) runs all three.

| stage | trains | data |
|---|---|---|
| 1 pretrain | generation projectors + decoder condition/start embedding | class-style generation prompts |
| 2 SFT understanding | LLM + understanding projector | understanding conversations + some generation instructions |
| 3 SFT generation | visual decoder + both generation projectors | caption-style generation instructions |
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

from vargpt.config import ConfigError, TrainConfig
from vargpt.data.records import Record

GEN_PROJECTORS = ("image_gen_projector.*", "image_gen_projector_out.*")


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: its training config (trainable globs, optimiser, loss weights) and data selection."""

    name: str
    train: TrainConfig
    select: Callable[[list[Record], int], list[Record]]
    """``select(records, seed) -> records`` of this stage (pure, deterministic for a seed)."""
    description: str = ""


def _class_prompts(records: list[Record], seed: int) -> list[Record]:
    """Stage 1: class-style generation prompts; plain generation records if the data has no classes."""
    out = [r for r in records if r.is_generation and r.cls is not None]
    return out or [r for r in records if r.is_generation]


def _mixed(gen_share: float) -> Callable[[list[Record], int], list[Record]]:
    def select(records: list[Record], seed: int) -> list[Record]:
        """Stage 2: every understanding record plus ``gen_share`` (of the total) generation records."""
        und = [r for r in records if not r.is_generation]
        gen = [r for r in records if r.is_generation and r.cls is None] or [r for r in records if r.is_generation]
        n_gen = min(len(gen), round(gen_share / (1 - gen_share) * len(und))) if und else len(gen)
        return und + random.Random(seed).sample(gen, n_gen)

    return select


def _caption_generation(records: list[Record], seed: int) -> list[Record]:
    """Stage 3: caption-style (non-class) generation instructions; all generation records if none."""
    out = [r for r in records if r.is_generation and r.cls is None]
    return out or [r for r in records if r.is_generation]


def vargpt_stages(preset: str) -> dict[str, StageSpec]:
    """The three stages for a preset: paper Table 2 values for ``vargpt-v1-7b``, tuned values for ``tiny``.

    Raises:
        ConfigError: unknown preset.
    """
    if preset == "vargpt-v1-7b":
        # Paper Table 2: batch 1024/256/1024, lr 1e-3/5e-5/5e-5, cosine, warm-up 0.1, wd 0, epochs 1/1/12.
        t1 = TrainConfig(name="stage1", lr=1e-3, batch_size=8, grad_accum=16, epochs=1, weight_decay=0.0)
        t2 = TrainConfig(name="stage2", lr=5e-5, batch_size=8, grad_accum=4, epochs=1, weight_decay=0.0)
        t3 = TrainConfig(name="stage3", lr=5e-5, batch_size=8, grad_accum=16, epochs=12, weight_decay=0.0)
        align, text3 = 0.0, 0.0
        stage3_trainable = ("vargpt_gen.*", *GEN_PROJECTORS)
    elif preset == "tiny":
        # With the residual decoder input the assembled model already generates as the pretrained decoder;
        # stage 1 starts the projectors and the prompt -> class-condition alignment. Its effect depends on the
        # base models (ablation, README): with the ViT tower's (run E) dropping it cost generation colour
        # 0.84 -> 0.47 and FID 22 -> 86; with the ResNet tower's (run F) colour+shape 0.211 -> 0.184 (noise level).
        t1 = TrainConfig(name="stage1", lr=2e-3, batch_size=32, max_steps=60, weight_decay=0.0, eval_every=30)
        t2 = TrainConfig(name="stage2", lr=5e-4, batch_size=32, max_steps=150, weight_decay=0.0, eval_every=75)
        # Held-out loss every 250 steps in stage 3 (each evaluation costs ~2.6 s; every 50 steps cost 20 s).
        # Stage 3 continues the decoder's class-conditional training (residual decoder input), so it keeps
        # a decoder-like learning rate, and like the decoder it learns more from smaller, more steps:
        # 500 x 16 vs 250 x 32 measured generation colour 0.62 -> 0.68, FID 65.2 -> 43.5 (+44 s).
        # Its code loss clamps every scale's share at >= 0.1 before renormalising (the decoder pretrains with power-2
        # weights: 71% on the last scale, 0.02-4.5% on the first four, where the prompt's colour and layout are
        # drawn; clamped: 7.5% each, 6x6 17%, 8x8 53%). Session 15, stage 3 from one run's stage 2 with four seeds:
        # generation colour+shape 0.656 -> 0.693 on average (higher in all four), colour 0.87 -> 0.90, FID 13.3 -> 12.2.
        # Stage 3 trains the decoder's blocks and head and the output projector only: with the decoder's embeddings
        # (word_embed, positions, levels, start and class rows) and the input projector frozen, nothing before the
        # frozen LLM trains, so autograd skips the LLM's backward pass (0.28 s a step instead of 0.35). Session 24,
        # stage 3 from one run's stage 2, two training seeds x three sampling seeds, at equal time (650 steps of
        # these vs 500 of all of vargpt_gen.* and both projectors): held-out image loss 0.862 vs 0.869, generation
        # colour+shape 0.772 vs 0.755, FID 14.2 vs 15.7.
        t3 = TrainConfig(name="stage3", lr=1e-3, batch_size=16, max_steps=650, weight_decay=0.0, eval_every=325,
                         image_min_scale_share=0.1)
        stage3_trainable: tuple[str, ...] = ("vargpt_gen.blocks.*", "vargpt_gen.head.*", "vargpt_gen.head_nm.*",
                                             "image_gen_projector_out.*")
        # Class prompts are mapped onto the pretrained decoder's class conditions (measured: the code loss
        # alone leaves the prompt unused after stage 1, held-out loss equal with shuffled prompts).
        align = 1.0
        # Stage 3 keeps the text loss (as the official code does in every stage): the LLM is frozen, so its only
        # gradient is that of the text after the image (the closing </s>) into the generation projector that
        # feeds the LLM the image's slots. Without it, stage 3 moved those slot inputs until the frozen LLM went
        # on talking after 11 of 28 drawings ("... <image_gen> ring ring ring ..."; the stage-2 model: 0 of 28);
        # with it 0 of 28, generation colour+shape 0.680 -> 0.691, FID 11.2 -> 10.8 (session 16, run Z's stage 2).
        # With the input projector frozen (above) those slots cannot move; the loss stays for the variants and
        # overrides that train it (`vargpt ablate`, `--set stage3.trainable=...`).
        text3 = 1.0
    else:
        raise ConfigError(f"no stage recipe for preset {preset!r}; choose 'tiny' or 'vargpt-v1-7b'")
    return {
        "stage1": StageSpec(
            name="stage1", select=_class_prompts,
            train=dataclasses.replace(t1, trainable=(*GEN_PROJECTORS, "vargpt_gen.class_*",
                                                     "vargpt_gen.pos_start"),
                                      text_loss_weight=0.0, image_loss_weight=1.0,
                                      cond_align_weight=align),
            description="align: generation projectors + condition/start embedding on class prompts"),
        "stage2": StageSpec(
            name="stage2", select=_mixed(gen_share=0.2),
            train=dataclasses.replace(t2, trainable=("language_model.*", "multi_modal_projector.*"),
                                      text_loss_weight=1.0, image_loss_weight=1.0, cond_align_weight=align),
            description="SFT understanding: LLM + projector on mixed understanding/generation instructions"),
        "stage3": StageSpec(
            name="stage3", select=_caption_generation,
            train=dataclasses.replace(t3, trainable=stage3_trainable,
                                      text_loss_weight=text3, image_loss_weight=1.0, cond_align_weight=align),
            description="SFT generation: visual decoder + generation projectors on generation instructions"),
    }
