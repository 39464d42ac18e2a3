"""The distributed path: 2 CPU processes (gloo) through accelerate, ranks agree on the weights afterwards."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_run_keeps_ranks_in_sync(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's "--cpu" launcher starts one process; "--multi_gpu" starts torchrun workers, which use
    # gloo on a machine without GPUs (the worker builds Accelerator(cpu=True)).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 5
    assert torch.equal(r0["weights"], r1["weights"])
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
