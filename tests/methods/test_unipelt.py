"""UniPELT: gated LoRA + gated prefix + gated sequential adapter, each gate's numerics, acceptance checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_peft import count_parameters, disable_adapters, inject, unload
from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.injection import injection_record
from lightning_peft.methods import NotMergeableError, UniPELT
from lightning_peft.methods.adapter import BottleneckLayer
from lightning_peft.methods.composite.gating import GatedBottleneck
from lightning_peft.methods.lora.layers import LoraLayer
from lightning_peft.methods.prompt.virtual_tokens import prefix_key_values, virtual_tokens_layer
from lightning_peft.testing import checks
from tests.methods import prompt_helpers
from tests.methods.composite_checks import FAMILIES, assert_trains_and_checkpoints_every_part, gate_outputs
from tests.tiny_models import tiny_llama, token_batch

family_param = pytest.mark.parametrize("family", list(FAMILIES))
N = 4  # prefix length in most tests
GATE_KEYS = (".lora_gate.", ".prefix_gates.", ".gate.")  # (Llama's mlp.gate_proj is no gate)


def build_and_method(family: str, **kwargs: Any) -> tuple[checks.Build, UniPELT]:
    build, extra = FAMILIES[family]
    return build, UniPELT(**extra, **kwargs)


def sigmoid_gate(gate: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x @ gate.weight.T + gate.bias)  # (..., d) -> (..., 1)


@family_param
def test_gated_lora_on_query_and_value_prefix_gates_per_layer_and_a_gated_adapter_after_the_ffn(
    family: str,
) -> None:
    build, method = build_and_method(family)
    model = inject(build(), method)
    lora = {n.rsplit(".", 1)[1] for n, m in checks.adapter_layers(model) if isinstance(m, LoraLayer)}
    assert lora == ({"q_proj", "v_proj"} if family == "llama" else {"query", "value"})
    for _, layer in checks.adapter_layers(model):
        if isinstance(layer, LoraLayer):
            assert (layer.r["default"], layer.scaling["default"]) == (8, 1.0)
            assert layer.lora_gate["default"].weight.shape == (1, layer.in_features)
    _, tokens = virtual_tokens_layer(model)
    assert tokens.specs["default"].num_virtual_tokens == 10  # Mao et al.
    assert [tuple(g.weight.shape) for g in tokens.prefix_gates["default"]] == [(1, 64), (1, 64)]
    adapters = {n: m for n, m in checks.adapter_layers(model) if isinstance(m, BottleneckLayer)}
    site = "model.layers.{}.mlp.down_proj" if family == "llama" else "bert.encoder.layer.{}.output.dense"
    assert sorted(adapters) == [site.format(i) for i in range(2)]
    for layer in adapters.values():
        bottleneck = layer.bottleneck["default"]
        assert isinstance(bottleneck, GatedBottleneck) and layer.placement["default"] == "sequential"
        assert (bottleneck.down.out_features, bottleneck.gate.weight.shape) == (4, (1, 64))  # 64 / 16


# --- each gate's numerics -------------------------------------------------------------------------------------
def test_lora_update_is_scaled_per_token_by_a_gate_on_the_layer_input() -> None:
    model = inject(tiny_llama(), UniPELT(prefix_length=N, lora_alpha=16))
    checks.randomise(model)
    layer = model.model.layers[0].self_attn.v_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, 64)
    gate = sigmoid_gate(layer.lora_gate["default"], x)
    expected = layer.base_layer(x) + gate * 2.0 * (x @ A.T @ B.T)  # s = 16 / 8
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_adapter_output_is_scaled_per_token_by_a_gate_on_its_input() -> None:
    model = inject(tiny_llama(), UniPELT(prefix_length=N))
    checks.randomise(model)
    layer = model.model.layers[1].mlp.down_proj
    f = layer.bottleneck["default"]
    z = torch.randn(2, 5, 128)
    h = layer.base_layer(z)
    bottleneck = F.relu(h @ f.down.weight.T + f.down.bias) @ f.up.weight.T + f.up.bias
    torch.testing.assert_close(layer(z), h + sigmoid_gate(f.gate, h) * bottleneck, atol=1e-6, rtol=0)


def test_prefix_keys_and_values_are_scaled_per_sequence_by_a_gate_on_the_attention_input() -> None:
    """At init LoRA and the adapter add 0, so UniPELT is the base model reading each layer's gated prefix.

    ``g_i`` is the mean of ``sigmoid(W_i x + b_i)`` over each sequence's real tokens (right padding is left out).
    """
    model = inject(tiny_llama(), UniPELT(prefix_length=N))
    _, tokens = virtual_tokens_layer(model)
    with torch.no_grad():
        for p in tokens.prefix_gates["default"].parameters():
            p.normal_(0, 0.2)
    ids = token_batch(batch=2, length=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    inputs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.model.layers):
        block.self_attn.register_forward_pre_hook(
            lambda _m, _a, kw, i=i: inputs.__setitem__(i, kw["hidden_states"]), with_kwargs=True
        )
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        spec = tokens.specs["default"]
        cache = hf.new_cache(model.config)
        for i, (key, value) in enumerate(prefix_key_values(tokens.virtual_tokens("default"), spec, 2)):
            per_token = sigmoid_gate(tokens.prefix_gates["default"][i], inputs[i])  # (B, T, 1)
            g = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 1)
            assert g.min() > 0 and g.max() < 1 and (g[0] - g[1]).abs() > 1e-4
            cache.update(key * g.view(2, 1, 1, 1), value * g.view(2, 1, 1, 1), i)
        with disable_adapters(model):
            expected = model(
                input_ids=ids,
                attention_mask=torch.cat([torch.ones(2, N), mask], 1),
                **{hf.cache_argument(model): cache},
            )
    torch.testing.assert_close(out, expected.logits, atol=1e-5, rtol=0)


@family_param
def test_gates_are_in_the_unit_interval_and_receive_gradients(family: str) -> None:
    build, method = build_and_method(family, prefix_length=N)
    model = inject(build(), method)
    checks.randomise(model)  # B and up away from 0: the LoRA and adapter gates then get gradients too
    outputs = gate_outputs(model, lambda: checks.logits(model).square().mean().backward())
    assert len(outputs) == 2 + 4 + 2  # 2 prefix gates, 4 LoRA (q, v per layer), 2 adapters
    assert all(o.min() > 0 and o.max() < 1 for o in outputs)
    gates = {n: p for n, p in model.named_parameters() if any(g in n for g in GATE_KEYS)}
    assert len(gates) == 2 * 8
    for name, param in gates.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@family_param
def test_padded_batches_equal_their_sequences(family: str) -> None:
    model = prompt_helpers.build(family, UniPELT(prefix_length=N))
    checks.randomise(model)
    prompt_helpers.assert_padding_invariant(model, family)


def test_left_padded_batch_generates_what_each_sequence_generates_alone() -> None:
    """Cached generation gates each prefix once, from its prompt's real tokens; padding does not move the gate."""
    model = prompt_helpers.build("llama", UniPELT(prefix_length=N))
    checks.randomise(model)
    seqs = prompt_helpers.sequences((4, 7))
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    singles = [
        model.generate(s[None], attention_mask=torch.ones(1, len(s)), **options)[0, len(s) :] for s in seqs
    ]
    batch = prompt_helpers.padded(model, seqs, "left", positions=False)
    generated = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    assert generated.tolist() == [s.tolist() for s in singles]


def test_half_precision_base_gets_fp32_parts_and_a_finite_output() -> None:
    model = tiny_llama().to(torch.bfloat16)
    inject(model, UniPELT(prefix_length=N))
    checks.randomise(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert torch.isfinite(checks.logits(model)).all()


def test_trainable_parameters_on_tiny_llama() -> None:
    model = inject(tiny_llama(), UniPELT())
    lora = 2 * (
        (8 * 64 + 64 * 8 + 65) + (8 * 64 + 32 * 8 + 65)
    )  # q (64 -> 64), v (64 -> 32), each with a gate
    prefix = 10 * 64 + (64 * 512 + 512) + (512 * 128 + 128) + 2 * 65  # embeddings, MLP, one gate per layer
    adapter = 2 * ((64 * 4 + 4) + (4 * 64 + 64) + 65)
    assert count_parameters(model)["trainable"] == lora + prefix + adapter == 104_848


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@family_param
def test_training_changes_only_its_parameters(family: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(family, prefix_length=N))
    assert sum(any(g in k for g in GATE_KEYS) for k in changed) == 2 * 8


@family_param
def test_save_load_roundtrip_in_its_own_format(family: str, tmp_path: Path) -> None:
    build, method = build_and_method(family, prefix_length=N)
    loaded = checks.assert_roundtrip(build, method, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["prefix_length"], config["adapter_style"]) == (
        "UNIPELT",
        N,
        "pfeiffer",
    )
    assert injection_record(loaded).methods["default"] == method


def test_merge_is_refused_clearly_also_by_a_gated_lora_layer() -> None:
    checks.assert_not_mergeable(*build_and_method("llama", prefix_length=N))
    model = inject(tiny_llama(), UniPELT(prefix_length=N))
    with pytest.raises(NotMergeableError, match="gated per input"):
        model.model.layers[0].self_attn.q_proj.merge()


@family_param
def test_disable_gives_the_base_output(family: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(family, prefix_length=N), mergeable=False)


def test_unload_restores_the_base_model_and_removes_the_gate_hooks() -> None:
    checks.assert_unload_restores_base(*build_and_method("llama", prefix_length=N))
    model = inject(tiny_llama(), UniPELT(prefix_length=N))
    attention = model.model.layers[0].self_attn
    assert len(attention._forward_pre_hooks) == 1
    unload(model)
    checks.logits(model)  # the first call after unloading removes the hooks
    assert len(attention._forward_pre_hooks) == 0


@family_param
def test_trains_through_the_callback_and_checkpoints_every_part(family: str, tmp_path: Path) -> None:
    build, method = build_and_method(family)
    parts = ("lora_A", "lora_B", "lora_gate", "prompt_encoder", "prefix_gates", "bottleneck")
    parts += ("modules_to_save",) if family == "bert" else ()
    assert_trains_and_checkpoints_every_part(build, method, tmp_path, parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter_style": "parallel"}, "UniPELT adapter_style='parallel': UniPELT's adapter is sequential"),
        ({"prefix_length": 0}, "UniPELT prefix_length=0 must be an integer >= 1"),
        ({"lora_r": 0}, "UniPELT: LoRA r=0: the rank must be an integer >= 1"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UniPELT(**kwargs)
