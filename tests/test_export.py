"""python -m lightning_peft.app.export: checkpoint -> peft adapter directory and merged transformers model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import load_adapter, unload
from lightning_peft.app.cli import cli_main
from lightning_peft.app.export import build_from_config, load_adapter_checkpoint, main

CONFIG = Path(__file__).parents[1] / "configs" / "sft_tiny_llama.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    cli_main([
        "fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    ])  # fmt: skip
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def _tokens() -> torch.Tensor:
    return torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def test_export_writes_an_adapter_and_a_merged_model_with_the_trained_outputs(
    checkpoint: Path, tmp_path: Path
) -> None:
    module, callback = build_from_config(CONFIG)
    load_adapter_checkpoint(module, callback, checkpoint)
    adapted = module.model.eval()
    with torch.no_grad():
        expected = adapted(_tokens()).logits
    assert any(
        p.abs().max() > 0 for n, p in adapted.named_parameters() if "lora_B" in n
    )  # trained: not a no-op

    written = main(
        ["--config", str(CONFIG), "--ckpt_path", str(checkpoint), "--out", str(tmp_path), "--merged"]
    )
    assert written == {"adapter": tmp_path / "adapter", "merged": tmp_path / "merged"}
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(_tokens()).logits, expected, atol=1e-5, rtol=0)

    fresh = unload(build_from_config(CONFIG)[0].model)  # the same base again, from init_seed
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(_tokens()).logits, expected, atol=1e-5, rtol=0)


def test_export_without_merged_writes_only_the_adapter(checkpoint: Path, tmp_path: Path) -> None:
    written = main(["--config", str(CONFIG), "--ckpt_path", str(checkpoint), "--out", str(tmp_path)])
    assert set(written) == {"adapter"} and not (tmp_path / "merged").exists()


def test_a_checkpoint_from_another_configuration_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"lacks .* adapter tensors"):
        main([
            "--config", str(CONFIG), "--ckpt_path", str(checkpoint), "--out", str(tmp_path),
            "--peft.adapter_name", "other",
        ])  # fmt: skip
