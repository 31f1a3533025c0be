"""The peft_type registry: a class loads the peft_type assigned in its own body; inheriting it never registers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from lightning_peft.methods import base
from lightning_peft.methods.base import method_for_peft_type


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    """A copy of the registry that classes defined in a test register into, discarded afterwards."""
    method_for_peft_type("LORA")  # imports every method
    copy = dict(base._REGISTRY)
    monkeypatch.setattr(base, "_REGISTRY", copy)
    return copy


def test_built_in_loaders() -> None:
    from lightning_peft import methods as m

    # Test doubles elsewhere may register a LoRA subclass that assigns "LORA" in its body: the rest is exact.
    assert issubclass(method_for_peft_type("LORA"), m.LoRA)
    assert {k: v for k, v in base._REGISTRY.items() if k != "LORA"} == {
        "ADALORA": m.AdaLoRA,
        "BOTTLENECK_ADAPTER": m.Adapter,
        "BITFIT": m.BitFit,
        "METHOD_UNION": m.MethodUnion,
        "IA3": m.IA3,
        # The shared prefix base assigns "PREFIX_TUNING" for both prefix methods; PrefixTuning assigns it again to
        # be the loader (PTuningV2 inherits it, and PrefixTuning.from_peft_config hands its directories on).
        "PREFIX_TUNING": m.PrefixTuning,
        "MAM_ADAPTER": m.MAMAdapter,
        "P_TUNING": m.PTuning,
        "PROMPT_TUNING": m.PromptTuning,
        "UNIPELT": m.UniPELT,
    }


def test_variants_saving_a_parents_format_do_not_register() -> None:
    from lightning_peft.methods.gating import GatedAdapter, GatedLoRA, GatedPrefixTuning
    from lightning_peft.methods.prefix_tuning import PTuningV2
    from lightning_peft.methods.qlora import QLoRA

    for variant in (QLoRA, GatedLoRA, GatedAdapter, GatedPrefixTuning, PTuningV2):
        assert variant.peft_type and "peft_type" not in vars(variant)
        assert method_for_peft_type(variant.peft_type) is not variant
    assert method_for_peft_type("PREFIX_TUNING").from_peft_config(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": False}
    ) == PTuningV2(num_virtual_tokens=4)


def test_a_class_assigning_peft_type_in_its_body_registers_and_replaces(registry: dict[str, type]) -> None:
    from lightning_peft.methods import LoRA

    @dataclass(kw_only=True)
    class Inherits(LoRA):
        extra: int = 0

    @dataclass(kw_only=True)
    class NewType(LoRA):
        peft_type: ClassVar[str] = "MY_LORA"

    @dataclass(kw_only=True)
    class TakesOver(LoRA):
        peft_type: ClassVar[str] = "LORA"

    assert registry["MY_LORA"] is NewType and registry["LORA"] is TakesOver
    assert Inherits not in registry.values()
    with pytest.raises(ValueError, match=r"peft_type 'NOPE' is not supported; supported: .*'MY_LORA'"):
        method_for_peft_type("NOPE")
