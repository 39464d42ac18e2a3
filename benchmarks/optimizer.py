"""The AdamW update every trainer runs, torch's per-tensor loop vs its fused kernel; prints ONE JSON object.

    python benchmarks/optimizer.py --threads 2

``vargpt.training.optim.build_optimizer`` picks torch's fused AdamW kernel wherever it supports the parameters;
on CPU torch's default is a Python loop over the parameter tensors. Reported, for the tiny preset's VQ-VAE,
visual decoder and LLM (random weights and gradients: the update's cost does not depend on their values):

* ``<model>.update_ms_loop`` / ``update_ms_fused``: one ``optimizer.step()`` with both implementations, same
  parameter groups (decay / no decay), best of ``--repeats`` interleaved rounds; ``speedup_update`` their ratio.
* ``<model>.max_param_diff``: the largest parameter difference between the two after ``--check-steps`` updates
  from the same state (the fused kernel computes the same update in another order).
* ``vqvae.step_ms_loop`` / ``step_ms_fused`` / ``speedup_step``: a whole tokenizer training step (forward,
  backward, update; batch ``--batch``, channels-last as the trainer), the share the update is of the work.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from vargpt.config import TrainConfig, VARGPTConfig
from vargpt.llm.backbone import hf_config_from_llm_config
from vargpt.tokenizer.vqvae import MultiScaleVQVAE
from vargpt.training.optim import param_groups
from vargpt.visual_decoder.decoder import VisualDecoder


def _optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    return torch.optim.AdamW(groups, lr=TrainConfig().lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _best_ms(fns: dict[str, Callable[[], None]], iters: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` mean milliseconds per call of each function, the functions interleaved per round."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / iters * 1000)
    return best


def update_costs(model: torch.nn.Module, iters: int, repeats: int, check_steps: int) -> dict:
    """Update time loop vs fused on ``model``'s parameters, and the parameter difference after ``check_steps``."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finals = {}
    for fused in (False, True):
        model.load_state_dict(start)
        opt = _optimizer(model, fused)
        for _ in range(check_steps):
            opt.step()
        finals[fused] = [p.detach().clone() for p in model.parameters()]
    diff = max(float((a - b).abs().max()) for a, b in zip(finals[False], finals[True], strict=True))
    opts = {"loop": _optimizer(model, False), "fused": _optimizer(model, True)}
    ms = _best_ms({k: o.step for k, o in opts.items()}, iters, repeats)
    return {"tensors": sum(1 for _ in model.parameters()), "params": sum(p.numel() for p in model.parameters()),
            "update_ms_loop": round(ms["loop"], 3), "update_ms_fused": round(ms["fused"], 3),
            "speedup_update": round(ms["loop"] / ms["fused"], 2), "max_param_diff": diff}


def tokenizer_step_costs(vqvae: MultiScaleVQVAE, batch: int, iters: int, repeats: int) -> dict:
    """A whole tokenizer training step (forward, backward, update) with each optimizer."""
    vqvae = vqvae.to(memory_format=torch.channels_last).train()
    size = vqvae.cfg.image_size
    x = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    opts = {"loop": _optimizer(vqvae, False), "fused": _optimizer(vqvae, True)}

    def step(opt: torch.optim.Optimizer) -> None:
        recon, _, vq_loss = vqvae(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = _best_ms({k: (lambda o=o: step(o)) for k, o in opts.items()}, iters, repeats)
    return {"step_ms_loop": round(ms["loop"], 2), "step_ms_fused": round(ms["fused"], 2),
            "speedup_step": round(ms["loop"] / ms["fused"], 3), "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50, help="updates per timed round")
    ap.add_argument("--step-iters", type=int, default=10, help="tokenizer training steps per timed round")
    ap.add_argument("--check-steps", type=int, default=10, help="updates before comparing parameters")
    ap.add_argument("--batch", type=int, default=16, help="tokenizer training batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = VARGPTConfig.from_name("tiny")
    torch.manual_seed(0)
    models = {
        "vqvae": MultiScaleVQVAE(cfg.vqvae),
        "visual_decoder": VisualDecoder(cfg.visual_decoder, cfg.vqvae),
        "llm": AutoModelForCausalLM.from_config(hf_config_from_llm_config(cfg.llm)),
    }
    result: dict = {"threads": args.threads, "torch": torch.__version__}
    for name, model in models.items():
        result[name] = update_costs(model, args.iters, args.repeats, args.check_steps)
    result["vqvae"] |= tokenizer_step_costs(models["vqvae"], args.batch, args.step_iters, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
