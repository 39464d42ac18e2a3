"""Side-by-side lanes benchmark: the recipe's middle phase one step at a time vs in two lanes, one JSON object.

    python benchmarks/pipeline.py --run runs/tiny                 # a tenth of every step's optimiser steps
    python benchmarks/pipeline.py --run runs/tiny --scale 1       # the recipe's step counts (~17 minutes)

``--run`` is a ``vargpt pipeline`` run folder whose first phase (:data:`vargpt.recipe.PLAN`: data, text
tokenizer, the VQ-VAE's main phase, vision tower) is done. Its outputs are linked into two temporary run
folders, and the middle phase's steps (visual decoder | LLM, alignment, instruction tuning, the VQ-VAE's
decoder finetuning) run in each with their optimiser steps scaled by ``--scale``: first with
``workers=1`` (one step after another in this process, every thread), then with ``workers=2`` (two
spawned processes side by side, the threads split between them). Nothing is written into ``--run``.

Reported:

* ``serial_seconds`` / ``lanes_seconds``: wall time of the phase each way; ``speedup_lanes_vs_serial``
  their ratio (> 1: the lanes are faster); ``step_seconds`` per step each way.
* ``weights``: per step, its checkpoint's tensors compared between the two runs: how many, how many
  differ at all, the largest absolute difference. The lanes hold steps whose training does not depend on
  the thread count, so all but the finetuned VQ-VAE decoder's (~1e-6) should be 0.
* ``steps``: the optimiser steps each step ran; ``threads`` each way; ``torch`` version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vargpt.recipe import PLAN, run_recipe
from vargpt.training.base_llava import ALIGN_TRAIN, INSTRUCT_TRAIN
from vargpt.training.base_text import LLM_TRAIN
from vargpt.training.decoder_trainer import RECIPES as DECODER_RECIPES
from vargpt.training.tokenizer_trainer import RECIPES as TOKENIZER_RECIPES

FIRST, MIDDLE = PLAN[0][0], [name for lane in PLAN[1] for name in lane]
FULL_STEPS = {"decoder": ("max_steps", DECODER_RECIPES["tiny"].max_steps),
              "llm": ("max_steps", LLM_TRAIN.max_steps), "align": ("max_steps", ALIGN_TRAIN.max_steps),
              "instruct": ("max_steps", INSTRUCT_TRAIN.max_steps),
              "tokenizer_finetune": ("finetune_steps", TOKENIZER_RECIPES["tiny"].finetune.max_steps)}
"""The tiny recipe's optimiser steps of the middle phase's steps (scaled by ``--scale``)."""
SEEDED = ("data", "text_tokenizer", "tokenizer_main", "vision")
"""The first phase's output folders, linked into the benchmark's run folders."""
CHECKPOINTS = {"decoder": "decoder/checkpoint", "llm": "llm/checkpoint", "align": "llava_align/checkpoint",
               "instruct": "llava/checkpoint", "tokenizer_finetune": "tokenizer"}


def _seed_run(src: Path, dst: Path) -> None:
    """``dst``: a run folder holding ``src``'s first phase (hard links where possible) and its markers."""
    (dst / "steps").mkdir(parents=True)
    for name in FIRST:
        shutil.copyfile(src / "steps" / f"{name}.json", dst / "steps" / f"{name}.json")
    for folder in SEEDED:
        shutil.copytree(src / folder, dst / folder, copy_function=_link_or_copy)


def _link_or_copy(a: str, b: str) -> None:
    try:
        Path(b).hardlink_to(a)
    except OSError:
        shutil.copy2(a, b)


def _compare(a: Path, b: Path) -> dict[str, float | int]:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diffs = [float((x[k] - y[k]).abs().max()) for k in x if not torch.equal(x[k], y[k])]
    return {"tensors": len(x), "differ": len(diffs), "max_abs_diff": max(diffs, default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a run folder with its first phase done")
    ap.add_argument("--scale", type=float, default=0.1, help="share of the recipe's optimiser steps (default 0.1)")
    args = ap.parse_args()
    missing = [n for n in FIRST if not (args.run / "steps" / f"{n}.json").is_file()]
    missing += [f"{d}/" for d in SEEDED if not (args.run / d).is_dir()]  # e.g. a run of an older recipe
    if missing:
        raise SystemExit(f"{args.run}: {missing} missing: not this recipe's first phase (an older run?); "
                         "run `vargpt pipeline --out RUN` into a new folder first")
    steps = {name: max(1, round(n * args.scale)) for name, (_, n) in FULL_STEPS.items()}
    overrides = {name: {key: steps[name]} for name, (key, _) in FULL_STEPS.items()}
    result: dict = {"scale": args.scale, "steps": steps, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for mode, workers in (("serial", 1), ("lanes", 2)):
            run = Path(tmp) / mode
            _seed_run(args.run, run)
            t0 = time.perf_counter()
            m = run_recipe(out_dir=run, only=MIDDLE, workers=workers, step_overrides=overrides, progress=False)
            result[f"{mode}_seconds"] = round(time.perf_counter() - t0, 2)
            result.setdefault("step_seconds", {})[mode] = {n: m["steps"][n] for n in MIDDLE}
            result.setdefault("threads", {})[mode] = {n: m["step_threads"][n] for n in MIDDLE}
            runs[mode] = run
        result["speedup_lanes_vs_serial"] = round(result["serial_seconds"] / result["lanes_seconds"], 3)
        result["weights"] = {n: _compare(runs["serial"] / c, runs["lanes"] / c) for n, c in CHECKPOINTS.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
