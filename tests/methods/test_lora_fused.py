"""LoRA's and DoRA's fused linear kernels: the same outputs and gradients as the module composition, used only
where exact.

The reference is the same layer with the fused kernel switched off (``fusable_adapter`` -> None), i.e. the
module path ``base(x) + B(A(dropout(x)) * s)`` (DoRA: ``LoraLinear.adapter_output``): every output, input
gradient and parameter gradient (DoRA's magnitude included) must agree to float rounding (relative 1e-5), with
and without dropout, bias training and the GPT-2 ``Conv1D`` layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import inject, merge
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.layers import LoraLinear
from lightning_peft.methods.lora.variants import attach_gate


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


def _fused_and_reference(model: nn.Module, layer: LoraLinear, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """:func:`_run` on the fused kernel, then on the module path (the layer stays switched to it)."""
    assert layer.fusable_adapter(x, (), {}) == "default"
    fused = _run(model, x)
    _module_path(layer)
    return [fused, _run(model, x)]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_kernel_matches_the_module_composition(
    base_kind: str, bias: str, dropout: float, use_dora: bool
) -> None:
    model, layer = _adapted(base_kind, bias=bias, dropout=dropout, use_dora=use_dora)
    fused, reference = _fused_and_reference(model, layer, torch.randn(3, 5, 16))
    # output, x.grad, lora_A, lora_B (+ DoRA's magnitude) (+ the base bias with bias="all")
    assert len(fused) == 4 + use_dora + (bias == "all")
    _assert_close(fused, reference)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_dora_in_eval_matches_the_module_path(dropout: float) -> None:
    """In eval the dropout is off and DoRA's base term sees x itself, on both paths."""
    model, layer = _adapted("conv1d", dropout=dropout, use_dora=True)
    model.eval()
    _assert_close(*_fused_and_reference(model, layer, torch.randn(2, 5, 16)))


@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_dora_with_a_frozen_magnitude_matches_the_module_path(bias: str) -> None:
    """No magnitude gradient: the kernel scales its combined output in place and keeps no (tokens, out) tensor."""
    model, layer = _adapted("linear", use_dora=True, bias=bias)
    layer.lora_magnitude_vector["default"].requires_grad_(False)
    _assert_close(*_fused_and_reference(model, layer, torch.randn(3, 5, 16)))


def test_fused_dora_keeps_one_output_sized_tensor_for_backward() -> None:
    """x, the (r, tokens) intermediate and one (tokens, out) tensor; the module path keeps two of the latter."""
    _, layer = _adapted("linear", use_dora=True)
    x = torch.randn(64, 16, requires_grad=True)

    def output_sized_saved(model: nn.Module) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.shape) or t, lambda t: t):
            model(x)
        return sum(shape == torch.Size([64, 24]) for shape in sizes)

    fused = output_sized_saved(layer)  # the layer alone: the Tanh after it keeps its own output
    _module_path(layer)
    assert fused == 1 < output_sized_saved(layer)


@pytest.mark.parametrize(
    ("base_kind", "lora"),
    [
        pytest.param("linear", {}, id="lora"),
        pytest.param(
            "conv1d", {"use_dora": True, "bias": "all"}, id="dora"
        ),  # magnitude and weight norm move
    ],
)
def test_fused_kernel_trains_like_the_module_composition(base_kind: str, lora: dict) -> None:
    """Ten AdamW steps on each path end at the same adapter weights (relative 1e-5)."""
    finals = []
    for fused in (True, False):
        model, layer = _adapted(base_kind, **lora)
        if not fused:
            _module_path(layer)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(10):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
            assert layer.fusable_adapter(x, (), {}) == ("default" if fused else None)
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    _assert_close(finals[0], finals[1])
    start = [p for p in _adapted(base_kind, **lora)[0].parameters() if p.requires_grad]
    assert not any(
        torch.equal(a, b) for a, b in zip(finals[0], start, strict=True)
    )  # every one of them trained


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
    layer.add_adapter("second", 2, 2, 0.0, False, False, True)  # add_adapter also activates it
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


def test_merged_and_autocast_take_the_module_path() -> None:
    x = torch.randn(2, 16)
    for use_dora in (False, True):
        model, layer = _adapted("linear", use_dora=use_dora)
        merge(model)
        assert layer.fusable_adapter(x, (), {}) is None
        _, layer = _adapted("linear", use_dora=use_dora)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.fusable_adapter(x, (), {}) is None


def _gated(layer: LoraLinear) -> None:
    attach_gate(layer, "default", nn.Sequential(nn.Linear(16, 1), nn.Sigmoid()))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda layer: _with_two_adapters(layer), id="two active adapters"),
        pytest.param(_gated, id="gated (UniPELT)"),
        pytest.param(lambda layer: setattr(layer, "row_adapters", ["default", None]), id="mixed batch"),
        pytest.param(
            lambda layer: layer.lora_B["default"].register_forward_hook(lambda *a: None), id="hook on B"
        ),
        pytest.param(
            lambda layer: layer.lora_dropout["default"].eval(), id="dropout mode differs from layer"
        ),
        pytest.param(lambda layer: layer.lora_magnitude_vector.double(), id="magnitude dtype differs"),
    ],
)
def test_dora_cases_the_kernel_does_not_cover_take_the_module_path(change) -> None:
    _, layer = _adapted("linear", use_dora=True, dropout=0.1)
    x = torch.randn(2, 16)
    assert layer.fusable_adapter(x, (), {}) == "default"
    change(layer)
    assert layer.fusable_adapter(x, (), {}) is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_inference_equals_the_module_path_under_no_grad(use_dora: bool) -> None:
    model, layer = _adapted("conv1d", use_dora=use_dora, bias="all")
    x = torch.randn(4, 7, 16)
    assert layer.fusable_adapter(x, (), {}) == "default"
    with torch.no_grad():
        fused = model(x)
        reference_model = copy.deepcopy(model)
        _module_path(reference_model[0])
        reference = reference_model(x)
    assert not fused.requires_grad
    _assert_close([fused], [reference])
