"""DDP with 2 CPU processes (gloo): adapters registered before the wrap stay identical across ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "distributed" / "ddp_fit.py"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "adapter", "prompt_tuning", "prefix_tuning"])
def test_ddp_two_processes_identical_adapters_one_adapter_only_checkpoint(tmp_path, method):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), str(tmp_path), method]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["losses"] != rank1["losses"]  # the ranks trained on different batches...
    assert set(rank0["state"]) == set(rank1["state"]) and rank0["state"]
    for key, value in rank0["state"].items():  # ...yet hold bit-identical adapters
        assert torch.equal(value, rank1["state"][key]), key

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in rank0["state"]}
    for key, value in rank0["state"].items():
        assert torch.equal(checkpoint["state_dict"][f"model.{key}"], value)
