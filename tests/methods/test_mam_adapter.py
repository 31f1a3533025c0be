"""MAMAdapter: prefix tuning on attention + scaled parallel adapter on the feed-forward, as one adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_peft import count_parameters, inject
from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.injection import injection_record
from lightning_peft.methods import MAMAdapter, PrefixTuning
from lightning_peft.methods.adapter import BottleneckLayer
from lightning_peft.methods.prompt.virtual_tokens import virtual_tokens_layer
from lightning_peft.testing import checks
from tests.methods import prompt_helpers
from tests.methods.composite_checks import FAMILIES, assert_trains_and_checkpoints_every_part
from tests.tiny_models import tiny_llama

family_param = pytest.mark.parametrize("family", list(FAMILIES))


def build_and_method(family: str, **kwargs: Any) -> tuple[checks.Build, MAMAdapter]:
    build, extra = FAMILIES[family]
    return build, MAMAdapter(**extra, **kwargs)


@family_param
def test_prefix_on_attention_and_scaled_parallel_adapter_on_the_feed_forward(family: str) -> None:
    build, method = build_and_method(family)
    model = inject(build(), method)
    _, tokens = virtual_tokens_layer(model)
    encoder = tokens.prompt_encoder["default"]
    assert tokens.specs["default"].num_virtual_tokens == 30  # He et al.'s l = 30
    assert encoder.transform[0].out_features == 800  # the reparametrisation MLP's width
    sites = {n: layer for n, layer in checks.adapter_layers(model) if isinstance(layer, BottleneckLayer)}
    expected = (
        ["model.layers.{}.mlp", "parallel"]
        if family == "llama"
        else ["bert.encoder.layer.{}.output", "parallel_residual"]
    )
    assert sorted(sites) == [expected[0].format(i) for i in range(2)]
    for layer in sites.values():
        assert (layer.placement["default"], layer.scaling["default"]) == (expected[1], 4.0)
        assert layer.bottleneck["default"].down.out_features == 32  # d / reduction_factor = 64 / 2


def test_parallel_adapter_adds_four_times_the_bottleneck_of_the_feed_forward_input() -> None:
    model = inject(tiny_llama(), MAMAdapter(prefix_length=4))
    checks.randomise(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        mlp(x), mlp.base_layer(x) + 4.0 * mlp.bottleneck["default"](x), atol=1e-6, rtol=0
    )


def test_output_at_init_is_the_base_model_reading_the_prefix() -> None:
    """The adapter adds exactly 0 at init; the prefix does not (as PrefixTuning alone): documented, not identity."""
    base_out = checks.logits(tiny_llama())
    mam = inject(tiny_llama(), MAMAdapter())
    prefix_only = inject(tiny_llama(), PrefixTuning(num_virtual_tokens=30, encoder_hidden_size=800))
    encoders = [virtual_tokens_layer(m)[1].prompt_encoder["default"] for m in (mam, prefix_only)]
    encoders[1].load_state_dict(encoders[0].state_dict())
    with torch.no_grad():
        out = checks.logits(mam)
        assert torch.equal(out, checks.logits(prefix_only))
        assert (out - base_out).abs().max() > 1e-3


def test_trainable_parameters_on_tiny_llama() -> None:
    model = inject(tiny_llama(), MAMAdapter())
    width = 2 * 2 * 2 * 16  # layers * (key, value) * kv_heads * head_dim
    prefix = 30 * 64 + (64 * 800 + 800) + (800 * width + width)
    adapter = 2 * ((64 * 32 + 32) + (32 * 64 + 64))
    assert count_parameters(model)["trainable"] == prefix + adapter == 164_832


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@family_param
def test_training_changes_only_its_parameters(family: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(family, prefix_length=4))
    assert {k.split(".default.")[0].rsplit(".", 1)[1] for k in changed} >= {"prompt_encoder", "bottleneck"}


@family_param
def test_save_load_roundtrip_in_its_own_format(family: str, tmp_path: Path) -> None:
    build, method = build_and_method(family, prefix_length=4)
    loaded = checks.assert_roundtrip(build, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["prefix_length"], config["reduction_factor"]) == ("MAM_ADAPTER", 4, 2)
    assert injection_record(loaded).methods["default"] == method


def test_merge_is_refused_clearly() -> None:
    checks.assert_not_mergeable(*build_and_method("llama", prefix_length=4))


@family_param
def test_disable_gives_the_base_output(family: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(family, prefix_length=4), mergeable=False)


def test_unload_restores_the_base_model_exactly() -> None:
    checks.assert_unload_restores_base(*build_and_method("llama", prefix_length=4))


def test_two_named_adapters_in_one_model(tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(tiny_llama, lambda: MAMAdapter(prefix_length=4), tmp_path)


def test_generation_combines_the_prefix_and_adapter_with_the_cache() -> None:
    model = prompt_helpers.build("llama", MAMAdapter(prefix_length=4))
    checks.randomise(model)
    prompt_helpers.assert_generation_consistent(model)


def test_gradient_checkpointing_is_refused_as_for_prefix_tuning() -> None:
    model = tiny_llama()
    assert hf.set_activation_checkpointing(model, True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        inject(model, MAMAdapter(prefix_length=4))
    assert injection_record(model) is None and checks.adapter_layers(model) == []


@family_param
def test_trains_through_the_callback_and_checkpoints_every_part(family: str, tmp_path: Path) -> None:
    build, method = build_and_method(family)
    parts = ("prompt_encoder", "bottleneck") + (("modules_to_save",) if family == "bert" else ())
    assert_trains_and_checkpoints_every_part(build, method, tmp_path, parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix_length": 0}, "MAMAdapter prefix_length=0 must be an integer >= 1"),
        ({"reduction_factor": 0}, "MAMAdapter: Adapter reduction_factor=0 must be > 0"),
        ({"encoder_hidden_size": 0}, "MAMAdapter: PrefixTuning encoder_hidden_size=0 must be >= 1"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAMAdapter(**kwargs)
