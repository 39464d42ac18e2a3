import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from vargpt.config import TrainConfig
from vargpt.training.loop import TrainingDivergedError, batch_indices, set_trainable, train


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.2)  # randomness that resume must reproduce
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.enc(x)))).squeeze(-1)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [(x[i], y[i]) for i in range(n)]


def _collate(samples):
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def _loss(model, batch):
    x, y = batch
    return {"loss": torch.mean((model(x) - y) ** 2)}


CFG = TrainConfig(name="toy", lr=3e-2, max_steps=30, batch_size=8, grad_accum=2, warmup_ratio=0.1,
                  eval_every=10, seed=3)


def _fresh():
    torch.manual_seed(0)
    return Toy()


def test_loss_falls_and_artifacts_are_written(tmp_path):
    res = train(_fresh(), loss_fn=_loss, train_data=_data(), collate=_collate, cfg=CFG, out_dir=tmp_path,
                eval_data=_data(32, seed=1), progress=False, save_config={"toy": True})
    assert res.steps == 30 and sorted(res.eval_losses) == [0, 10, 20, 30]
    assert res.eval_losses[30] < 0.5 * res.eval_losses[0]
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sum(1 for _ in open(tmp_path / "log.jsonl")) == 30 + 4


def test_custom_eval_fn_is_logged_and_returned_and_survives_resume(tmp_path):
    """eval_fn replaces the default held-out loss: its extra values are logged and returned per step
    (from the log, so an interrupted run's earlier evaluations are kept), in eval mode, without grad."""
    seen = []

    def eval_fn(model, data):
        seen.append((model.training, torch.is_grad_enabled()))
        x, y = _collate(list(data))
        err = model(x) - y
        return {"loss": float(torch.mean(err ** 2)), "mae": float(err.abs().mean())}

    kw = dict(loss_fn=_loss, train_data=_data(), collate=_collate, cfg=CFG, eval_data=_data(32, seed=1),
              progress=False, eval_fn=eval_fn)
    full = train(_fresh(), out_dir=tmp_path / "a", **kw)
    assert sorted(full.eval_metrics) == [0, 10, 20, 30] and set(full.eval_metrics[30]) == {"loss", "mae"}
    assert full.eval_metrics[30]["loss"] == full.eval_losses[30] < 0.5 * full.eval_losses[0]
    assert seen and all(s == (False, False) for s in seen)
    train(_fresh(), out_dir=tmp_path / "b", stop_after_steps=15, **kw)
    resumed = train(_fresh(), out_dir=tmp_path / "b", resume=True, **kw)
    assert sorted(resumed.eval_metrics) == [0, 10, 15, 20, 30]  # a resumed run evaluates where it restarts
    assert resumed.eval_metrics[10] == full.eval_metrics[10]
    logged = [r for r in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if "eval_loss" in r]
    assert [r["eval_mae"] for r in logged] == [full.eval_metrics[s]["mae"] for s in (0, 10, 20, 30)]
    with pytest.raises(ValueError, match="must return a 'loss'"):
        train(_fresh(), out_dir=tmp_path / "c", **{**kw, "eval_fn": lambda m, d: {"mae": 0.0}})


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(_fresh(), loss_fn=_loss, train_data=_data(), collate=_collate, cfg=CFG,
                 out_dir=tmp_path / "a", progress=False)
    part = train(_fresh(), loss_fn=_loss, train_data=_data(), collate=_collate, cfg=CFG,
                 out_dir=tmp_path / "b", progress=False, stop_after_steps=13)
    assert part.steps == 13
    rest = train(_fresh(), loss_fn=_loss, train_data=_data(), collate=_collate, cfg=CFG,
                 out_dir=tmp_path / "b", progress=False, resume=True)
    assert rest.steps == 30
    assert part.train_losses + rest.train_losses == pytest.approx(full.train_losses, rel=1e-6, abs=1e-7)


def test_nan_loss_stops_with_named_error_and_keeps_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        out = _loss(model, batch)
        return {"loss": out["loss"] * (math.nan if calls["n"] > 10 else 1.0)}

    cfg = TrainConfig(name="toy", lr=1e-2, max_steps=20, batch_size=8, save_every=4)
    with pytest.raises(TrainingDivergedError, match="step 11"):
        train(_fresh(), loss_fn=flaky, train_data=_data(), collate=_collate, cfg=cfg, out_dir=tmp_path,
              progress=False)
    from vargpt.training.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoint")[2]["step"] == 8


def test_set_trainable_globs():
    m = Toy()
    assert set_trainable(m, ["head.*"]) == ["head.weight", "head.bias"]
    assert not m.enc.weight.requires_grad and m.head.weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(m, ["hed.*"])


def test_batch_indices_cover_epochs_and_shard_by_rank():
    it = batch_indices(10, global_batch=4, seed=0, start_batch=0, rank=0, world=1)
    first_epoch = [i for _ in range(2) for i in next(it)] + next(it)[:2]
    assert sorted(first_epoch) == list(range(10))
    # Resuming at batch 3 yields what the 4th batch would have been.
    it2 = batch_indices(10, global_batch=4, seed=0, start_batch=3, rank=0, world=1)
    it1 = batch_indices(10, global_batch=4, seed=0, start_batch=0, rank=0, world=1)
    for _ in range(3):
        next(it1)
    assert next(it1) == next(it2)
    r0 = next(batch_indices(10, global_batch=4, seed=0, start_batch=0, rank=0, world=2))
    r1 = next(batch_indices(10, global_batch=4, seed=0, start_batch=0, rank=1, world=2))
    assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)


def _per_sample_loss(model, batch):
    x, y = batch
    err = (model(x) - y) ** 2
    return {"loss": err.mean(), "sample_losses": err.detach()}


def test_replay_sampler_draws_fresh_first_then_in_proportion_to_loss():
    from vargpt.training.loop import ReplaySampler

    s = ReplaySampler(20, global_batch=8, fraction=0.5, power=1.0, seed=0)
    first = s.next_batch()
    assert len(first) == 8  # nothing scored yet: a second fresh order fills the replay half
    # score: sample 3 is hard, the others seen are easy; unseen samples are never replayed
    s.update(torch.tensor(first), torch.tensor([10.0 if i == 3 else 0.0 for i in first]))
    if 3 not in first:
        s.update(torch.tensor([3]), torch.tensor([10.0]))
    counts = torch.zeros(20)
    for _ in range(50):
        b = s.next_batch()
        assert len(b) == 8
        for i in b[4:]:
            counts[i] += 1
    assert counts[3] == 200  # every replayed draw is the only sample with non-zero loss
    # the fresh half keeps the plain epoch order of batch_indices
    plain = batch_indices(20, global_batch=4, seed=0, start_batch=0, rank=0, world=1)
    s2 = ReplaySampler(20, global_batch=8, fraction=0.5, power=0.0, seed=0)
    assert [s2.next_batch()[:4] for _ in range(3)] == [next(plain) for _ in range(3)]


def test_replay_sampler_with_a_batch_of_one_draws_fresh_samples_only():
    from vargpt.training.loop import ReplaySampler

    s = ReplaySampler(5, global_batch=1, fraction=0.5, power=1.0, seed=0)
    got = []
    for _ in range(5):
        got += s.next_batch()
        s.update(torch.tensor(got[-1:]), torch.tensor([1.0]))
    assert sorted(got) == list(range(5))


def test_replay_needs_per_sample_losses(tmp_path):
    cfg = TrainConfig(name="toy", lr=1e-2, max_steps=3, batch_size=8, replay_fraction=0.25)
    with pytest.raises(ValueError, match="sample_losses"):
        train(_fresh(), loss_fn=_loss, train_data=_data(), collate=_collate, cfg=cfg, out_dir=tmp_path,
              progress=False)


def test_replay_trains_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(name="toy", lr=3e-2, max_steps=30, batch_size=8, grad_accum=2, warmup_ratio=0.1, seed=3,
                      replay_fraction=0.5)
    kw = {"loss_fn": _per_sample_loss, "train_data": _data(), "collate": _collate, "cfg": cfg, "progress": False}
    full = train(_fresh(), out_dir=tmp_path / "a", eval_data=_data(32, seed=1), **kw)
    assert full.eval_losses[30] < 0.5 * full.eval_losses[0]
    part = train(_fresh(), out_dir=tmp_path / "b", stop_after_steps=13, **kw)
    rest = train(_fresh(), out_dir=tmp_path / "b", resume=True, **kw)
    assert part.train_losses + rest.train_losses == pytest.approx(full.train_losses, rel=1e-6, abs=1e-7)
    plain = train(_fresh(), out_dir=tmp_path / "c", **{**kw, "cfg": dataclasses.replace(cfg, replay_fraction=0.0)})
    assert plain.train_losses != pytest.approx(full.train_losses)  # replay changes which samples train
