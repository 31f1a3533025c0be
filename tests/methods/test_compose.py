"""MethodUnion / ComposedMethod: several methods as one adapter through the ordinary protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_peft import adapter_state_dict, inject
from lightning_peft.core.injection import adapter_state_keys, injection_record
from lightning_peft.methods import IA3, AdaLoRA, LoRA, MethodUnion, PEFTMethod, PrefixTuning
from lightning_peft.methods.composite.compose import method_from_config_dict
from lightning_peft.testing import checks
from tests.tiny_models import tiny_bert_classifier, tiny_llama


def lora_and_ia3() -> MethodUnion:
    return MethodUnion(
        methods=[
            LoRA(target_modules=["q_proj", "v_proj"], r=4),
            IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ]
    )


def lora_and_prefix(**kwargs) -> MethodUnion:
    return MethodUnion(methods=[LoRA(r=4), PrefixTuning(num_virtual_tokens=3)], **kwargs)


def test_members_share_the_adapter_name_and_the_record_holds_the_union() -> None:
    method = lora_and_prefix()
    model = inject(tiny_llama(), method)
    assert injection_record(model).methods == {"default": method}
    keys = adapter_state_keys(model)
    assert any(".lora_A.default." in k for k in keys) and any(".prompt_encoder.default." in k for k in keys)
    assert (method.mergeable, method.modifies_inputs, method.may_have_unused_parameters) == (
        False,
        True,
        False,
    )
    assert lora_and_ia3().mergeable and not lora_and_ia3().modifies_inputs


def test_mergeable_union_merges_every_member() -> None:
    checks.assert_merge_matches(tiny_llama, lora_and_ia3())


def test_union_with_a_prefix_refuses_to_merge() -> None:
    checks.assert_not_mergeable(tiny_llama, lora_and_prefix())


def test_save_load_roundtrip_rebuilds_the_same_union(tmp_path: Path) -> None:
    method = lora_and_prefix(modules_to_save=["classifier"])
    loaded = checks.assert_roundtrip(tiny_bert_classifier, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "METHOD_UNION"
    assert [m["class_path"].rsplit(".", 1)[1] for m in config["methods"]] == ["LoRA", "PrefixTuning"]
    assert injection_record(loaded).methods["default"] == method
    assert method_from_config_dict(method.config_dict()) == method


def test_gradient_checkpointing_gives_grads_to_the_same_parameters() -> None:
    checks.assert_checkpointing_gives_same_grads(tiny_llama, lora_and_ia3)


def test_two_named_unions_switch(tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(tiny_llama, lora_and_ia3, tmp_path)


def test_members_adapting_the_same_layer_are_refused_and_nothing_is_left() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    union = MethodUnion(methods=[LoRA(target_modules=["q_proj"]), IA3(target_modules=["k_proj"]), LoRA(r=2)])
    with pytest.raises(
        ValueError, match=r"MethodUnion: LoRA adapts model\.layers\.0\.self_attn\.q_proj, which an"
    ):
        inject(model, union)
    assert injection_record(model) is None and checks.adapter_layers(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hooks_are_handed_to_every_member(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []  # (adapter name, step)

    class Recording(IA3):  # an unregistered test method: records the hooks it is given
        peft_type = ""

        def on_optimizer_step(self, model, adapter_name, step, total_steps) -> None:
            calls.append((adapter_name, step))

        def extra_loss(self, model, adapter_name) -> torch.Tensor:
            return torch.tensor(0.5 if adapter_name == "default" else 100.0)

    union = MethodUnion(
        methods=[
            LoRA(target_modules=["query"], bias="lora_only"),
            Recording(target_modules=["key"], feedforward_modules=[]),
            Recording(target_modules=["value"], feedforward_modules=[]),
        ],
        modules_to_save=["classifier"],
    )
    model = inject(tiny_bert_classifier(), union)
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in adapter_state_keys(
        model
    )  # extra state
    assert "classifier.modules_to_save.default.weight" in adapter_state_dict(model)
    assert union.extra_loss(model, "default").item() == 1.0
    union.on_optimizer_step(model, "default", 3, 10)
    assert calls == [("default", 3), ("default", 3)]


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ([], "needs at least one method"),
        (
            [LoRA(modules_to_save=["classifier"])],
            r"LoRA sets modules_to_save=\['classifier'\]; set it on the",
        ),
        ([AdaLoRA(target_modules=["q_proj"])], "cannot hold AdaLoRA"),
    ],
)
def test_invalid_unions_are_refused_at_construction(methods: list[PEFTMethod], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MethodUnion(methods=methods)
