"""One training loop for every trainable piece (VARGPT stages and base models), on Hugging Face accelerate.

Distribution (DDP, FSDP, DeepSpeed) comes from accelerate's launcher/config, not from this code; the
model is unchanged. What the loop gives every caller:

* trainable set by fnmatch globs (``TrainConfig.trainable``), AdamW with decay groups, warm-up + cosine;
* gradient accumulation (no gradient sync on non-final micro-steps), global-norm clipping;
* a deterministic, resumable data order: epoch ``e`` is a permutation seeded by ``seed + e``, each
  process takes every ``world``-th sample of each global batch, and the position is the step counter;
* optional hard-example replay (``TrainConfig.replay_fraction``): part of each batch is re-drawn from the
  samples seen so far in proportion to their last loss (:class:`ReplaySampler`);
* tqdm progress with loss and samples/s, periodic held-out loss, ``log.jsonl``, ``loss.png``;
* atomic safetensors checkpoints (``checkpoint/``) every ``save_every`` steps and at the end, holding
  model, optimiser, scheduler, step and RNG state, so ``resume=True`` continues exactly;
* a NaN/Inf loss stops the run with :class:`TrainingDivergedError`; the last good checkpoint stays.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vargpt.config import TrainConfig
from vargpt.training.checkpoint import is_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vargpt.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
"""``loss_fn(model, batch) -> {"loss": scalar, ...other scalars}``; with hard-example replay also
``"sample_losses"``: a ``(B,)`` tensor, each sample's own loss, in batch order."""

SAMPLE_LOSSES = "sample_losses"
"""Key of the per-sample losses in a loss function's output (needed by hard-example replay)."""

EvalFn = Callable[[nn.Module, Sequence], dict[str, float]]
"""``eval_fn(model, eval_data) -> {"loss": float, ...other floats}``: a custom held-out evaluation (see
:func:`train`)."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    steps: int
    train_losses: list[float]
    eval_losses: dict[int, float]
    seconds: float
    checkpoint: Path | None
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Every held-out evaluation's full output by step (``{"loss": ...}`` without an ``eval_fn``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        evals = sorted(self.eval_losses.items())
        return {
            "steps": self.steps,
            "train_loss_first": self.train_losses[0] if self.train_losses else None,
            "train_loss_last": self.train_losses[-1] if self.train_losses else None,
            "heldout_loss_before": evals[0][1] if evals else None,
            "heldout_loss_after": evals[-1][1] if evals else None,
            "train_seconds": round(self.seconds, 2),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter, then unfreeze those whose name matches a glob; return the trainable names.

    An empty ``patterns`` leaves every parameter trainable.

    Raises:
        ValueError: a pattern matches no parameter (a typo would silently freeze everything).
    """
    names = [n for n, _ in model.named_parameters()]
    if not patterns:
        for p in model.parameters():
            p.requires_grad_(True)
        return names
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"trainable pattern {pat!r} matches no parameter of {type(model).__name__}")
    chosen = []
    for n, p in model.named_parameters():
        on = any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
        p.requires_grad_(on)
        if on:
            chosen.append(n)
    return chosen


def total_steps_for(cfg: TrainConfig, n_samples: int, world: int = 1) -> int:
    """Optimiser steps of a run: ``max_steps``, or ``epochs`` over the data when ``epochs > 0``."""
    if cfg.epochs > 0:
        per_step = cfg.batch_size * cfg.grad_accum * world
        return max(1, math.ceil(cfg.epochs * n_samples / per_step))
    return cfg.max_steps


def batch_indices(
    n: int, *, global_batch: int, seed: int, start_batch: int, rank: int, world: int
) -> Iterator[list[int]]:
    """This process's sample indices for global batches ``start_batch, start_batch+1, ...`` (endless).

    Epoch ``e`` visits a permutation seeded by ``seed + e``; the last partial batch of an epoch wraps
    into the next epoch so every global batch is full.
    """
    if n <= 0:
        raise ValueError("the training set is empty")
    pos = start_batch * global_batch
    epoch, offset = divmod(pos, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    while True:
        batch: list[int] = []
        while len(batch) < global_batch:
            if offset == n:
                epoch, offset = epoch + 1, 0
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            take = min(global_batch - len(batch), n - offset)
            batch.extend(perm[offset:offset + take])
            offset += take
        yield batch[rank::world]


class ReplaySampler:
    """Global batches mixing fresh samples (the epoch order of :func:`batch_indices`) with replayed ones.

    Of each global batch of ``B`` samples, ``round(fraction * B)`` are drawn (with replacement) from the
    samples already trained on, with probability proportional to ``last_loss ** power``; the rest continue
    the plain epoch order. A sample's score is its loss the last time it was in a batch, so replayed samples
    that became easy fade out. Short runs that see a fraction of an epoch spend more of their steps where
    the model is still wrong (in the tiny LLaVA: questions about one of two objects). Everything is
    deterministic in ``(seed, batch number, scores)``, and :meth:`state_dict` holds what resume needs.
    """

    def __init__(self, n: int, *, global_batch: int, fraction: float, power: float, seed: int,
                 start_batch: int = 0) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"replay fraction must be in (0, 1), got {fraction}")
        self.n_replay = min(global_batch - 1, max(1, round(fraction * global_batch)))
        self.n_fresh = global_batch - self.n_replay
        self.power, self.seed, self.batch = power, seed, start_batch
        self.scores = torch.full((n,), float("nan"))
        self._fresh = batch_indices(n, global_batch=self.n_fresh, seed=seed, start_batch=start_batch, rank=0,
                                    world=1)

    def next_batch(self) -> list[int]:
        """Indices of the next global batch: fresh ones first, then replayed ones."""
        fresh = next(self._fresh)
        seen = ~torch.isnan(self.scores)
        if self.n_replay == 0:  # a global batch of one sample has no room for replay
            replay: list[int] = []
        elif not bool(seen.any()):  # nothing scored yet: a whole batch of fresh samples
            extra = batch_indices(len(self.scores), global_batch=self.n_replay, seed=self.seed + 7919,
                                  start_batch=self.batch, rank=0, world=1)
            replay = next(extra)
        else:
            weights = torch.where(seen, self.scores.clamp_min(0.0) ** self.power, torch.zeros(()))
            if float(weights.sum()) <= 0.0:
                weights = seen.float()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch)
            replay = torch.multinomial(weights, self.n_replay, replacement=True, generator=gen).tolist()
        self.batch += 1
        return fresh + replay

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the losses of the samples just trained on (later entries win for repeats)."""
        self.scores[indices.long().cpu()] = losses.detach().float().cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scores"].shape != self.scores.shape:
            raise ValueError(f"replay state holds {state['scores'].numel()} scores but the data has "
                             f"{self.scores.numel()} samples: resume with the same training data")
        self.scores = state["scores"].clone()
        if int(state["batch"]) != self.batch:
            raise ValueError(f"replay state is at batch {state['batch']}, the checkpoint at {self.batch}")


def _evaluate(model: nn.Module, loss_fn: LossFn, data: Sequence, collate: Callable, batch_size: int,
              accelerator) -> float:  # noqa: ANN001
    model.eval()
    total, count = torch.zeros(()), torch.zeros(())
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = list(range(rank, len(data), world))
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            chunk = [data[j] for j in idx[i:i + batch_size]]
            loss = loss_fn(model, collate(chunk))["loss"].detach().float().cpu()
            total += loss * len(chunk)
            count += len(chunk)
    model.train()
    stats = accelerator.reduce(torch.stack([total, count]).to(accelerator.device), reduction="sum")
    return float(stats[0] / stats[1].clamp_min(1))


def _plot(log: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [(r["step"], r["loss"]) for r in log if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train", lw=1)
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    model: nn.Module,
    *,
    loss_fn: LossFn,
    train_data: Sequence,
    collate: Callable[[list], Any],
    cfg: TrainConfig,
    out_dir: str | Path,
    eval_data: Sequence | None = None,
    save_config: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
    accelerator=None,  # noqa: ANN001 - accelerate.Accelerator
    eval_fn: EvalFn | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data`` with ``loss_fn``; checkpoint to ``out_dir/checkpoint``.

    Args:
        model: any module; parameters matching ``cfg.trainable`` train, the rest are frozen.
        loss_fn: ``(model, batch) -> {"loss": scalar tensor, ...}``; extra scalars are logged.
        train_data: indexable samples; ``collate(list_of_samples) -> batch``.
        cfg: optimiser, schedule, batch size, steps, clipping, eval/save cadence, seed.
        out_dir: receives ``checkpoint/``, ``log.jsonl``, ``loss.png``.
        eval_data: held-out samples for the periodic held-out loss (start, every ``eval_every``, end).
        save_config: the config dict stored in the checkpoint's ``config.json``.
        resume: continue from ``out_dir/checkpoint`` if present (exactly: weights, optimiser,
            scheduler, data position, RNG).
        progress: show a progress bar (main process only).
        stop_after_steps: stop (with a checkpoint) after this many steps of *this* invocation; for
            time-boxed runs and interruption tests.
        accelerator: an ``accelerate.Accelerator``; default: a new one (CPU when no GPU).
        eval_fn: the held-out evaluation, ``(model, eval_data) -> {"loss": float, ...}``, called with the
            unwrapped model in eval mode on every process (each sees all of ``eval_data``); its other
            values are logged as ``eval_<name>`` and returned in ``TrainResult.eval_metrics``. Default: the
            mean of ``loss_fn``'s loss over batches of ``eval_data``, split across processes.

    Raises:
        TrainingDivergedError: the loss became NaN/Inf.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    set_trainable(model, cfg.trainable)
    total = total_steps_for(cfg, len(train_data), acc.num_processes)
    model = model.to(acc.device)
    optimizer = build_optimizer(model.named_parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    step, log, eval_losses, rng, replay_state = 0, [], {}, None, None
    if resume and is_checkpoint(ckpt_dir):
        step, log, eval_losses, rng, replay_state = _restore(model, optimizer, scheduler, ckpt_dir)
        logger.info("%s: resumed at step %d/%d", cfg.name, step, total)
    wrapped, optimizer = acc.prepare(model, optimizer)
    torch.manual_seed(cfg.seed)  # dropout and other in-model randomness
    if rng is not None:
        set_rng_state(rng)  # exact continuation
    global_batch, rank, world = cfg.batch_size * acc.num_processes, acc.process_index, acc.num_processes
    replay = None
    if cfg.replay_fraction > 0:
        replay = ReplaySampler(len(train_data), global_batch=global_batch, fraction=cfg.replay_fraction,
                               power=cfg.replay_power, seed=cfg.seed, start_batch=step * cfg.grad_accum)
        if replay_state is not None:
            replay.load_state_dict(replay_state)
        batches: Iterator[list[int]] = (replay.next_batch()[rank::world] for _ in itertools.count())
    else:
        batches = batch_indices(len(train_data), global_batch=global_batch, seed=cfg.seed,
                                start_batch=step * cfg.grad_accum, rank=rank, world=world)

    def evaluate() -> None:
        if eval_data is not None and len(eval_data) and step not in eval_losses:
            if eval_fn is None:
                metrics = {"loss": _evaluate(wrapped, loss_fn, eval_data, collate, cfg.batch_size, acc)}
            else:
                inner = acc.unwrap_model(wrapped)
                inner.eval()
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in eval_fn(inner, eval_data).items()}
                inner.train()
                if "loss" not in metrics:
                    raise ValueError(f"eval_fn must return a 'loss' entry; it returned {sorted(metrics)}")
            eval_losses[step] = metrics["loss"]
            log.append({"step": step, "eval_loss": metrics["loss"],
                        **{f"eval_{k}": v for k, v in metrics.items() if k != "loss"}})

    def checkpoint() -> Path | None:
        if acc.is_main_process:
            _save(acc.unwrap_model(wrapped), optimizer, scheduler, step, log, eval_losses, ckpt_dir, save_config,
                  replay)
        acc.wait_for_everyone()
        return ckpt_dir

    evaluate()
    wrapped.train()
    t0, losses, last_ckpt = time.perf_counter(), [], ckpt_dir if is_checkpoint(ckpt_dir) else None
    bar = tqdm(total=total, initial=step, desc=cfg.name, disable=not (progress and acc.is_main_process),
               dynamic_ncols=True, leave=False)
    ran = 0
    while step < total and (stop_after_steps is None or ran < stop_after_steps):
        t_step = time.perf_counter()
        logs = _train_step(wrapped, loss_fn, optimizer, train_data, collate, batches, cfg, acc, replay)
        if not math.isfinite(logs["loss"]):
            bar.close()
            raise TrainingDivergedError(
                f"{cfg.name}: loss is {logs['loss']} at step {step + 1}; stopped. The last good checkpoint "
                f"({last_ckpt or 'none yet'}) is kept. Lower the learning rate (now {cfg.lr}) or check the data.")
        scheduler.step()
        step, ran = step + 1, ran + 1
        losses.append(logs["loss"])
        rate = cfg.batch_size * cfg.grad_accum * acc.num_processes / max(1e-9, time.perf_counter() - t_step)
        log.append({"step": step, **logs, "lr": scheduler.get_last_lr()[0], "samples_per_s": round(rate, 1)})
        bar.set_postfix(loss=f"{logs['loss']:.4f}", sps=f"{rate:.0f}")
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            evaluate()
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            last_ckpt = checkpoint()
    bar.close()
    if step >= total:
        evaluate()
    last_ckpt = checkpoint()
    if acc.is_main_process:
        with (out / "log.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in log)
        _plot(log, out / "loss.png", cfg.name)
    evals = {r["step"]: {"loss" if k == "eval_loss" else k.removeprefix("eval_"): v
                         for k, v in r.items() if k.startswith("eval_")} for r in log if "eval_loss" in r}
    return TrainResult(step, losses, dict(eval_losses), time.perf_counter() - t0, last_ckpt, evals)


def _train_step(model, loss_fn, optimizer, data, collate, batches, cfg, acc, replay=None) -> dict[str, float]:  # noqa: ANN001
    """One optimiser step over ``grad_accum`` micro-batches; returns averaged scalars."""
    sums: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        idx = next(batches)
        batch = collate([data[i] for i in idx])
        last = micro == cfg.grad_accum - 1
        with acc.no_sync(model) if not last and acc.num_processes > 1 else nullcontext():
            out = loss_fn(model, batch)
            acc.backward(out["loss"] / cfg.grad_accum)
        per_sample = out.pop(SAMPLE_LOSSES, None)
        if replay is not None:
            if per_sample is None or per_sample.shape != (len(idx),):
                raise ValueError(
                    f"{cfg.name}: replay_fraction={cfg.replay_fraction} needs the loss function to return "
                    f"{SAMPLE_LOSSES!r}, a ({len(idx)},) tensor of per-sample losses; this one returns "
                    f"{None if per_sample is None else tuple(per_sample.shape)}. Set replay_fraction=0.")
            both = torch.stack([torch.tensor(idx, dtype=torch.float64, device=per_sample.device),
                                per_sample.detach().double()], dim=1)
            both = acc.gather(both) if acc.num_processes > 1 else both
            replay.update(both[:, 0].round().long(), both[:, 1].float())
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    if cfg.grad_clip > 0:
        params = [p for p in model.parameters() if p.requires_grad]
        sums["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def _save(model, optimizer, scheduler, step, log, eval_losses, ckpt_dir, config, replay=None) -> None:  # noqa: ANN001
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "rng": rng_state(), "log": log, "eval_losses": eval_losses}
    if replay is not None:
        trainer_state["replay"] = replay.state_dict()
    save_checkpoint(ckpt_dir, model_state=model.state_dict(), config=config or {}, trainer_state=trainer_state)


def _restore(model, optimizer, scheduler, ckpt_dir) -> tuple[int, list, dict, dict | None, dict | None]:  # noqa: ANN001
    state, _, trainer = load_checkpoint(ckpt_dir)
    model.load_state_dict(state)
    if trainer is None:  # weights only: start the schedule afresh
        return 0, [], {}, None, None
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    return (int(trainer["step"]), list(trainer["log"]), dict(trainer["eval_losses"]), trainer["rng"],
            trainer.get("replay"))
