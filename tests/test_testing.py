"""lightning_peft.testing: the checks every method passes pass for a built-in method and fail for a broken one."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_peft.methods import IA3, Adapter, LoRA
from lightning_peft.testing import check_method, raises, tiny_llama


def test_every_check_passes_for_lora_and_for_a_non_mergeable_method(tmp_path: Path) -> None:
    check_method(lambda: LoRA(r=2, target_modules=["q_proj", "v_proj"]), tmp_path / "lora")
    check_method(lambda: Adapter(style="pfeiffer"), tmp_path / "adapter")


def test_a_method_that_changes_the_model_at_init_fails_the_first_check(tmp_path: Path) -> None:
    # Random (not ones) IA3 vectors: the output differs before training, which check_method must catch.
    with pytest.raises(AssertionError):
        check_method(lambda: IA3(target_modules=["q_proj"], init_ia3_weights=False), tmp_path, tiny_llama)


def test_raises_checks_the_type_and_the_message() -> None:
    with raises(ValueError, match="r must"):
        raise ValueError("r must be positive")
    with pytest.raises(AssertionError, match="does not match"), raises(ValueError, match="alpha"):
        raise ValueError("r must be positive")
    with pytest.raises(AssertionError, match="ValueError was not raised"), raises(ValueError):
        pass
    with pytest.raises(KeyError), raises(ValueError):  # another type passes through unchanged
        raise KeyError("x")
