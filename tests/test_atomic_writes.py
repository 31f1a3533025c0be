"""Writes a kill cannot leave half done: adapter directories (killed in a loop with SIGKILL) and checkpoints
written on another filesystem than TMPDIR."""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file
from torch import nn

from lightning_peft import PEFTCallback, inject, save_adapter
from lightning_peft.formats import atomic_io
from lightning_peft.formats.atomic_io import AtomicCheckpointIO
from lightning_peft.formats.peft_directory import CONFIG_NAME, WEIGHTS_NAME
from lightning_peft.methods import LoRA
from tests.test_callback import QV, CausalLM, make_trainer, token_loader

ALPHAS = (8.0, 16.0)


def two_adapters() -> nn.Module:
    """Adapters 'a' (alpha 8) and 'b' (alpha 16) whose every tensor holds the value of its alpha, so a directory
    is consistent exactly when its tensors equal its config's lora_alpha."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    for name, alpha in zip("ab", ALPHAS, strict=True):
        inject(model, LoRA(r=32, alpha=alpha, target_modules=["0", "1"]), adapter_name=name)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".{name}." in key:
                    p.fill_(alpha)
    return model


def assert_consistent(directory: Path) -> float:
    alpha = json.loads((directory / CONFIG_NAME).read_text())["lora_alpha"]
    tensors = load_file(directory / WEIGHTS_NAME)
    assert len(tensors) == 4
    for key, value in tensors.items():
        assert torch.all(value == alpha), (
            f"{key} holds {value.flatten()[0].item()} but the config says {alpha}"
        )
    return alpha


def kill_during_loop(loop, check, rounds: int) -> int:
    """Fork a child that runs ``loop`` forever, SIGKILL it at a random moment and ``check()`` what it left,
    ``rounds`` times; returns how many kills landed (the child was still running)."""
    rng = random.Random(0)
    landed = 0
    for _ in range(rounds):
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(ready_read)
                loop(lambda fd=ready_write: os.write(fd, b"x"))
            finally:
                os._exit(0)
        os.close(ready_write)
        os.read(ready_read, 1)  # the first complete write is done
        os.close(ready_read)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        landed += os.WIFSIGNALED(status)
        check()
    return landed


def test_save_adapter_killed_at_random_moments_leaves_the_old_or_the_new_adapter(
    tmp_path: Path,
) -> None:
    model = two_adapters()
    directory = tmp_path / "adapter"

    def loop(ready) -> None:
        save_adapter(model, directory, "a")
        ready()
        while True:
            for name in "ba":
                save_adapter(model, directory, name)

    seen = []
    assert kill_during_loop(loop, lambda: seen.append(assert_consistent(directory)), rounds=20) == 20
    save_adapter(model, directory, "b")  # the next save clears whatever the kills left beside it
    assert assert_consistent(directory) == 16.0 and set(seen) <= set(ALPHAS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_without_an_atomic_exchange_the_directory_is_still_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic_io, "_exchange", lambda a, b: False)
    model = two_adapters()
    directory = tmp_path / "adapter"
    save_adapter(model, directory, "a")
    (directory / "README.md").write_text("model card")
    (directory / "adapter_model.bin").write_bytes(b"an older save")
    save_adapter(model, directory, "b")
    assert assert_consistent(directory) == 16.0
    assert (directory / "README.md").read_text() == "model card"  # carried over; the old .bin is superseded
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_directory_holding_other_files_keeps_them(tmp_path: Path) -> None:
    model = two_adapters()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not ours")
    save_adapter(model, tmp_path, "a")
    save_adapter(model, tmp_path, "b")
    assert assert_consistent(tmp_path) == 16.0
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "checkpoints"]


def test_a_save_that_fails_midway_leaves_the_previous_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_adapters()
    directory = tmp_path / "adapter"
    save_adapter(model, directory, "a")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def broken(tensors, path: str, metadata=None) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lightning_peft.formats.peft_directory.save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, directory, "b")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(Path.cwd()).st_dev,
    reason="needs a second filesystem (/dev/shm) for TMPDIR",
)
def test_checkpoint_killed_while_written_across_filesystems_is_old_or_new_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert os.stat(tmp_path).st_dev != os.stat("/dev/shm").st_dev
    monkeypatch.setattr(tempfile, "tempdir", "/dev/shm")  # TMPDIR, as gettempdir() caches it
    path = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    big = torch.zeros(4_000_000)  # 16 MB: a write takes long enough for kills to land inside it

    def loop(ready) -> None:
        io.save_checkpoint({"generation": 0, "weights": big}, path)
        ready()
        generation = 0
        while True:
            generation += 1
            io.save_checkpoint({"generation": generation, "weights": big + generation}, path)

    def check() -> None:
        checkpoint = torch.load(path, weights_only=True)
        assert torch.all(checkpoint["weights"] == checkpoint["generation"])

    assert kill_during_loop(loop, check, rounds=10) == 10
    io.save_checkpoint(
        {"generation": -1, "weights": big}, path
    )  # a later save clears leftover temporary files
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


class PluginIO(TorchCheckpointIO):
    """A user's own checkpoint plugin: PEFTCallback must leave it in place."""


@pytest.mark.parametrize("plugins", [None, [PluginIO()]])
def test_the_trainer_writes_checkpoints_atomically_unless_the_user_chose_a_plugin(
    tmp_path: Path, plugins
) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", filename="{step}", auto_insert_metric_name=False, save_top_k=-1
    )
    trainer = make_trainer(
        tmp_path, [PEFTCallback(QV, target="model"), checkpoint], max_steps=1, plugins=plugins
    )
    trainer.fit(CausalLM(), token_loader(batches=1))
    expected = AtomicCheckpointIO if plugins is None else PluginIO
    assert type(trainer.strategy.checkpoint_io) is expected
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["1.ckpt"]
    saved = torch.load(tmp_path / "ckpts" / "1.ckpt", weights_only=True)["state_dict"]
    assert len(saved) == 8 and all("lora_" in k for k in saved)
