"""Shared-input LoRA equals separate LoRA layers: outputs, every gradient and the saved file, on Llama (q/k/v and
gate/up share) and where it must not share (train-mode dropout, DoRA, two adapters, inputs that differ).

The reference is the same model without sharing (each layer's own fused kernel). Outputs and gradients agree to
fp32 rounding: the shared products sum in another order, so each check is relative to the largest magnitude,
1e-5 (measured max |diff| is printed with ``-s``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_peft import inject
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.layers import LoraLinear
from lightning_peft.methods.lora.shared_input import share_lora_inputs
from lightning_peft.testing.checks import randomise
from lightning_peft.testing.models import tiny_llama, token_batch


def _pair(**lora: object) -> tuple[nn.Module, nn.Module]:
    """(separate, shared): the same all-linear LoRA Llama with non-trivial adapters, sharing on in the second."""
    model = inject(tiny_llama(), LoRA(r=4, alpha=8, target_modules="all-linear", **lora))
    randomise(model)
    model.train()  # dropout (where set) draws masks
    shared = copy.deepcopy(model)
    assert share_lora_inputs(shared) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    return model, shared


def _run(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(5)
    logits = model(input_ids=ids).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return [logits.detach(), *grads]


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


def _coordinator(model: nn.Module):
    return next(m for m in model.modules() if isinstance(m, LoraLinear)).shared_inputs


def test_groups_are_the_layers_called_on_the_same_tensor() -> None:
    _, shared = _pair()
    shared(input_ids=token_batch())  # the first call learns the groups
    groups = {
        _name(shared, leader): [_name(shared, m) for m in members]
        for leader, members in _coordinator(shared).groups.items()
    }
    expected = {}
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        expected[attn + "q_proj"] = [attn + p for p in ("q_proj", "k_proj", "v_proj")]
        expected[mlp + "gate_proj"] = [mlp + "gate_proj", mlp + "up_proj"]
    assert groups == expected  # o_proj and down_proj read tensors no other layer reads


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_outputs_and_gradients_equal_separate_layers() -> None:
    separate, shared = _pair(bias="all")
    ids = token_batch(batch=3, length=9)
    shared(input_ids=ids)  # learn the groups
    coordinator = _coordinator(shared)
    before = (coordinator.shared, coordinator.reused)
    diff = _max_rel_diff(_run(shared, ids), _run(separate, ids))
    # per Llama layer one product for q/k/v (k, v reuse it) and one for gate/up (up reuses it)
    assert (coordinator.shared - before[0], coordinator.reused - before[1]) == (4, 6)
    print(f"shared vs separate LoRA: max relative |diff| of logits and grads {diff:.1e}")
    assert diff < 1e-5


def test_training_steps_stay_equal_and_the_file_is_the_same(tmp_path) -> None:
    separate, shared = _pair()
    ids = token_batch()
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (separate, shared)
    ]
    for _ in range(3):
        for model, optimizer in zip((separate, shared), optimizers, strict=True):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert _coordinator(shared).reused >= 12  # steps 2 and 3 shared (6 reuses each)
    save_adapter(separate, tmp_path / "separate")
    save_adapter(shared, tmp_path / "shared")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "separate" / "adapter_model.safetensors")
    b = load_file(tmp_path / "shared" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 28  # 14 layers x (lora_A, lora_B), peft's keys
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "separate" / "adapter_config.json").read_text() == (
        tmp_path / "shared" / "adapter_config.json"
    ).read_text()


@pytest.mark.parametrize(
    "case",
    ["train-mode dropout", "dora", "two active adapters", "inputs differ"],
)
def test_layers_do_not_share_where_it_would_not_be_exact(case: str) -> None:
    lora = {"dropout": 0.2} if case == "train-mode dropout" else {"use_dora": True} if case == "dora" else {}
    separate, shared = _pair(**lora)
    if case == "two active adapters":
        inject(separate, LoRA(r=2, target_modules="all-linear"), adapter_name="other")
        randomise(separate, seed=4)
        for layer in separate.modules():
            if isinstance(layer, LoraLinear):
                layer.set_active_adapters(["default", "other"])
        shared = copy.deepcopy(separate)
        share_lora_inputs(shared)
    ids = token_batch()
    if case == "inputs differ":  # the groups are learned on one call; the next call gives k a copy of x
        shared(input_ids=ids)
        k_proj = shared.model.layers[0].self_attn.k_proj
        original = k_proj.forward
        k_proj.forward = lambda x, *a, **k: original(x.clone(), *a, **k)
    shared(input_ids=ids)
    diff = _max_rel_diff(_run(shared, ids), _run(separate, ids))
    coordinator = _coordinator(shared)
    if case == "inputs differ":
        assert coordinator.shared > 0  # q led its group, k refused the rows (another tensor), v took them
        assert diff < 1e-5
    else:
        assert (coordinator.shared, coordinator.reused) == (0, 0)
        assert diff < 1e-5 if case != "train-mode dropout" else diff == 0.0


def test_eval_mode_dropout_shares_and_turning_it_off_restores_the_plain_path() -> None:
    separate, shared = _pair(dropout=0.2)
    separate.eval(), shared.eval()
    ids = token_batch()
    with torch.no_grad():
        shared(input_ids=ids)
        out = shared(input_ids=ids).logits
        assert _coordinator(shared).reused == 6
        assert ((out - separate(input_ids=ids).logits).abs().max() / out.abs().max()).item() < 1e-5
        assert share_lora_inputs(shared, enabled=False) == 0
        assert torch.equal(shared(input_ids=ids).logits, separate(input_ids=ids).logits)


def test_refused_without_lora_layers() -> None:
    with pytest.raises(ValueError, match="no LoRA linear layer; inject LoRA"):
        share_lora_inputs(nn.Sequential(nn.Linear(2, 2)))
