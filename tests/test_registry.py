"""The peft_type registry: a class loads its peft_type when registered (``@register_method``), never by inheriting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from lightning_peft.core import contract as base
from lightning_peft.core.contract import method_for_peft_type, register_method


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
        # The shared prefix base's "PREFIX_TUNING" is loaded by PrefixTuning (PTuningV2 inherits the type, and
        # PrefixTuning.from_peft_config hands its directories on).
        "PREFIX_TUNING": m.PrefixTuning,
        "MAM_ADAPTER": m.MAMAdapter,
        "P_TUNING": m.PTuning,
        "PROMPT_TUNING": m.PromptTuning,
        "TRAINABLE_TOKENS": m.TrainableTokens,
        "UNIPELT": m.UniPELT,
    }


def test_variants_saving_a_parents_format_do_not_register() -> None:
    from lightning_peft.methods.composite.gating import GatedAdapter, GatedLoRA, GatedPrefixTuning
    from lightning_peft.methods.lora.qlora import QLoRA
    from lightning_peft.methods.prompt.prefix_tuning import PTuningV2

    for variant in (QLoRA, GatedLoRA, GatedAdapter, GatedPrefixTuning, PTuningV2):
        assert variant.peft_type and "peft_type" not in vars(variant)
        assert method_for_peft_type(variant.peft_type) is not variant
    assert method_for_peft_type("PREFIX_TUNING").from_peft_config(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": False}
    ) == PTuningV2(num_virtual_tokens=4)


def test_a_registered_class_loads_its_peft_type_and_replaces(registry: dict[str, type]) -> None:
    from lightning_peft.methods import LoRA

    @dataclass(kw_only=True)
    class Inherits(LoRA):
        extra: int = 0

    @dataclass(kw_only=True)
    class NewTypeNotRegistered(LoRA):
        peft_type: ClassVar[str] = "UNREGISTERED"

    @register_method
    @dataclass(kw_only=True)
    class NewType(LoRA):
        peft_type: ClassVar[str] = "MY_LORA"

    @register_method
    @dataclass(kw_only=True)
    class TakesOver(LoRA):
        peft_type: ClassVar[str] = "LORA"

    assert registry["MY_LORA"] is NewType and registry["LORA"] is TakesOver
    assert Inherits not in registry.values() and "UNREGISTERED" not in registry
    with pytest.raises(TypeError, match="needs a PEFTMethod subclass with a peft_type"):
        register_method(Inherits.__mro__[-1])  # object
    with pytest.raises(ValueError, match=r"peft_type 'NOPE' is not supported; supported: .*'MY_LORA'"):
        method_for_peft_type("NOPE")


def test_class_paths_are_the_public_ones_and_earlier_releases_paths_still_resolve() -> None:
    from lightning_peft import methods as m
    from lightning_peft.core.contract import method_class

    assert m.LoRA().config_dict()["class_path"] == "lightning_peft.methods.LoRA"
    assert m.MAMAdapter().config_dict()["class_path"] == "lightning_peft.methods.MAMAdapter"
    # Where the classes were defined before the LoRA, prompt and composite families became packages.
    assert method_class("lightning_peft.methods.lora.LoRA") is m.LoRA
    assert method_class("lightning_peft.methods.mam_adapter.MAMAdapter") is m.MAMAdapter
    assert method_class("lightning_peft.methods.prefix_tuning.PTuningV2") is m.PTuningV2
    # The defining module's path too, and nothing for a name that is no method.
    assert method_class("lightning_peft.methods.lora.lora.LoRA") is m.LoRA
    assert method_class("lightning_peft.methods.NoSuchMethod") is None
    assert method_class("os.system") is None
