"""Worker for test_distributed.py: a few steps of the shared training loop under `accelerate launch`."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from vargpt.config import TrainConfig
from vargpt.training.loop import train


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    data = [(x[i], y[i]) for i in range(64)]

    def collate(samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def loss_fn(m, batch):
        # Two forward calls before one backward, as stage_loss_fn makes for a grouped mixed batch.
        x, y = batch
        halves = (slice(0, len(x) // 2), slice(len(x) // 2, None))
        return {"loss": torch.cat([(m(x[h]).squeeze(-1) - y[h]) ** 2 for h in halves]).mean()}

    cfg = TrainConfig(name="ddp", lr=1e-2, max_steps=5, batch_size=8, grad_accum=2, warmup_ratio=0.0)
    res = train(model, loss_fn=loss_fn, train_data=data, collate=collate, cfg=cfg, out_dir=out / "run",
                eval_data=data[:16], progress=False, accelerator=acc)
    flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
    torch.save({"weights": flat, "world": acc.num_processes, "steps": res.steps}, out / f"rank{acc.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
