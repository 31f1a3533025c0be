"""OLoRA init (``init_lora_weights="olora"``): QR factors of the base weight, the residual kept as the base, parity
with peft in the weights it builds and in the adapter directory it writes, and the refusals shared with PiSSA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import inject, load_adapter, merge_and_unload, save_adapter
from lightning_peft.methods import LoRA, QLoRA
from tests.tiny_models import MLPConv, tiny_gpt2, tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, narrow (kv heads: out < in) and wide (out < in) weights


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def _randomise_trainable(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_olora_keeps_the_output_and_holds_the_qr_factors(use_rslora: bool) -> None:
    model = tiny_llama()
    base_out = _logits(model)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    r = 4
    inject(
        model, LoRA(r=r, alpha=8, target_modules=TARGETS, use_rslora=use_rslora, init_lora_weights="olora")
    )
    torch.testing.assert_close(_logits(model), base_out, atol=1e-5, rtol=0)
    for name, W in originals.items():
        layer = model.get_submodule(name)
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        assert s == (8 / r**0.5 if use_rslora else 8 / r)
        # B: the first r orthonormal columns of Q; A: the first r rows of R (upper triangular: zeros below).
        torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
        assert torch.equal(A[:, :r], torch.triu(A[:, :r]))
        # A is B's projection of W: B^T W = R[:r] because Q's other columns are orthogonal to B's.
        torch.testing.assert_close(A, B.T @ W, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, W - s * B @ A, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 32.0}}],
    ids=["lora", "rslora", "patterns"],
)
def test_olora_matches_peft(extra: dict) -> None:
    peft = pytest.importorskip("peft")
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "olora", **extra}
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).base_model.model.state_dict()
    ours = inject(tiny_llama(), LoRA(**{{"lora_alpha": "alpha"}.get(k, k): v for k, v in config.items()}))
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    # A, B and the residual base weights, bit for bit (same QR of the same float32 weight); measured max |diff| 0.
    assert max((value - reference[key]).abs().max().item() for key, value in state.items()) == 0.0


def test_olora_in_a_half_precision_base_keeps_the_residual_in_the_base_dtype() -> None:
    model = tiny_llama().to(torch.bfloat16)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    inject(model, LoRA(r=4, alpha=8, target_modules=["q_proj"], init_lora_weights="olora"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    # The factors come from the float32 QR of the bf16 weight: base + s B A gives it back within bf16 rounding.
    rebuilt = layer.base_layer.weight.float() + 2.0 * B @ A
    torch.testing.assert_close(rebuilt, original.float(), atol=2e-2, rtol=0)


def test_an_olora_adapter_loads_in_peft_and_here_on_the_original_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = inject(tiny_llama(), LoRA(r=4, alpha=8, target_modules=TARGETS, init_lora_weights="olora"))
    _randomise_trainable(model)  # as after training
    trained_out = _logits(model)
    directory = save_adapter(model, tmp_path / "adapter")
    # Both loaders re-run OLoRA on the untouched base (moving the same residual into it), then load A and B.
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(directory))
    assert theirs.peft_config["default"].init_lora_weights == "olora"
    torch.testing.assert_close(_logits(theirs), trained_out, atol=1e-5, rtol=0)
    ours = load_adapter(tiny_llama(), directory)
    torch.testing.assert_close(_logits(ours), trained_out, atol=1e-6, rtol=0)
    # Merged, the residual and the trained update add up to one plain model with the trained outputs.
    torch.testing.assert_close(_logits(merge_and_unload(ours)), trained_out, atol=1e-5, rtol=0)


def test_olora_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ValueError, match="OLoRA supports Linear layers; conv2d is Conv2d"):
        inject(MLPConv(), LoRA(target_modules=["conv2d"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match="OLoRA supports Linear layers; embed is Embedding"):
        inject(MLPConv(), LoRA(target_modules=["embed"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match=r"OLoRA needs r <= min\(out, in\) = 4 for fc2, got r=8"):
        inject(MLPConv(), LoRA(r=8, target_modules=["fc2"], init_lora_weights="olora"))
    gpt2 = tiny_gpt2()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"Conv1D; peft re-runs OLoRA on load .* Use init_lora_weights='pissa'"
    ):
        inject(gpt2, LoRA(r=4, target_modules=["c_attn"], init_lora_weights="olora"))
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())  # refused before any rewrite
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with OLoRA"):
        LoRA(target_modules=["q_proj"], use_dora=True, init_lora_weights="olora")
    with pytest.raises(
        ValueError, match="QLoRA init_lora_weights='olora': OLoRA cannot rewrite a 4-bit base"
    ):
        QLoRA(target_modules=["q_proj"], init_lora_weights="olora")
    with pytest.raises(ValueError, match="'pissa_niter_<n>' or 'olora'"):
        LoRA(target_modules=["q_proj"], init_lora_weights="qr")
