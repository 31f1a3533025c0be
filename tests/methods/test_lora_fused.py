"""LoRA's fused linear kernel: the same outputs and gradients as the module composition, used only where exact.

The reference is the same layer with the fused kernel switched off (``fusable_adapter`` -> None), i.e. the
module path ``base(x) + B(A(dropout(x)) * s)``: every output, input gradient and parameter gradient must agree
to float rounding (relative 1e-5), with and without dropout, bias training and the GPT-2 ``Conv1D`` layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import inject, merge
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora import LoraLinear


def _adapted(base_kind: str, **lora: object) -> tuple[nn.Module, LoraLinear]:
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if base_kind == "linear" else Conv1D(24, 16)  # Conv1D(nf=out, nx=in)
    model = inject(nn.Sequential(base, nn.Tanh()), LoRA(r=4, alpha=7, target_modules=["0"], **lora))
    with torch.no_grad():  # B = 0 at init would hide a wrong update; move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, model[0]


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and every trainable parameter's gradient of one weighted-sum backward."""
    torch.manual_seed(1)  # the same dropout mask on both paths
    x = x.detach().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 2, y.shape[-1])).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return [y.detach(), x.grad, *grads]


def _module_path(layer: LoraLinear) -> None:
    layer.fusable_adapter = lambda *args: None  # instance attribute: the module composition from now on


def _assert_close(fused: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(fused) == len(reference)
    for a, b in zip(fused, reference, strict=True):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_kernel_matches_the_module_composition(base_kind: str, bias: str, dropout: float) -> None:
    model, layer = _adapted(base_kind, bias=bias, dropout=dropout)
    x = torch.randn(3, 5, 16)
    assert layer.fusable_adapter(x, (), {}) == "default"
    fused = _run(model, x)
    _module_path(layer)
    reference = _run(model, x)
    # output, x.grad, lora_A, lora_B (+ the base bias with bias="all")
    assert len(fused) == (5 if bias == "all" else 4)
    _assert_close(fused, reference)


def test_fused_kernel_trains_like_the_module_composition() -> None:
    """Ten AdamW steps on each path end at the same adapter weights (relative 1e-5)."""
    finals = []
    for fused in (True, False):
        model, layer = _adapted("linear")
        if not fused:
            _module_path(layer)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(10):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    _assert_close(finals[0], finals[1])
    assert not torch.equal(finals[0][1], _adapted("linear")[1].lora_B["default"].weight)  # it did train


def test_a_hook_on_an_adapter_module_keeps_the_module_path() -> None:
    """FSDP units and user hooks live on lora_A/lora_B: they must see their module called."""
    model, layer = _adapted("linear")
    calls = []
    layer.lora_A["default"].register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    x = torch.randn(2, 16)
    assert layer.fusable_adapter(x, (), {}) is None
    model(x)
    assert calls == [torch.Size([2, 16])]


def _with_two_adapters(layer: LoraLinear) -> None:
    layer.update_layer("second", 2, 2, 0.0, False, False, True)  # update_layer also activates it
    assert layer.active_adapters == ["default", "second"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda layer, x: (layer, x.double()), id="input dtype differs"),
        pytest.param(lambda layer, x: (layer.double(), x.float()), id="weights dtype differs"),
        pytest.param(lambda layer, x: (setattr(layer, "disabled", True), x), id="adapters disabled"),
        pytest.param(lambda layer, x: (_with_two_adapters(layer), x), id="two active adapters"),
    ],
)
def test_cases_the_kernel_does_not_cover_take_the_module_path(change) -> None:
    _, layer = _adapted("linear")
    _, x = change(layer, torch.randn(2, 16))
    assert layer.fusable_adapter(x, (), {}) is None


def test_dora_merged_and_autocast_take_the_module_path() -> None:
    x = torch.randn(2, 16)
    _, dora = _adapted("linear", use_dora=True)
    assert dora.fusable_adapter(x, (), {}) is None
    model, layer = _adapted("linear")
    merge(model)
    assert layer.fusable_adapter(x, (), {}) is None
    _, layer = _adapted("linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.fusable_adapter(x, (), {}) is None


def test_fused_inference_equals_the_module_path_under_no_grad() -> None:
    model, layer = _adapted("conv1d")
    x = torch.randn(4, 7, 16)
    assert layer.fusable_adapter(x, (), {}) == "default"
    with torch.no_grad():
        fused = model(x)
        reference_model = copy.deepcopy(model)
        _module_path(reference_model[0])
        reference = reference_model(x)
    assert not fused.requires_grad
    _assert_close([fused], [reference])
