"""Adapter directories in the Hugging Face peft layout: what is written, roundtrips, and peft interop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft import adapter_state_dict, inject, load_adapter, save_adapter, set_adapter
from lightning_peft.core.adapter_layer import AdapterLayer, to_peft_key
from lightning_peft.core.injection import injection_record
from lightning_peft.formats.peft_directory import CONFIG_NAME, WEIGHTS_NAME
from lightning_peft.methods import LoRA
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch


def _tokens_forward(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def _mlpconv_forward(model: nn.Module) -> torch.Tensor:
    return model(*MLPConv.example_inputs())


# name: (build, LoRA kwargs, forward)
CASES: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], Callable[[nn.Module], torch.Tensor]]] = {
    "llama_dora_patterns": (
        tiny_llama,
        {
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "use_dora": True,
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {r"layers\.1\..*": 4.0},
        },
        _tokens_forward,
    ),
    "gpt2_conv1d_rslora": (
        tiny_gpt2,
        {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "use_rslora": True},
        _tokens_forward,
    ),
    "bert_save_lora_only_bias": (
        tiny_bert_classifier,
        {
            "r": 4,
            "alpha": 8,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
            "bias": "lora_only",
        },
        _tokens_forward,
    ),
    # The head stays frozen (not in modules_to_save): written without a task type, so peft does not look for it.
    "bert_frozen_head": (
        tiny_bert_classifier,
        {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        _tokens_forward,
    ),
    "mlpconv_conv_embedding": (
        MLPConv,
        {"r": 2, "alpha": 4, "target_modules": ["conv2d", "conv1d", "pointwise", "embed", "fc1"]},
        _mlpconv_forward,
    ),
}
case_param = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def _trained(
    build: Callable[..., nn.Module], lora: dict[str, Any], adapter_name: str = "default"
) -> nn.Module:
    """A model whose adapter tensors all have non-default values, as after training."""
    model = inject(build(), LoRA(**lora), adapter_name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@case_param
def test_directory_holds_only_the_adapter(case: tuple, tmp_path: Path) -> None:
    build, lora, _ = case
    model = _trained(build, lora)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert len(tensors) == len(adapter_state_dict(model))
    base_keys = set(build().state_dict())
    saved_modules = tuple(lora.get("modules_to_save") or ())
    for key in tensors:
        assert key.startswith("base_model.model."), key
        assert "default" not in key.split("."), key  # the adapter name is not part of the format
        inner = key.removeprefix("base_model.model.")
        is_lora = ".lora_" in inner
        is_saved_module = inner.startswith(tuple(f"{m}." for m in saved_modules))
        is_trained_bias = lora.get("bias", "none") != "none" and inner.endswith(".base_layer.bias")
        assert is_lora or is_saved_module or is_trained_bias, key
        # No frozen base weight: only a modules_to_save copy may share a name with a base tensor.
        assert inner not in base_keys or is_saved_module, key


def test_saved_keys_and_config_for_llama(tmp_path: Path) -> None:
    model = _trained(tiny_llama, {"r": 4, "alpha": 16, "target_modules": ["q_proj"], "use_dora": True})
    save_adapter(model, tmp_path)
    assert sorted(load_file(tmp_path / WEIGHTS_NAME)) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{name}"
        for i in range(2)
        for name in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    )
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert (config["r"], config["lora_alpha"], config["use_dora"], config["use_rslora"]) == (
        4,
        16,
        True,
        False,
    )
    assert (config["fan_in_fan_out"], config["bias"], config["modules_to_save"]) == (False, "none", None)
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({}, {})


def test_config_fields(tmp_path: Path) -> None:
    lora = {
        "r": 4,
        "alpha": 8,
        "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"],
        "bias": "lora_only",
        "rank_pattern": {"value": 2},
        "alpha_pattern": {"query": 16.0},
        "use_rslora": True,
    }
    save_adapter(_trained(tiny_bert_classifier, lora), tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / CONFIG_NAME).read_text())
    required = {
        "peft_type", "target_modules", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern",
        "alpha_pattern", "modules_to_save", "fan_in_fan_out", "bias", "task_type",
    }  # fmt: skip
    assert required <= set(config)
    assert config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (
        4,
        8,
        True,
        False,
    )
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({"value": 2}, {"query": 16.0})
    assert (config["modules_to_save"], config["bias"], config["fan_in_fan_out"]) == (
        ["classifier"],
        "lora_only",
        False,
    )

    save_adapter(_trained(tiny_gpt2, {"target_modules": ["c_attn"]}), tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] is True  # Conv1D stores (in, out)
    assert config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # peft's defaults

    # peft's SEQ_CLS model would wrap the classifier and look for its weights (KeyError): no task type without them.
    save_adapter(_trained(tiny_bert_classifier, {"target_modules": ["query"]}), tmp_path / "frozen_head")
    assert json.loads((tmp_path / "frozen_head" / CONFIG_NAME).read_text())["task_type"] is None

    save_adapter(_trained(MLPConv, {"target_modules": ["fc1"]}), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["task_type"] is None


@case_param
def test_roundtrip_gives_the_same_state_and_outputs(case: tuple, tmp_path: Path) -> None:
    build, lora, forward = case
    model = _trained(build, lora)
    expected = forward(model)
    save_adapter(model, tmp_path)

    loaded = load_adapter(build(), tmp_path)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(loaded)
    assert list(theirs) == list(ours)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    torch.testing.assert_close(forward(loaded), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default

    trainable = load_adapter(build(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        k for k in theirs if k in dict(trainable.named_parameters())
    }


def test_adapter_names_never_remove_module_path_segments(tmp_path: Path) -> None:
    # An adapter named like a layer index must only disappear where it names the adapter.
    model = _trained(tiny_llama, {"r": 2, "target_modules": ["q_proj"]}, adapter_name="0")
    assert to_peft_key("model.layers.0.self_attn.q_proj.lora_A.0.weight", "0") == (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    save_adapter(model, tmp_path)
    assert sorted(load_file(tmp_path / WEIGHTS_NAME)) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
        for i in range(2)
        for ab in "AB"
    )
    torch.testing.assert_close(_tokens_forward(load_adapter(tiny_llama(), tmp_path)), _tokens_forward(model))


def test_a_config_without_lora_alpha_is_refused(tmp_path: Path) -> None:
    save_adapter(_trained(tiny_llama, {"target_modules": ["q_proj"]}), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["lora_alpha"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(ValueError, match="lacks 'r' or 'lora_alpha'"):
        load_adapter(model, tmp_path)
    assert injection_record(model) is None


def test_a_config_without_use_dora_loads_as_plain_lora(tmp_path: Path) -> None:
    model = _trained(tiny_llama, {"target_modules": ["q_proj"]})
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["use_dora"]  # files written before DoRA existed
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert injection_record(loaded).methods["default"].use_dora is False
    torch.testing.assert_close(_tokens_forward(loaded), _tokens_forward(model), atol=1e-6, rtol=0)


def _assert_untouched(model: nn.Module, original: dict[str, torch.Tensor]) -> None:
    assert injection_record(model) is None
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_weights_missing_a_key_are_refused_naming_it(tmp_path: Path) -> None:
    save_adapter(_trained(tiny_llama, {"target_modules": ["q_proj", "v_proj"]}), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\]"):
        load_adapter(model, tmp_path)
    _assert_untouched(model, original)  # a refused load leaves no half-loaded adapter behind


def test_unexpected_and_wrongly_shaped_weights_are_refused(tmp_path: Path) -> None:
    save_adapter(_trained(tiny_llama, {"r": 4, "target_modules": ["q_proj"]}), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    save_file({**tensors, extra: torch.zeros(4, 64)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"unexpected \['{extra}'\]"):
        load_adapter(tiny_llama(), tmp_path)

    save_file(tensors, tmp_path / WEIGHTS_NAME)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "r": 8}))
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"wrong shape .*q_proj\.lora_A\.weight \(4, 64\) vs \(8, 64\)"):
        load_adapter(model, tmp_path)
    _assert_untouched(model, original)


def test_a_refused_second_adapter_leaves_the_first_in_place(tmp_path: Path) -> None:
    save_adapter(_trained(tiny_llama, {"target_modules": ["q_proj"]}), tmp_path)
    model = _trained(tiny_llama, {"target_modules": ["v_proj"]}, adapter_name="first")
    expected = _tokens_forward(model)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.popitem()
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(model, tmp_path, adapter_name="second")
    record = injection_record(model)
    assert (list(record.methods), record.active) == (["first"], "first")
    assert all("second" not in k for k in model.state_dict())
    assert torch.equal(_tokens_forward(model), expected)


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_a_second_adapter_and_switching(tmp_path: Path) -> None:
    first = _trained(tiny_llama, {"target_modules": ["q_proj"]})
    save_adapter(first, tmp_path / "first")
    second = inject(tiny_llama(), LoRA(target_modules=["v_proj", "o_proj"], init_lora_weights=False))
    save_adapter(second, tmp_path / "second")
    model = load_adapter(tiny_llama(), tmp_path / "first", adapter_name="a")
    load_adapter(model, tmp_path / "second", adapter_name="b")
    assert torch.equal(_tokens_forward(model), _tokens_forward(second))  # the newest adapter is active
    set_adapter(model, "a")
    torch.testing.assert_close(_tokens_forward(model), _tokens_forward(first), atol=1e-6, rtol=0)
    save_adapter(model, tmp_path / "b_again", adapter_name="b")
    assert json.loads((tmp_path / "b_again" / CONFIG_NAME).read_text())["target_modules"] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("v_proj", "o_proj")
    )


# --- interop with Hugging Face peft -------------------------------------------------------------------------
def _peft_config(lora: dict[str, Any]) -> dict[str, Any]:
    renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return {renamed.get(k, k): v for k, v in lora.items()}


@case_param
def test_a_directory_written_by_peft_loads_with_its_outputs(case: tuple, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    build, lora, forward = case
    reference = peft.get_peft_model(build(), peft.LoraConfig(**_peft_config(lora)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in reference.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    reference.eval()
    expected = forward(reference)
    reference.save_pretrained(tmp_path)

    loaded = load_adapter(build(), tmp_path)
    # peft and our fused kernel order the float ops differently: equal to rounding (the parity matrix's 1e-5)
    torch.testing.assert_close(forward(loaded), expected, atol=1e-5, rtol=0)


@case_param
def test_our_directory_loads_in_peft_with_our_outputs(case: tuple, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    build, lora, forward = case
    model = _trained(build, lora)
    expected = forward(model)
    save_adapter(model, tmp_path)

    reference = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(forward(reference), expected, atol=1e-5, rtol=0)  # peft's op order: see above
    theirs = peft.get_peft_model_state_dict(reference)
    ours = load_file(tmp_path / WEIGHTS_NAME)
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
