"""Checks shared by the composite methods' tests (MAM adapter, UniPELT)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.methods import PEFTMethod
from lightning_peft.testing import checks
from tests.tiny_models import tiny_bert_classifier, tiny_llama

FAMILIES: dict[str, tuple[checks.Build, dict]] = {
    "llama": (tiny_llama, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
}


class _SaveOnTrainEnd(pl.Callback):
    """Writes a checkpoint while PEFTCallback still wraps the module's hooks (before teardown)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def assert_trains_and_checkpoints_every_part(
    build: checks.Build, method: PEFTMethod, tmp_path: Path, parts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Training through PEFTCallback lowers the loss, leaves the base alone, and checkpoints all parts, only them.

    Args:
        parts: Container names every part must have keys under (``prompt_encoder``, ``bottleneck``, ...).
    """
    path = tmp_path / "last.ckpt"
    module = checks.fit(build, method, steps=8, callbacks=[_SaveOnTrainEnd(path)])
    losses = module.losses
    assert losses[-1] < 0.99 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    owned = set(adapter_state_keys(module.model))
    reference = build().state_dict()
    for key, value in module.model.state_dict().items():
        if key not in owned:  # wrapped base layers sit under `.base_layer`
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} <= owned
    state = torch.load(path, weights_only=False)["state_dict"]
    assert set(state) == {f"model.{k}" for k in owned}  # adapter-only: every part's tensors, nothing else
    for part in parts:
        assert any(f".{part}." in key for key in state), part
    return state


def gate_outputs(model: nn.Module, run: callable) -> list[torch.Tensor]:
    """Outputs of every gate module during ``run()``."""
    from lightning_peft.methods.composite.gating import Gate

    outputs: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
        for m in model.modules()
        if isinstance(m, Gate)
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs
