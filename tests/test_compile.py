"""torch.compile and the adapter wrappers: no graph break in a LoRA/DoRA/IA3 training step, compiled outputs and
gradients equal to eager, and wrappers that forward only declared base-layer attributes (no catch-all)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from lightning_peft import inject, prepare_model_for_compiled_hotswap
from lightning_peft.core.adapter_layer import FORWARDED_ATTR_READERS, FORWARDED_ATTRS, AdapterLayer
from lightning_peft.core.transformers_compat import Conv1D
from lightning_peft.methods import IA3, LoRA
from tests.tiny_models import tiny_llama, token_batch

IDS = token_batch(2, 8)

METHODS = {
    "lora": lambda: LoRA(r=4, target_modules="all-linear", dropout=0.1, init_lora_weights=False),
    "dora": lambda: LoRA(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def adapted(method: str, seed: int = 0) -> nn.Module:
    model = tiny_llama(num_hidden_layers=1)
    torch.manual_seed(seed)
    inject(model, METHODS[method]())
    return model.train()


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("method", ["lora", "lora hotswap-ready"])
def test_a_training_step_compiles_to_one_graph(method: str) -> None:
    """dynamo traces a LoRA forward + loss in one graph: no break anywhere, so none in lightning_peft's code (train
    mode, dropout on: the fused kernel's path; hotswap-ready, the scale is a tensor and the modules run)."""
    model = adapted(method.split()[0])
    if method.endswith("hotswap-ready"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    dynamo.reset()
    explained = dynamo.explain(loss_of)(model, IDS)
    where = [
        f"{b.reason} at {[f'{f.filename}:{f.lineno}' for f in b.user_stack[-2:]]}"
        for b in explained.break_reasons
    ]
    assert explained.graph_break_count == 0, where
    assert explained.graph_count == 1


def _step_results(model: nn.Module, steps, *inputs) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss, gradients of the trainable parameters) of each step function on the same model and inputs."""
    results = []
    for step in steps:
        model.zero_grad()
        loss = step(model, *inputs)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    return results


def _worst_gap(results: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> float:
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    gaps = [(compiled_grads[n] - g).abs().max().item() for n, g in eager_grads.items()]
    return max((compiled_loss - eager_loss).abs().item(), *gaps)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_compiled_training_step_equals_eager(method: str) -> None:
    """Loss and every adapter gradient of the compiled Llama step (dynamo + AOTAutograd) equal eager within 1e-5
    (eval mode: no dropout draw to match); ``fullgraph=True`` also proves the step has no graph break."""
    model = adapted(method).eval()
    dynamo.reset()
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    gap = _worst_gap(_step_results(model, (loss_of, compiled), IDS))
    assert gap <= 1e-5, gap


def test_inductor_compiles_lora_to_the_eager_numbers() -> None:
    """inductor's own kernels for LoRA layers (a small MLP, so the C++ build stays short): loss and gradients equal
    eager within 1e-5."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    inject(mlp, LoRA(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(6, 16)

    def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).square().mean()

    dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    gap = _worst_gap(_step_results(mlp, (step, compiled), x))
    assert gap <= 1e-5, gap


# --- the wrappers forward declared attributes only ---------------------------------------------------------------
def _wrapped(base: nn.Module) -> AdapterLayer:
    model = nn.Sequential()
    model.add_module("layer", base)
    inject(model, LoRA(r=2, target_modules=["layer"]))
    assert isinstance(model.layer, AdapterLayer)
    return model.layer


@pytest.mark.parametrize(
    ("base", "names"),
    [
        (nn.Linear(6, 4), ["weight", "bias", "in_features", "out_features"]),
        (Conv1D(4, 6), ["weight", "bias", "nf", "nx"]),
        (nn.Embedding(10, 4, padding_idx=0), ["weight", "num_embeddings", "embedding_dim", "padding_idx"]),
        (nn.Conv1d(3, 4, 3, stride=2), ["weight", "bias", "kernel_size", "stride", "padding", "groups"]),
    ],
    ids=["Linear", "Conv1D", "Embedding", "Conv1d"],
)
def test_declared_attributes_are_the_base_layers(base: nn.Module, names: list[str]) -> None:
    wrapper = _wrapped(base)
    for name in names:
        assert getattr(wrapper, name) is getattr(base, name), name


def test_an_undeclared_attribute_is_an_error_naming_the_wrapper() -> None:
    base = nn.Linear(6, 4)
    base.fast_path_weight = base.weight  # something a fast path could read instead of calling the adapter
    wrapper = _wrapped(base)
    with pytest.raises(AttributeError, match=r"LoraLinear \(an adapter wrapper around Linear\) .* 'wieght'"):
        wrapper.wieght  # noqa: B018
    with pytest.raises(AttributeError, match=r"'fast_path_weight'\. It forwards only .*FORWARDED_ATTRS"):
        wrapper.fast_path_weight  # noqa: B018
    assert not hasattr(wrapper, "fast_path_weight") and wrapper.base_layer.fast_path_weight is base.weight


def test_every_declared_attribute_exists_on_a_wrapped_layer_kind() -> None:
    """The list holds no stale name: each is an attribute of a layer kind LoRA wraps, and says who reads it."""
    kinds = [
        nn.Linear(2, 2),
        Conv1D(2, 2),
        nn.Embedding(3, 2),
        nn.Conv2d(2, 2, 1),
        Gemma3TextScaledWordEmbedding(3, 2, 0),
    ]
    assert all(any(hasattr(kind, name) for kind in kinds) for name in FORWARDED_ATTRS)
    assert all(reader for reader in FORWARDED_ATTR_READERS.values())


def test_transformers_reads_through_the_wrappers() -> None:
    """``get_input_embeddings().weight`` (resize, tying) and the model's dtype checks see the base weights."""
    model = tiny_llama(num_hidden_layers=1)
    embedding = model.get_input_embeddings()
    inject(model, LoRA(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert isinstance(model.get_input_embeddings(), AdapterLayer)
    assert model.get_input_embeddings().weight is embedding.weight
    assert model.get_input_embeddings().padding_idx == embedding.padding_idx
