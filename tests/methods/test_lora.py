"""LoRA: the METHODS.md acceptance checks on every supported layer type, PiSSA, and parity with peft.

Each acceptance check runs on four tiny models that together cover every layer LoRA wraps:
``nn.Conv1d/Conv2d`` (3x3 and 1x1), ``nn.Embedding`` and ``nn.Linear`` (MLPConv), Linear under grouped-query
attention (Llama), transformers' ``Conv1D`` with its (in, out) weight layout (GPT-2), and a classifier trained in
full through ``modules_to_save`` (BERT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import (
    adapter_state_dict,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unload,
    unmerge,
)
from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer, NotMergeableError, to_peft_key
from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.methods import LoRA, ModulesToSave
from lightning_peft.methods.lora.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch


def _tokens_forward(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def _mlpconv_forward(model: nn.Module) -> torch.Tensor:
    image, token = MLPConv.example_inputs()
    return model(image.to(next(model.parameters()).dtype), token)


@dataclass
class Case:
    build: Callable[..., nn.Module]
    lora: dict[str, Any]
    forward: Callable[[nn.Module], torch.Tensor]
    #: The wrapper type expected at each targeted module.
    wrapped: dict[str, type[AdapterLayer]] = field(default_factory=dict)


CASES = {
    "mlpconv": Case(
        MLPConv,
        {"target_modules": ["conv2d", "conv1d", "pointwise", "embed", "fc1"]},
        _mlpconv_forward,
        {
            "conv2d": LoraConv,
            "conv1d": LoraConv,
            "pointwise": LoraConv,
            "embed": LoraEmbedding,
            "fc1": LoraLinear,
        },
    ),
    "llama": Case(
        tiny_llama,
        {"target_modules": ["q_proj", "v_proj"]},
        _tokens_forward,
        {f"model.layers.{i}.self_attn.{p}": LoraLinear for i in range(2) for p in ("q_proj", "v_proj")},
    ),
    "gpt2": Case(
        tiny_gpt2,
        {"target_modules": ["c_attn"]},
        _tokens_forward,
        {f"transformer.h.{i}.attn.c_attn": LoraLinear for i in range(2)},
    ),
    "bert": Case(
        tiny_bert_classifier,
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        _tokens_forward,
        {
            **{
                f"bert.encoder.layer.{i}.attention.self.{p}": LoraLinear
                for i in range(2)
                for p in ("query", "value")
            },
            "classifier": ModulesToSave,
        },
    ),
}

case_param = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model that no adapter owns, cloned."""
    owned = set(adapter_state_keys(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in owned}


def _perturb_modules_to_save(model: nn.Module) -> None:
    """Make each trained copy differ from its original, as it would after training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulesToSave):
                for p in module.modules_to_save.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@case_param
def test_wraps_exactly_the_targets(case: Case) -> None:
    model = inject(case.build(), LoRA(**case.lora))
    assert {n: type(m) for n, m in _adapter_layers(model)} == case.wrapped
    for name, layer in _adapter_layers(model):
        if isinstance(layer, LoraLinear):
            # GPT-2's Conv1D stores its weight as (in, out): LoRA must know to transpose when merging.
            assert layer.fan_in_fan_out == isinstance(layer.base_layer, Conv1D), name


@case_param
def test_default_init_is_a_no_op(case: Case) -> None:
    base = case.build()
    expected = case.forward(base)
    assert torch.equal(case.forward(inject(base, LoRA(**case.lora))), expected)


@case_param
def test_training_changes_only_adapter_parameters(case: Case) -> None:
    model = inject(case.build(), LoRA(**case.lora))
    adapter_keys = set(adapter_state_keys(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # B starts at zero, so A gets its first gradient in step 2
        optimizer.zero_grad()
        case.forward(model).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == adapter_keys
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


@case_param
def test_merge_unmerge_and_merge_and_unload_match_unmerged(case: Case) -> None:
    model = case.build()
    base_out = case.forward(model).detach()
    inject(model, LoRA(**case.lora, init_lora_weights=False))  # a non-zero update, so merging matters
    _perturb_modules_to_save(model)
    original_base = _base_state(model)
    with torch.no_grad():
        out = case.forward(model)
    assert (out - base_out).abs().max() > 1e-2

    merge(model)
    assert all(layer.merged for _, layer in _adapter_layers(model) if isinstance(layer, LoraLayer))
    merged_base = _base_state(model)
    torch.testing.assert_close(case.forward(model), out, atol=1e-5, rtol=1e-5)

    merge(model)  # idempotent: a second merge must not add the update twice
    for key, value in _base_state(model).items():
        assert torch.equal(value, merged_base[key]), key
    torch.testing.assert_close(case.forward(model), out, atol=1e-5, rtol=1e-5)

    unmerge(model)
    assert not any(layer.merged for _, layer in _adapter_layers(model))
    torch.testing.assert_close(case.forward(model), out, atol=1e-5, rtol=1e-5)
    for key, value in _base_state(model).items():
        torch.testing.assert_close(value, original_base[key], atol=1e-6, rtol=0, msg=key)

    plain = merge_and_unload(model)
    assert _adapter_layers(plain) == []
    assert set(plain.state_dict()) == set(case.build().state_dict())
    torch.testing.assert_close(case.forward(plain), out, atol=1e-5, rtol=1e-5)


@case_param
def test_non_finite_merge_is_refused_and_changes_nothing(case: Case) -> None:
    model = inject(case.build(), LoRA(**case.lora, init_lora_weights=False))
    lora_layers = [layer for _, layer in _adapter_layers(model) if isinstance(layer, LoraLayer)]
    # Poison the *last* layer: every earlier layer would merge fine, and must be left unmerged too.
    with torch.no_grad():
        for name, param in lora_layers[-1].named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.fill_(float("inf"))
    before = _base_state(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge(model)
    for key, value in _base_state(model).items():
        assert torch.equal(value, before[key]), key
    assert not any(layer.merged for layer in lora_layers)


@case_param
def test_disable_adapters_gives_the_base_output(case: Case) -> None:
    model = case.build()
    base_out = case.forward(model)
    inject(model, LoRA(**case.lora, init_lora_weights=False))
    _perturb_modules_to_save(model)
    out = case.forward(model)
    with disable_adapters(model):
        assert torch.equal(case.forward(model), base_out)
    assert torch.equal(case.forward(model), out)

    merge(model)
    with disable_adapters(model):
        # A merged layer is unmerged to run the base: W + d - d is W up to rounding, not bit for bit.
        torch.testing.assert_close(case.forward(model), base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(case.forward(model), out, atol=1e-5, rtol=1e-5)


@case_param
def test_unload_restores_the_base_model_exactly(case: Case) -> None:
    model = case.build()
    first = next(iter(model.parameters()))
    first.requires_grad_(False)  # a user-frozen parameter must stay frozen, the rest trainable
    original = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    base_out = case.forward(model)

    inject(model, LoRA(**case.lora, init_lora_weights=False))
    assert not torch.equal(case.forward(model), base_out)
    plain = unload(model)

    assert plain is model
    assert _adapter_layers(model) == []
    state = model.state_dict()
    assert list(state) == list(original)
    for key, value in state.items():
        assert torch.equal(value, original[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert torch.equal(case.forward(model), base_out)


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    assert hf.set_activation_checkpointing(model, True, use_reentrant=use_reentrant)


def _llama_grads(checkpointing: str) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients after one backward pass, and how often the first adapted layer ran forward."""
    model = tiny_llama().train()
    use_reentrant = checkpointing.startswith("reentrant")
    if checkpointing in ("reentrant", "non_reentrant"):
        _enable_checkpointing(model, use_reentrant)
    inject(model, LoRA(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    if checkpointing.endswith("after_inject"):
        _enable_checkpointing(model, use_reentrant)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    x = token_batch()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, len(calls)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant", "reentrant_after_inject"])
def test_gradient_checkpointing_gives_grads_to_the_same_parameters(checkpointing: str) -> None:
    expected, calls = _llama_grads("none")
    assert calls == 1
    grads, calls = _llama_grads(checkpointing)
    assert calls == 2  # the checkpointed layer ran again in backward: checkpointing is really on
    assert set(grads) == set(expected)
    assert all("lora_" in n for n in grads) and len(grads) == 8  # A and B of q, v in 2 layers
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5)


def _half_supported(dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(2, 3, 4, 4, dtype=dtype)
        torch.nn.functional.conv2d(x, torch.ones(3, 3, 1, 1, dtype=dtype))
        (x.flatten(1) @ x.flatten(1).T).sum().item()
        return True
    except RuntimeError:
        return False


@case_param
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_forward_is_finite(case: Case, dtype: torch.dtype) -> None:
    if not _half_supported(dtype):
        pytest.skip(f"{dtype} matmul/conv is not supported on this CPU")
    model = case.build().to(dtype)
    base_out = case.forward(model)
    inject(model, LoRA(**case.lora))
    assert torch.equal(case.forward(model), base_out)  # still a no-op in half precision
    # Adapters of half-precision bases are kept in fp32 (small, and far better optimised).
    assert {v.dtype for k, v in adapter_state_dict(model).items() if "lora_" in k} == {torch.float32}
    unload(model)
    inject(model, LoRA(**case.lora, init_lora_weights=False))
    out = case.forward(model)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    merge(model)
    assert torch.isfinite(case.forward(model)).all()


# --- hyperparameters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "rank must be an integer >= 1"),
        ({"r": -1}, "rank must be an integer >= 1"),
        ({"r": 2.5}, "rank must be an integer >= 1"),
        ({"r": True}, "rank must be an integer >= 1"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha_pattern": {"v_proj": -1.0}}, r"alpha_pattern\['v_proj'\]"),
        ({"dropout": 1.0}, r"must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"must be in \[0, 1\)"),
        ({"bias": "some"}, "bias='some' must be one of"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights='xavier'"),
        ({"init_lora_weights": "pissa_niter_x"}, "pissa_niter_<n>"),
        ({"use_dora": True, "init_lora_weights": "pissa"}, "cannot be combined with PiSSA"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRA(target_modules=["q_proj"], **kwargs)


def test_scaling_is_alpha_over_r_or_sqrt_r_with_rslora() -> None:
    model = inject(tiny_llama(), LoRA(r=4, alpha=16, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 4.0
    model = inject(tiny_llama(), LoRA(r=4, alpha=16, use_rslora=True, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 8.0


def test_default_init_distributions() -> None:
    model = inject(MLPConv(), LoRA(r=4, target_modules=["fc1", "embed"]))
    fc1, embed = model.fc1, model.embed
    bound = 1 / math.sqrt(fc1.in_features)  # kaiming_uniform(a=sqrt 5) on an (r, in) weight
    assert fc1.lora_A["default"].weight.abs().max() <= bound
    assert fc1.lora_A["default"].weight.std() > bound / 4
    assert torch.count_nonzero(fc1.lora_B["default"].weight) == 0
    # Embedding LoRA is the other way round: A is zero and B ~ N(0, 1).
    assert torch.count_nonzero(embed.lora_embedding_A["default"]) == 0
    assert 0.5 < embed.lora_embedding_B["default"].std() < 1.5


def test_default_targets_come_from_the_model_type() -> None:
    model = inject(tiny_llama(), LoRA())
    assert {n.rsplit(".", 1)[-1] for n, _ in _adapter_layers(model)} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="target_modules is required"):
        inject(MLPConv(), LoRA())


def test_dora_and_pissa_are_refused_on_layers_that_cannot_have_them() -> None:
    with pytest.raises(
        ValueError, match="DoRA supports Linear, Conv1D and convolution layers; embed is Embedding"
    ):
        inject(MLPConv(), LoRA(target_modules=["embed"], use_dora=True))
    with pytest.raises(ValueError, match="PiSSA supports Linear/Conv1D layers; conv2d is Conv2d"):
        inject(MLPConv(), LoRA(target_modules=["conv2d"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="PiSSA supports Linear/Conv1D layers; embed is Embedding"):
        inject(MLPConv(), LoRA(target_modules=["embed"], init_lora_weights="pissa_niter_2"))
    with pytest.raises(ValueError, match=r"PiSSA needs r <= min\(out, in\) = 4 for fc2, got r=8"):
        inject(MLPConv(), LoRA(r=8, target_modules=["fc2"], init_lora_weights="pissa"))


# --- PiSSA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_conv1d"])
def test_pissa_keeps_the_output_and_starts_from_the_top_singular_directions(build: Callable) -> None:
    model = build()
    base_out = _tokens_forward(model)
    targets = ["q_proj", "v_proj"] if build is tiny_llama else ["c_attn"]
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(targets))}
    r = 4
    inject(model, LoRA(r=r, alpha=8, target_modules=targets, init_lora_weights="pissa"))
    torch.testing.assert_close(_tokens_forward(model), base_out, atol=1e-4, rtol=0)
    for name, original in originals.items():
        layer = model.get_submodule(name)
        W = original.T if layer.fan_in_fan_out else original  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        # A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s): both have orthogonal rows/columns scaled by S_r / s.
        torch.testing.assert_close(A @ A.T, torch.diag(S[:r] / s), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(B.T @ B, torch.diag(S[:r] / s), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s * B @ A, top, atol=1e-5, rtol=1e-4)
        residual = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
        torch.testing.assert_close(residual, W - top, atol=1e-5, rtol=1e-4)


def _spectrum_model() -> nn.Module:
    """Llama whose q_proj weights have a decaying spectrum, so the top singular directions are well defined."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            W = layer.self_attn.q_proj.weight
            U, _ = torch.linalg.qr(torch.randn(W.shape[0], W.shape[0], generator=g))
            V, _ = torch.linalg.qr(torch.randn(W.shape[1], W.shape[1], generator=g))
            S = 0.5 * 0.7 ** torch.arange(min(W.shape), dtype=W.dtype)
            W.copy_(U[:, : len(S)] @ torch.diag(S) @ V[:, : len(S)].T)
    return model


def test_pissa_niter_approximates_the_top_singular_directions() -> None:
    model = _spectrum_model()
    base_out = _tokens_forward(model)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    r = 4
    torch.manual_seed(0)
    inject(model, LoRA(r=r, alpha=8, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
    # Whatever the SVD's accuracy, the base keeps W - sBA, so the output is unchanged.
    torch.testing.assert_close(_tokens_forward(model), base_out, atol=1e-4, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(original, full_matrices=False)
    top = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    # Randomised SVD with 4 subspace iterations: close to the exact rank-r truncation, not equal.
    assert torch.linalg.norm(s * B @ A - top) / torch.linalg.norm(top) < 5e-2
    torch.testing.assert_close(torch.linalg.svdvals(s * B @ A)[:r], S[:r], atol=0, rtol=2e-2)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_matches_peft(init: str) -> None:
    peft = pytest.importorskip("peft")
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init}
    torch.manual_seed(0)
    reference = peft.get_peft_model(_spectrum_model(), peft.LoraConfig(**config))
    torch.manual_seed(0)
    ours = inject(_spectrum_model(), ours_from_peft(config))
    theirs_state = reference.base_model.model.state_dict()
    for key, value in ours.state_dict().items():  # A, B and the residual base weights
        torch.testing.assert_close(value, theirs_state[key], atol=1e-5, rtol=1e-4, msg=key)


# --- parity with Hugging Face peft ----------------------------------------------------------------------------
@dataclass
class ParityCase:
    build: Callable[..., nn.Module]
    peft: dict[str, Any]  # LoraConfig kwargs; ours are derived from them
    forward: Callable[[nn.Module], torch.Tensor] = _tokens_forward


PARITY = {
    "lora": ParityCase(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "rslora": ParityCase(
        tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
    ),
    "dora": ParityCase(
        tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
    ),
    "rank_alpha_pattern": ParityCase(
        tiny_llama,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"],
            # an alternation, a layer-specific key, and a plain suffix
            "rank_pattern": {"q_proj|k_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
            "alpha_pattern": {"v_proj": 3.0, "down_proj": 32.0},
        },
    ),
    "bias_lora_only": ParityCase(
        tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": "lora_only"}
    ),
    "bias_all": ParityCase(tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": "all"}),
    "modules_to_save": ParityCase(
        tiny_bert_classifier,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    ),
    "embedding": ParityCase(
        MLPConv, {"r": 4, "lora_alpha": 8, "target_modules": ["embed"]}, _mlpconv_forward
    ),
    "conv": ParityCase(
        MLPConv,
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv2d", "pointwise", "conv1d"]},
        _mlpconv_forward,
    ),
    "conv_dora": ParityCase(
        MLPConv,
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv2d", "pointwise", "conv1d"], "use_dora": True},
        _mlpconv_forward,
    ),
    "gpt2_conv1d": ParityCase(tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}),
    "gpt2_conv1d_dora": ParityCase(
        tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "use_dora": True}
    ),
}


def ours_from_peft(config: dict[str, Any]) -> LoRA:
    """The LoRA equivalent to a peft ``LoraConfig(**config)``."""
    renamed = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    return LoRA(**{renamed.get(k, k): v for k, v in config.items()})


def _randomise_trainable(model: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor (A, B, magnitudes, biases, copies) a distinct non-default value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def peft_and_ours(case: ParityCase, **extra: Any) -> tuple[nn.Module, nn.Module]:
    """The same tiny model twice, adapted by peft and by us, with peft's adapter weights copied into ours."""
    peft = pytest.importorskip("peft")
    config = {**case.peft, **extra}
    reference = peft.get_peft_model(case.build(), peft.LoraConfig(**config))
    _randomise_trainable(reference)
    ours = inject(case.build(), ours_from_peft(config))
    peft_state = peft.get_peft_model_state_dict(reference)
    mapping = {to_peft_key(k, "default"): k for k in adapter_state_dict(ours)}
    assert set(mapping) == set(peft_state)  # the same tensors, under the same names as in peft's files
    _, unexpected = ours.load_state_dict({mapping[k]: v for k, v in peft_state.items()}, strict=False)
    assert unexpected == []
    return reference, ours


@pytest.mark.parametrize("case", list(PARITY.values()), ids=list(PARITY))
def test_outputs_match_peft(case: ParityCase) -> None:
    reference, ours = peft_and_ours(case)
    with torch.no_grad():
        expected = case.forward(reference)
        torch.testing.assert_close(case.forward(ours), expected, atol=1e-5, rtol=0)
        reference.merge_adapter()
        merge(ours)
        torch.testing.assert_close(case.forward(ours), case.forward(reference), atol=1e-5, rtol=0)
        torch.testing.assert_close(case.forward(ours), expected, atol=1e-5, rtol=1e-5)
    # merge_and_unload leaves the same plain model in both libraries.
    theirs_plain = reference.merge_and_unload().state_dict()
    ours_plain = merge_and_unload(ours).state_dict()
    assert set(ours_plain) == set(theirs_plain)
    for key, value in ours_plain.items():
        torch.testing.assert_close(value, theirs_plain[key], atol=1e-6, rtol=1e-6, msg=key)


def test_adapter_shapes_follow_rank_pattern_like_peft() -> None:
    reference, ours = peft_and_ours(PARITY["rank_alpha_pattern"])
    for name, layer in _adapter_layers(ours):
        theirs = reference.base_model.model.get_submodule(name)
        assert layer.r["default"] == theirs.r["default"], name
        assert layer.scaling["default"] == pytest.approx(theirs.scaling["default"]), name


def test_bias_all_trains_the_same_parameters_as_peft() -> None:
    peft = pytest.importorskip("peft")
    config = {"target_modules": ["query"], "bias": "all", "modules_to_save": ["classifier"]}
    reference = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(**config))
    model = inject(tiny_bert_classifier(), ours_from_peft(config))
    theirs = {n.removeprefix("base_model.model.") for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert "bert.embeddings.LayerNorm.bias" in ours  # every bias of the model, ...
    assert not model.classifier.base_layer.bias.requires_grad  # ... but the head's frozen original


@pytest.mark.parametrize("case_name", ["lora", "dora", "conv_dora"])
def test_train_mode_with_dropout_matches_peft(case_name: str) -> None:
    case = PARITY[case_name]
    reference, ours = peft_and_ours(case, lora_dropout=0.25)
    reference.train()
    ours.train()
    torch.manual_seed(11)
    expected = case.forward(reference)
    torch.manual_seed(11)
    torch.testing.assert_close(case.forward(ours), expected, atol=1e-5, rtol=0)


class GroupedConvNet(nn.Module):
    """A depthwise-separable block (MobileNet/ConvNeXt style): a grouped 3x3 and a depthwise 3x3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.grouped = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.depthwise(torch.relu(self.grouped(x))).mean(dim=(2, 3)))


def _grouped_input() -> torch.Tensor:
    return torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1))


def test_grouped_convolutions_match_peft_both_ways_and_refuse_to_merge(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["grouped", "depthwise"]}
    ours = inject(GroupedConvNet(), ours_from_peft(config))
    assert ours.depthwise.lora_B["default"].groups == 8 and ours.depthwise.lora_A["default"].groups == 1
    _randomise_trainable(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(GroupedConvNet(), tmp_path / "ours")
    x = _grouped_input()
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(theirs(x), expected, atol=1e-6, rtol=0)
        assert not torch.allclose(GroupedConvNet()(x), expected, atol=1e-3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(NotMergeableError, match=r"grouped convolution \(groups=2\)"):
        merge(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    reference = peft.get_peft_model(GroupedConvNet(), peft.LoraConfig(**config))
    _randomise_trainable(reference, seed=5)
    reference.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(GroupedConvNet(), tmp_path / "theirs")(x), reference(x), atol=1e-6, rtol=0
        )


def test_grouped_convolutions_refuse_ranks_not_divisible_by_groups_and_dora() -> None:
    with pytest.raises(
        ValueError, match=r"grouped convolution depthwise \(groups=8\): r=4 must be a multiple"
    ):
        inject(GroupedConvNet(), LoRA(r=4, target_modules=["depthwise"]))
    with pytest.raises(ValueError, match="DoRA is not supported there"):
        inject(GroupedConvNet(), LoRA(r=8, target_modules=["grouped"], use_dora=True))
