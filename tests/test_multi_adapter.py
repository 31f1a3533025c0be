"""Several named adapters on one base: delete, isolation in training, mixed batches, weighted LoRA combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import (
    adapter_state_dict,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    mixed_batch,
    save_adapter,
    set_adapter,
    unmerge,
)
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.injection import injection_record
from lightning_peft.methods import IA3, LoRA, PromptTuning
from tests.tiny_models import tiny_gpt2, tiny_llama, token_batch


def _logits(model: nn.Module, tokens: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(batch=4) if tokens is None else tokens).logits


def _two_loras(build=tiny_llama) -> nn.Module:
    model = build()
    inject(model, LoRA(target_modules=["q_proj", "v_proj"] if build is tiny_llama else ["c_attn"],
                       init_lora_weights=False), "a")  # fmt: skip
    torch.manual_seed(5)
    inject(model, LoRA(r=4, alpha=16, target_modules=["v_proj", "o_proj"] if build is tiny_llama else ["c_attn"],
                       init_lora_weights=False), "b")  # fmt: skip
    return model


# --- delete ------------------------------------------------------------------------------------------------
def test_delete_adapter_keeps_the_other_and_unwraps_emptied_layers() -> None:
    model = _two_loras()
    set_adapter(model, "b")
    b_state = {k: v.clone() for k, v in adapter_state_dict(model, "b").items()}
    b_out = _logits(model)
    delete_adapter(model, "a")
    record = injection_record(model)
    assert (list(record.methods), record.active) == (["b"], "b")
    assert all(".a." not in k for k in model.state_dict())
    attn = model.model.layers[0].self_attn
    assert not isinstance(attn.q_proj, AdapterLayer)  # held only "a": unwrapped
    assert isinstance(attn.v_proj, AdapterLayer) and attn.v_proj.adapter_names() == ["b"]
    assert attn.v_proj.r == {"b": 4}
    assert all(torch.equal(v, b_state[k]) for k, v in adapter_state_dict(model, "b").items())
    assert torch.equal(_logits(model), b_out)


def test_deleting_the_active_and_then_the_last_adapter_restores_the_base() -> None:
    base_out = _logits(tiny_llama())
    model = _two_loras()  # "b" active
    delete_adapter(model, "b")
    assert injection_record(model).active == "a"
    delete_adapter(model, "a")
    assert injection_record(model) is None
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(_logits(model), base_out)


def test_deleting_a_merged_adapter_unmerges_it_first() -> None:
    model = _two_loras()
    set_adapter(model, "a")
    with disable_adapters(model):
        base_out = _logits(model)
    merge(model, ["a"])
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    torch.testing.assert_close(_logits(model), base_out, atol=1e-6, rtol=0)


def test_deleting_an_unknown_adapter_names_the_known_ones() -> None:
    model = _two_loras()
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\]"):
        delete_adapter(model, "c")


def test_training_one_adapter_leaves_the_others_bit_identical() -> None:
    model = tiny_llama()
    inject(model, LoRA(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(model, IA3(target_modules=["k_proj", "down_proj"], init_ia3_weights=False), "b")
    inject(model, LoRA(target_modules=["q_proj"]), "c")
    set_adapter(model, "c")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_state_dict(model, "c")}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    model.train()
    for _ in range(3):
        tokens = token_batch(batch=2)
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [k for k, v in adapter_state_dict(model, "c").items() if "lora_B" in k]
    assert changed and all(
        v.abs().max() > 0 for k, v in adapter_state_dict(model, "c").items() if k in changed
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_a_lora_and_an_ia3_directory_load_side_by_side(tmp_path: Path) -> None:
    lora = inject(tiny_llama(), LoRA(target_modules=["v_proj"], init_lora_weights=False))
    ia3 = inject(tiny_llama(), IA3(target_modules=["k_proj", "down_proj"], init_ia3_weights=False))
    save_adapter(lora, tmp_path / "lora")
    save_adapter(ia3, tmp_path / "ia3")
    model = load_adapter(tiny_llama(), tmp_path / "lora", adapter_name="lora")
    load_adapter(model, tmp_path / "ia3", adapter_name="ia3")
    assert torch.equal(_logits(model), _logits(ia3))
    set_adapter(model, "lora")
    assert torch.equal(_logits(model), _logits(lora))
    delete_adapter(model, "lora")
    assert torch.equal(_logits(model), _logits(ia3))


# --- mixed batches -----------------------------------------------------------------------------------------
def _single_runs(model: nn.Module, tokens: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with disable_adapters(model):
                rows.append(_logits(model, tokens[i : i + 1]))
        else:
            set_adapter(model, name)
            rows.append(_logits(model, tokens[i : i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_mixed_batch_rows_equal_single_adapter_runs(build) -> None:
    model = _two_loras(build)
    inject(model, IA3(target_modules=["k_proj", "down_proj"] if build is tiny_llama else ["c_fc", "mlp.c_proj"],
                      feedforward_modules=["down_proj"] if build is tiny_llama else ["mlp.c_proj"],
                      init_ia3_weights=False), "c")  # fmt: skip
    set_adapter(model, "a")
    names = ["b", None, "a", "c", "b", None]
    tokens = token_batch(batch=len(names), seed=3)
    with mixed_batch(model, names):
        mixed = _logits(model, tokens)
    set_adapter(model, "a")
    active_out = _logits(model, tokens)  # the layers run the active adapter again outside the block
    expected = _single_runs(model, tokens, names)
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=0)
    set_adapter(model, "a")
    assert torch.equal(_logits(model, tokens), active_out)
    with disable_adapters(model):
        torch.testing.assert_close(mixed[1], _logits(model, tokens[1:2])[0], atol=1e-6, rtol=0)


def test_mixed_batch_with_gradients_flows_only_into_the_rows_adapters() -> None:
    model = _two_loras()
    model.requires_grad_(True)
    tokens = token_batch(batch=2)
    with mixed_batch(model, ["a", None]):
        model(tokens).logits.sum().backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["a"].weight.grad.abs().max() > 0
    assert model.model.layers[0].self_attn.o_proj.lora_B["b"].weight.grad is None


def test_mixed_batch_refusals() -> None:
    model = _two_loras()
    with pytest.raises(ValueError, match=r"unknown adapters \['x'\]"), mixed_batch(model, ["a", "x"]):
        pass
    with pytest.raises(ValueError, match=r"one name .* per row"), mixed_batch(model, ["a", "b", None]):
        _logits(model, token_batch(batch=2))
    merge(model, ["b"])
    with pytest.raises(ValueError, match=r"merged.*unmerge"), mixed_batch(model, ["a", "b"]):
        pass
    unmerge(model)
    inject(model, PromptTuning(num_virtual_tokens=2), "prompt")
    with (
        pytest.raises(ValueError, match="every row must name one of this model's prompt adapters"),
        mixed_batch(model, ["a", "b"]),
    ):
        pass


# --- weighted combinations ---------------------------------------------------------------------------------
def _delta(layer, name: str) -> torch.Tensor:
    return layer.delta_weight(name)


def test_cat_combination_is_the_exact_weighted_sum_of_deltas(tmp_path: Path) -> None:
    model = tiny_llama()
    inject(model, LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(model, LoRA(r=4, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                       rank_pattern={"v_proj": 2}, init_lora_weights=False), "b")  # fmt: skip
    set_adapter(model, "a")
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.5], "ab", combination_type="cat")
    assert injection_record(model).active == "a"
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.v_proj):
        expected = 0.7 * _delta(layer, "a") - 1.5 * _delta(layer, "b")
        torch.testing.assert_close(_delta(layer, "ab"), expected, atol=1e-6, rtol=0)
        assert layer.r["ab"] == layer.r["a"] + layer.r["b"] and layer.scaling["ab"] == 1.0
    set_adapter(model, "ab")
    out = _logits(model)
    save_adapter(model, tmp_path)  # per-module ranks survive the file format
    torch.testing.assert_close(_logits(load_adapter(tiny_llama(), tmp_path)), out, atol=1e-6, rtol=0)


def test_linear_combination_weights_A_and_B_as_peft_does() -> None:
    model = tiny_llama()
    inject(model, LoRA(r=4, alpha=8, target_modules=["q_proj"], init_lora_weights=False), "a")
    inject(model, LoRA(r=4, alpha=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    add_weighted_adapter(model, ["a", "b"], [0.5, -2.0], "lin", combination_type="linear")
    layer = model.model.layers[0].self_attn.q_proj
    wa, wb = 0.5 * layer.scaling["a"], -2.0 * layer.scaling["b"]
    A = wa**0.5 * layer.lora_A["a"].weight - abs(wb) ** 0.5 * layer.lora_A["b"].weight
    B = wa**0.5 * layer.lora_B["a"].weight + abs(wb) ** 0.5 * layer.lora_B["b"].weight
    torch.testing.assert_close(_delta(layer, "lin"), B @ A, atol=1e-6, rtol=0)
    # One adapter alone: no cross terms, so linear is exact.
    add_weighted_adapter(model, ["a"], [0.3], "a_only", combination_type="linear")
    torch.testing.assert_close(_delta(layer, "a_only"), 0.3 * _delta(layer, "a"), atol=1e-6, rtol=0)


def test_weighted_combination_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    inject(model, LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    inject(model, LoRA(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    reference = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        adapter_name="a",
    )
    reference.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    theirs = reference.base_model.model.model.layers[0].self_attn.q_proj
    ours = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for name in ("a", "b"):
            theirs.lora_A[name].weight.copy_(ours.lora_A[name].weight)
            theirs.lora_B[name].weight.copy_(ours.lora_B[name].weight)
    for kind in ("cat", "linear"):
        add_weighted_adapter(model, ["a", "b"], [0.6, 1.3], kind, combination_type=kind)
        reference.add_weighted_adapter(["a", "b"], [0.6, 1.3], kind, combination_type=kind)
        torch.testing.assert_close(ours.delta_weight(kind), theirs.get_delta_weight(kind), atol=1e-6, rtol=0)


def test_weighted_combination_refusals() -> None:
    model = tiny_llama()
    inject(model, LoRA(r=4, target_modules=["q_proj"]), "a")
    inject(model, LoRA(r=2, target_modules=["q_proj"]), "b")
    inject(model, LoRA(r=2, target_modules=["v_proj"]), "v")
    inject(model, IA3(target_modules=["k_proj"], feedforward_modules=[]), "ia3")
    with pytest.raises(ValueError, match="equal ranks"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="different modules"):
        add_weighted_adapter(model, ["a", "v"], [1, 1], "x")
    with pytest.raises(ValueError, match="only plain LoRA"):
        add_weighted_adapter(model, ["a", "ia3"], [1, 1], "x")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(model, ["a", "b"], [1], "x")
    with pytest.raises(ValueError, match="combination_type"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination_type="mean")
    assert "x" not in injection_record(model).methods
