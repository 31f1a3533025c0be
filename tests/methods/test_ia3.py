"""IA3: the METHODS.md acceptance checks, the paper's numerics, and parity with Hugging Face peft (both ways)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_peft import adapter_state_dict, inject, load_adapter, merge, save_adapter
from lightning_peft.core.adapter_layer import to_peft_key
from lightning_peft.methods import IA3
from lightning_peft.methods.ia3 import IA3Layer
from lightning_peft.testing import checks
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama

CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
}
case_param = pytest.mark.parametrize("case", list(CASES), ids=list(CASES))


def build_and_method(case: str, **extra: Any) -> tuple[Callable[[], nn.Module], IA3]:
    build, kwargs = CASES[case]
    return build, IA3(**kwargs, **extra)


def test_default_targets_scale_keys_values_and_the_feed_forward_input() -> None:
    model = inject(tiny_llama(), IA3())
    shapes = {n: tuple(m.ia3_l["default"].shape) for n, m in checks.adapter_layers(model)}
    # k, v: 2 key/value heads x 16 = 32 outputs scaled; down_proj: its 128 inputs scaled
    assert shapes == {
        **{f"model.layers.{i}.self_attn.{p}": (32, 1) for i in range(2) for p in ("k_proj", "v_proj")},
        **{f"model.layers.{i}.mlp.down_proj": (1, 128) for i in range(2)},
    }
    bert = inject(tiny_bert_classifier(), IA3())
    feedforward = {n for n, m in checks.adapter_layers(bert) if m.is_feedforward["default"]}
    # As in peft, "output.dense" names both the attention output and the FFN output layer.
    assert feedforward == {
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")
    }


def test_forward_scales_outputs_of_keys_and_inputs_of_the_feed_forward() -> None:
    model = inject(tiny_llama(), IA3())
    checks.randomise(model)
    x = torch.randn(3, 64)
    k, down = model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj
    h = torch.randn(3, 128)
    torch.testing.assert_close(
        k(x), k.ia3_l["default"].flatten() * (x @ k.base_layer.weight.T), atol=1e-6, rtol=0
    )
    expected = (h * down.ia3_l["default"].flatten()) @ down.base_layer.weight.T
    torch.testing.assert_close(down(h), expected, atol=1e-6, rtol=0)


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@case_param
def test_init_is_a_no_op(case: str) -> None:
    checks.assert_init_is_identity(*build_and_method(case))


@case_param
def test_training_changes_only_ia3_parameters(case: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(case))
    assert {k.rsplit(".", 2)[-2] for k in changed if "ia3_l" in k} == {"ia3_l"}


@case_param
def test_save_load_roundtrip(case: str, tmp_path: Path) -> None:
    checks.assert_roundtrip(*build_and_method(case), tmp_path)


@pytest.mark.parametrize("case", ["llama", "bert", "gpt2_conv1d"])
def test_merge_unmerge_and_merge_and_unload_match_unmerged(case: str) -> None:
    build, kwargs = CASES.get(case, (tiny_gpt2, {}))
    checks.assert_merge_matches(build, IA3(**kwargs, init_ia3_weights=False))


def test_non_finite_or_irreversible_merge_is_refused() -> None:
    checks.assert_non_finite_merge_is_refused(tiny_llama, IA3(), poison="ia3_l")
    model = inject(tiny_llama(), IA3())
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.ia3_l["default"][0] = 0.0
    with pytest.raises(ValueError, match="exact zeros in ia3_l"):
        merge(model)
    assert not any(layer.merged for _, layer in checks.adapter_layers(model))


@case_param
def test_disable_gives_the_base_output(case: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(case), mergeable=True)


@case_param
def test_unload_restores_the_base_model_exactly(case: str) -> None:
    checks.assert_unload_restores_base(*build_and_method(case))


def test_two_named_adapters_in_one_model(tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(tiny_llama, IA3, tmp_path)


def test_gradient_checkpointing_gives_grads_to_the_same_parameters() -> None:
    checks.assert_checkpointing_gives_same_grads(tiny_llama, IA3)


@pytest.mark.parametrize("family", list(checks.FAMILIES))
def test_trains_through_the_callback_and_the_loss_goes_down(family: str) -> None:
    checks.assert_trains_through_callback(*build_and_method(family), lr=0.1)  # IA3 likes large steps


# --- hyperparameters and config -----------------------------------------------------------------------------
def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"feedforward_modules \['fc2'\] are not in target_modules"):
        IA3(target_modules=["fc1"], feedforward_modules=["fc2"])
    with pytest.raises(ValueError, match="target_modules is required"):
        inject(MLPConv(), IA3())
    with pytest.raises(ValueError, match="feedforward_modules is required"):
        inject(MLPConv(), IA3(target_modules=["fc1"]))
    with pytest.raises(TypeError, match="unsupported type"):
        inject(MLPConv(), IA3(target_modules=["embed"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="lacks 'feedforward_modules'"):
        IA3.from_peft_config({"peft_type": "IA3", "target_modules": ["k_proj"]})


# --- parity with Hugging Face peft ----------------------------------------------------------------------------
PARITY = {
    "llama": (tiny_llama, {}),
    "gpt2_conv1d": (tiny_gpt2, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
    "explicit": (
        tiny_llama,
        {"target_modules": ["q_proj", "up_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    ),
}


@pytest.mark.parametrize("case", list(PARITY), ids=list(PARITY))
def test_outputs_and_merge_match_peft(case: str) -> None:
    peft = pytest.importorskip("peft")
    build, kwargs = PARITY[case]
    reference = peft.get_peft_model(build(), peft.IA3Config(**kwargs))
    checks.randomise(reference)
    ours = inject(build(), IA3(**kwargs))
    peft_state = peft.get_peft_model_state_dict(reference)
    mapping = {to_peft_key(k, "default"): k for k in adapter_state_dict(ours)}
    assert set(mapping) == set(peft_state)  # the same tensors under peft's names (ia3_l)
    ours.load_state_dict({mapping[k]: v for k, v in peft_state.items()}, strict=False)
    with torch.no_grad():
        expected = checks.logits(reference)
        assert torch.equal(checks.logits(ours), expected)  # bit for bit: the same operations
        reference.merge_adapter()
        merge(ours)
        torch.testing.assert_close(checks.logits(ours), checks.logits(reference), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["llama", "bert"])
def test_adapter_directories_load_both_ways_with_peft(case: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    build, kwargs = PARITY[case]
    ours = inject(build(), IA3(**kwargs))
    checks.randomise(ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    with torch.no_grad():
        expected = checks.logits(ours)
        assert torch.equal(checks.logits(theirs), expected)

    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = load_adapter(build(), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(checks.logits(reloaded), expected)
    assert all(isinstance(m, IA3Layer) for n, m in checks.adapter_layers(reloaded) if "classifier" not in n)


# --- convolutions: channels scaled, (1, C, 1, ...) as peft stores Conv2d vectors ----------------------------------
CONV_TARGETS = {
    "target_modules": ["conv2d", "pointwise", "conv1d", "fc1"],
    "feedforward_modules": ["pointwise"],
}


def _conv_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*MLPConv.example_inputs())


def test_convolutions_scale_output_or_input_channels_and_merge_exactly() -> None:
    model = inject(MLPConv(), IA3(**CONV_TARGETS))
    base = MLPConv()
    assert torch.equal(_conv_logits(model), _conv_logits(base))  # ones: a no-op
    shapes = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    assert shapes == {
        "conv2d.ia3_l.default": (1, 8, 1, 1),  # output channels
        "pointwise.ia3_l.default": (1, 8, 1, 1),  # input channels (feed-forward)
        "conv1d.ia3_l.default": (1, 8, 1),
        "fc1.ia3_l.default": (32, 1),
    }
    checks.randomise(model, scale=0.3)
    l2 = model.conv2d.ia3_l["default"].flatten()
    l_pw = model.pointwise.ia3_l["default"].flatten()
    image = MLPConv.example_inputs()[0]
    with torch.no_grad():
        h = torch.relu(base.conv2d(image) * l2.view(-1, 1, 1))
        torch.testing.assert_close(
            model.pointwise(h), base.pointwise(h * l_pw.view(-1, 1, 1)), atol=1e-6, rtol=0
        )
    out = _conv_logits(model)
    merge(model)
    torch.testing.assert_close(_conv_logits(model), out, atol=1e-6, rtol=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, _conv_logits(base), atol=1e-3, rtol=0)


def test_conv2d_matches_peft_and_its_directory_loads_both_ways(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    kwargs = {"target_modules": ["conv2d", "pointwise"], "feedforward_modules": ["pointwise"]}
    ours = inject(MLPConv(), IA3(**kwargs))
    checks.randomise(ours, scale=0.3)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(MLPConv(), tmp_path / "ours")
    expected = _conv_logits(ours)
    assert torch.equal(_conv_logits(theirs), expected)
    theirs.merge_adapter()
    merge(ours)
    torch.testing.assert_close(_conv_logits(ours), _conv_logits(theirs), atol=1e-6, rtol=0)
    theirs.unmerge_adapter()
    theirs.save_pretrained(tmp_path / "theirs")
    assert torch.equal(_conv_logits(load_adapter(MLPConv(), tmp_path / "theirs")), expected)


def test_a_grouped_convolution_is_refused_as_feedforward_and_the_model_is_untouched() -> None:
    model = MLPConv()
    model.pointwise = nn.Conv2d(8, 8, kernel_size=1, groups=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"pointwise is a grouped convolution \(groups=2\)"):
        inject(model, IA3(**CONV_TARGETS))
    assert not checks.adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    inject(model, IA3(target_modules=["pointwise"], feedforward_modules=[]))  # output channels: fine
    checks.randomise(model, scale=0.3)
    out = _conv_logits(model)
    merge(model)
    torch.testing.assert_close(_conv_logits(model), out, atol=1e-6, rtol=0)


def test_mixed_batch_on_convolutions_gives_each_row_its_adapter() -> None:
    from lightning_peft import mixed_batch, set_adapter

    model = inject(MLPConv(), IA3(**CONV_TARGETS))
    inject(model, IA3(**CONV_TARGETS), adapter_name="other")
    checks.randomise(model, scale=0.3)
    rows = ["default", "other", None, "other"]
    with torch.no_grad(), mixed_batch(model, rows):
        mixed = model(*MLPConv.example_inputs())
    for i, name in enumerate(rows):
        if name is None:
            expected = _conv_logits(MLPConv())
        else:
            set_adapter(model, name)
            expected = _conv_logits(model)
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-6, rtol=0)
