import pytest
import torch

from vargpt.config import TrainConfig
from vargpt.training.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
from vargpt.training.optim import build_optimizer, build_scheduler, lr_factor


def test_atomic_save_load_and_replace(tmp_path, monkeypatch):
    lin = torch.nn.Linear(3, 2)
    state = {"w": lin.weight, "tied": lin.weight, "b": lin.bias}
    out = save_checkpoint(tmp_path / "ck", model_state=state, config={"a": 1}, trainer_state={"step": 3},
                          extra_files={"note.txt": "hi"})
    s, c, t = load_checkpoint(out)
    assert torch.equal(s["w"], lin.weight) and torch.equal(s["tied"], lin.weight)
    assert c == {"a": 1} and t == {"step": 3} and (out / "note.txt").read_text() == "hi"

    # A failure while writing a new checkpoint leaves the old one intact and no temp dirs behind.
    import vargpt.training.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(out, model_state=state, config={"a": 2})
    assert load_checkpoint(out)[1] == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_missing_checkpoint_is_named_error(tmp_path):
    assert not is_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_optimizer_groups_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, warmup_ratio=0.1, max_steps=100)
    opt = build_optimizer(model.named_parameters(), cfg)
    decays = sorted(len(g["params"]) for g in opt.param_groups)
    assert decays == [1, 3]  # one matrix decays; bias + LN weight/bias don't
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_factor(50, 100, TrainConfig(schedule="constant", warmup_ratio=0.0)) == 1.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.named_parameters(), cfg)


def test_optimizer_is_fused_and_updates_as_torchs_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    opt = build_optimizer(model.named_parameters(), cfg)
    assert all(g["fused"] for g in opt.param_groups)
    # The reference: torch's per-tensor loop over the same groups and hyperparameters.
    ref = torch.optim.AdamW([{"params": [twin[0].weight, twin[2].weight], "weight_decay": 0.1},
                             {"params": [twin[0].bias, twin[1].weight, twin[1].bias, twin[2].bias],
                              "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Where the fused kernel does not apply (here: complex parameters), the loop is used instead of an error.
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    assert not any(g["fused"] for g in build_optimizer([("z", z)], cfg).param_groups)
