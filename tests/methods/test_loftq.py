"""LoftQ init for QLoRA (``init_lora_weights="loftq"``): the quantized residual and the SVD factors equal peft's
``loftq_init`` (run on the CPU: peft hard-codes ``"cuda"``, mapped to the CPU here), the init approximates the
full-precision model better than plain quantization, the adapter directory loads both ways, and the refusals."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import inject, load_adapter, save_adapter
from lightning_peft.core.quantization import dequantize_weight, is_quantized_linear, quantize
from lightning_peft.methods import LoRA, QLoRA
from tests.tiny_models import tiny_llama, token_batch

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, narrow (out < in) and wide (in > out) weights
R = 4


@contextlib.contextmanager
def _peft_on_cpu() -> Iterator[None]:
    """peft's loftq_init moves the weight to ``"cuda"`` (``"xpu"``) unconditionally; run it on the CPU instead."""

    def on_cpu(original):
        def to(self, *args, **kwargs):
            args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
            if kwargs.get("device") in ("cuda", "xpu"):
                kwargs["device"] = "cpu"
            return original(self, *args, **kwargs)

        return to

    originals = torch.Tensor.to, bnb.nn.Params4bit.to
    torch.Tensor.to, bnb.nn.Params4bit.to = on_cpu(originals[0]), on_cpu(originals[1])
    try:
        yield
    finally:
        torch.Tensor.to, bnb.nn.Params4bit.to = originals


def _loftq(alpha: float = R, loftq_iter: int = 1, **extra) -> nn.Module:
    method = QLoRA(
        r=R, alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq", loftq_iter=loftq_iter, **extra
    )
    return inject(tiny_llama(), method)


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(tuple(TARGETS)) and hasattr(m, "lora_A")}


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch(2, 12)).logits


@pytest.mark.parametrize("loftq_iter", [1, 3])
def test_loftq_matches_peft(loftq_iter: int) -> None:
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    weights = {
        n: m.weight.detach().clone() for n, m in tiny_llama().named_modules() if n.endswith(tuple(TARGETS))
    }
    # peft's LoftQ: NF4, no double quantization, scale 1 (alpha = r).
    ours = _targets(_loftq(loftq_iter=loftq_iter, double_quant=False))
    assert sorted(ours) == sorted(weights)
    diffs = {"A": 0.0, "B": 0.0, "base": 0.0}
    for name, layer in ours.items():
        with _peft_on_cpu():
            base, A, B = loftq_utils.loftq_init(
                weights[name], num_bits=4, reduced_rank=R, num_iter=loftq_iter
            )
        assert layer.quantized and layer.base_layer.weight.quant_state.quant_type == "nf4"
        diffs["A"] = max(diffs["A"], (layer.lora_A["default"].weight - A).abs().max().item())
        diffs["B"] = max(diffs["B"], (layer.lora_B["default"].weight - B).abs().max().item())
        diffs["base"] = max(diffs["base"], (dequantize_weight(layer.base_layer) - base).abs().max().item())
    assert max(diffs.values()) <= 1e-6, diffs  # measured: 0.0 for A, B and the dequantized base


def test_loftq_approximates_the_full_precision_model_better() -> None:
    full = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in full.named_modules() if n.endswith(tuple(TARGETS))}
    plain_model = inject(tiny_llama(), QLoRA(r=R, target_modules=TARGETS))  # B = 0 on Q(W)
    plain = _targets(plain_model)
    errors = {}
    for loftq_iter in (1, 3):
        # alpha = 2r: s = 2, where peft's A = R, B = L would double the correction; here s * B A = L R.
        model = _loftq(alpha=2 * R, loftq_iter=loftq_iter)
        errors[loftq_iter] = 0.0
        for name, layer in _targets(model).items():
            W, s = weights[name], layer.scaling["default"]
            assert s == 2
            corrected = (
                dequantize_weight(layer.base_layer)
                + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            )
            quantized_only = dequantize_weight(plain[name].base_layer)
            assert (W - corrected).norm() < (W - quantized_only).norm(), name
            errors[loftq_iter] += (W - corrected).norm().item()
        if loftq_iter == 1:
            # The model's output is closer to the full-precision one than plain QLoRA's (B = 0) is.
            reference = _logits(full)
            assert (_logits(model) - reference).abs().max() < (_logits(plain_model) - reference).abs().max()
    assert errors[3] < errors[1], errors  # more alternations, a smaller quantization error


def test_loftq_directory_loads_both_ways(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    # Ours -> peft: peft's base is the LoftQ-quantized base in floats (what LoftQ users save and load).
    ours = _loftq(alpha=2 * R, loftq_iter=2, double_quant=False)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (
        config["init_lora_weights"] is True and config["peft_type"] == "LORA"
    )  # loading never re-runs LoftQ
    base = tiny_llama()
    with (
        torch.no_grad()
    ):  # every quantized Linear (QLoRA quantizes all block Linears, LoftQ corrects the targets)
        for name, module in ours.named_modules():
            if is_quantized_linear(module):
                base.get_submodule(name.removesuffix(".base_layer")).weight.copy_(dequantize_weight(module))
    in_peft = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    torch.testing.assert_close(in_peft(input_ids=token_batch(2, 12)).logits, _logits(ours), atol=1e-5, rtol=0)

    # peft -> ours: peft's LoftQ model (float base holding the dequantized residual), saved as its example does.
    config = peft.LoraConfig(
        r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2),
    )  # fmt: skip
    with _peft_on_cpu():
        reference = peft.get_peft_model(tiny_llama(), config)
    reference.peft_config["default"].init_lora_weights = True
    reference.save_pretrained(tmp_path / "peft")
    theirs = reference.base_model.model
    model = tiny_llama()
    model.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    )
    # peft quantized only these, and their weights are on the NF4 grid: quantizing them again is exact.
    quantize(model, TARGETS, double_quant=False)
    for name, layer in _targets(theirs).items():
        assert torch.equal(dequantize_weight(model.get_submodule(name)), layer.base_layer.weight)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(
        _logits(model), reference(input_ids=token_batch(2, 12)).logits, atol=1e-5, rtol=0
    )


def test_loftq_refusals() -> None:
    with pytest.raises(
        ValueError, match=r"needs a quantized base built by LoftQ: use QLoRA\(init_lora_weights='loftq'"
    ):
        LoRA(target_modules=TARGETS, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_iter=0 must be an integer >= 1"):
        QLoRA(init_lora_weights="loftq", loftq_iter=0)
    model = tiny_llama()
    quantize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="needs the full-precision weights it quantizes, but this model is already quantized"
    ):
        inject(model, QLoRA(r=R, target_modules=TARGETS, init_lora_weights="loftq"))
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
