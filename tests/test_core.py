"""The Trainer-free API: inject, count, several adapters, merge/disable/unload bookkeeping, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import (
    adapter_state_dict,
    count_parameters,
    disable_adapters,
    inject,
    merge,
    set_adapter,
    unload,
    unmerge,
)
from lightning_peft.core.injection import adapter_state_keys, injection_record
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.layers import LoraLayer
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


# --- injection wraps, never copies --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "targets"),
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"]), (MLPConv, ["conv2d", "embed", "fc1"])],
    ids=["llama", "gpt2", "mlpconv"],
)
def test_inject_keeps_base_tensors_in_place(build, targets: list[str]) -> None:
    model = build()
    before = {id(p): (p, p.data_ptr()) for p in _unique_params(model)}
    bytes_before = sum(p.numel() * p.element_size() for p in _unique_params(model))
    inject(model, LoRA(r=4, target_modules=targets))
    after = {id(p): p for p in _unique_params(model)}
    for key, (param, ptr) in before.items():
        assert after[key] is param  # the same Parameter objects, ...
        assert param.data_ptr() == ptr  # ... on the same storage
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter_state_dict(model).values())
    assert adapter_bytes > 0
    assert sum(p.numel() * p.element_size() for p in _unique_params(model)) == bytes_before + adapter_bytes
    assert set(after) - set(before) == {id(p) for p in model.parameters() if p.requires_grad}


def test_count_parameters_llama_is_exact() -> None:
    model = tiny_llama()
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim  # GQA: 64 and 32
    per_layer = (
        c.hidden_size * q_out + 2 * c.hidden_size * kv_out + q_out * c.hidden_size  # q, k, v, o
        + 3 * c.hidden_size * c.intermediate_size  # gate, up, down
        + 2 * c.hidden_size  # two RMSNorms
    )  # fmt: skip
    base_total = 2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    assert count_parameters(model)["total"] == base_total == 90432

    r = 8
    inject(model, LoRA(r=r, target_modules=["q_proj", "v_proj"]))
    lora_per_layer = (r * c.hidden_size + q_out * r) + (r * c.hidden_size + kv_out * r)  # q: A, B; v: A, B
    trainable = c.num_hidden_layers * lora_per_layer
    assert trainable == 3584
    counts = count_parameters(model)
    assert counts == {
        "trainable": trainable,
        "total": base_total + trainable,
        "trainable_percent": pytest.approx(100 * trainable / (base_total + trainable)),
    }


def test_count_parameters_counts_tied_weights_once_and_saved_modules() -> None:
    gpt2 = tiny_gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    total = count_parameters(gpt2)["total"]
    assert total == sum(p.numel() for p in gpt2.parameters())  # parameters() already dedups
    inject(gpt2, LoRA(r=4, target_modules=["c_attn"]))
    d = gpt2.config.n_embd
    assert count_parameters(gpt2)["trainable"] == 2 * (4 * d + 3 * d * 4)  # c_attn: (d -> 3d), two layers

    bert = tiny_bert_classifier(num_labels=3)
    total = count_parameters(bert)["total"]
    inject(bert, LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    d, layers = bert.config.hidden_size, bert.config.num_hidden_layers
    lora, head = layers * (2 * d + d * 2), d * 3 + 3
    assert count_parameters(bert) == {
        "trainable": lora + head,
        "total": total + lora + head,  # the trained copy of the head is extra
        "trainable_percent": pytest.approx(100 * (lora + head) / (total + lora + head)),
    }


# --- adapters by name ---------------------------------------------------------------------------------------
def test_injecting_the_same_adapter_name_twice_is_refused() -> None:
    model = inject(tiny_llama(), LoRA(target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'default' is already injected"):
        inject(model, LoRA(target_modules=["v_proj"]))
    assert list(model.state_dict()) == list(state)  # nothing was added


def test_a_second_adapter_and_set_adapter_switch_outputs() -> None:
    model = tiny_llama()
    base = _logits(model)
    torch.manual_seed(1)
    inject(model, LoRA(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    out_a = _logits(model)
    torch.manual_seed(2)
    inject(model, LoRA(r=4, target_modules=["v_proj", "o_proj"], init_lora_weights=False), "b")
    out_b = _logits(model)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    assert not torch.allclose(out_b, base, atol=1e-3)

    # Only the active adapter is trainable, and adapter_state_dict separates them.
    keys_a, keys_b = set(adapter_state_dict(model, "a")), set(adapter_state_dict(model, "b"))
    assert keys_a and keys_b and not keys_a & keys_b
    assert all(".a." in k for k in keys_a) and all(".b." in k for k in keys_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == keys_b
    assert set(adapter_state_dict(model)) == keys_a | keys_b

    set_adapter(model, "a")
    assert torch.equal(_logits(model), out_a)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == keys_a
    set_adapter(model, "b")
    assert torch.equal(_logits(model), out_b)
    with disable_adapters(model):
        assert torch.equal(_logits(model), base)

    # Both share the v_proj wrapper: one LoraLayer per module, never nested.
    v_proj = model.model.layers[0].self_attn.v_proj
    assert isinstance(v_proj, LoraLayer) and v_proj.r == {"a": 8, "b": 4}
    assert not any(isinstance(m, LoraLayer) for m in v_proj.base_layer.modules())

    with pytest.raises(ValueError, match=r"Unknown adapter 'c'; this model has \['a', 'b'\]"):
        set_adapter(model, "c")


def test_merge_of_an_inactive_adapter_and_unmerge() -> None:
    model = tiny_llama()
    inject(model, LoRA(target_modules=["q_proj"], init_lora_weights=False), "a")
    out_a = _logits(model)
    inject(model, LoRA(target_modules=["q_proj"], init_lora_weights=False), "b")
    merge(model, ["a"])  # fold "a" in, run "b" on top of it
    set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), out_a, atol=1e-5, rtol=0)  # merged "a" is not added twice
    unmerge(model)
    torch.testing.assert_close(_logits(model), out_a, atol=1e-5, rtol=0)


def test_disable_adapters_restores_state_after_an_error() -> None:
    model = inject(tiny_llama(), LoRA(target_modules=["q_proj"], init_lora_weights=False))
    out = _logits(model)
    with pytest.raises(RuntimeError, match="boom"), disable_adapters(model):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model), out)


def test_merge_and_unload_keeps_the_trained_saved_module() -> None:
    model = inject(tiny_bert_classifier(), LoRA(target_modules=["query"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained = model.classifier.modules_to_save["default"].weight.clone()
    out = _logits(model)
    unload(model, merge_adapters=True)
    assert isinstance(model.classifier, nn.Linear)
    assert torch.equal(model.classifier.weight, trained)
    torch.testing.assert_close(_logits(model), out, atol=1e-6, rtol=0)


def test_unload_after_merge_unmerges_first() -> None:
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, LoRA(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merge(model)
    unload(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0, msg=key)


class LinearThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, H, W)
        return self.conv(self.fc(x.transpose(1, 3)).transpose(1, 3))


@pytest.mark.parametrize(
    "refused",
    [{"init_lora_weights": "olora", "r": 2}, {"init_lora_weights": "pissa", "r": 2}],
    ids=["olora", "pissa"],
)
def test_a_refused_injection_leaves_the_model_as_it_was(refused: dict) -> None:
    # fc is wrapped before conv is found to be unsupported: that wrapper must be taken out again.
    model = LinearThenConv()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Conv2d"):
        inject(model, LoRA(target_modules=["fc", "conv"], **refused))
    assert isinstance(model.fc, nn.Linear) and isinstance(model.conv, nn.Conv2d)
    assert injection_record(model) is None
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    # With an adapter already there, the refused one is removed and the first keeps working.
    inject(model, LoRA(target_modules=["fc"], init_lora_weights=False), "a")
    x = torch.randn(2, 4, 3, 3)
    out = model(x)
    with pytest.raises(ValueError, match="Conv2d"):
        inject(model, LoRA(target_modules=["fc", "conv"], **refused), "b")
    assert isinstance(model.conv, nn.Conv2d) and model.fc.adapter_names() == ["a"]
    assert list(injection_record(model).methods) == ["a"]
    assert torch.equal(model(x), out)


# --- errors -------------------------------------------------------------------------------------------------
def test_api_functions_require_an_injected_model() -> None:
    model = tiny_llama()
    for call in (merge, unmerge, unload, lambda m: set_adapter(m, "default"), adapter_state_dict):
        with pytest.raises(ValueError, match=r"call lightning_peft.inject\(model, method\) first"):
            call(model)


def test_inject_requires_a_method_instance() -> None:
    with pytest.raises(TypeError, match="inject expects a PEFTMethod"):
        inject(tiny_llama(), {"r": 8})  # type: ignore[arg-type]


def test_the_injection_record_tracks_methods_and_original_trainability() -> None:
    model = tiny_llama()
    model.lm_head.requires_grad_(False)
    method = LoRA(target_modules=["q_proj"])
    inject(model, method)
    record = injection_record(model)
    assert record.methods == {"default": method} and record.active == "default"
    assert record.requires_grad["lm_head.weight"] is False
    assert record.requires_grad["model.embed_tokens.weight"] is True
    assert adapter_state_keys(model, parameters_only=True) == [
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in range(2) for ab in "AB"
    ]
    unload(model)
    assert injection_record(model) is None
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad


def test_a_subclass_of_a_method_does_not_take_over_loading_its_peft_type():
    from dataclasses import dataclass

    from lightning_peft.core.contract import method_for_peft_type

    @dataclass(kw_only=True)
    class MyLoRA(LoRA):
        extra: int = 0

    assert method_for_peft_type("LORA") is LoRA
