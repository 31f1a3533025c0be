"""BitFit: the METHODS.md acceptance checks, bias selection, and the refusal of bias-free models.

The Llama family member here is Qwen2 (biases on q, k, v): tiny_llama has no bias at all, which BitFit refuses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_peft import adapter_state_dict, count_parameters, inject, merge, unmerge
from lightning_peft.methods import BitFit
from lightning_peft.methods.bitfit import BitFitLayer
from lightning_peft.testing import checks
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_qwen2

CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "qwen2": (tiny_qwen2, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
}
case_param = pytest.mark.parametrize("case", list(CASES), ids=list(CASES))


def build_and_method(case: str) -> tuple[Callable[[], nn.Module], BitFit]:
    build, kwargs = CASES[case]
    return build, BitFit(**kwargs)


def _bias_counts(model: nn.Module, skip: str = "classifier") -> dict[str, int]:
    return {
        n: p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(skip)
    }


def test_a_model_without_biases_is_refused_clearly() -> None:
    model = tiny_llama()
    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM has no bias parameters .* BitFit would train nothing"
    ):
        inject(model, BitFit())
    assert checks.adapter_layers(model) == []  # nothing half-injected
    with pytest.raises(ValueError, match=r"selects 4 modules .* none of them has a bias"):
        inject(tiny_qwen2(), BitFit(target_modules=["o_proj", "down_proj"]))


def test_default_trains_every_bias_and_nothing_else() -> None:
    expected = _bias_counts(tiny_bert_classifier())  # Linear and LayerNorm biases, classifier trained in full
    model = inject(tiny_bert_classifier(), BitFit(modules_to_save=["classifier"]))
    wrapped = {f"{n}.bias" for n, m in checks.adapter_layers(model) if isinstance(m, BitFitLayer)}
    assert wrapped == set(expected)
    classifier = 64 * 3 + 3
    assert count_parameters(model)["trainable"] == sum(expected.values()) + classifier == 1475
    qwen = inject(tiny_qwen2(), BitFit())
    # q: 64, k and v: 2 key/value heads x 16 = 32 each; 2 layers
    assert count_parameters(qwen)["trainable"] == 2 * (64 + 32 + 32)


def test_chosen_biases_only() -> None:
    model = inject(tiny_bert_classifier(), BitFit(target_modules=["query", "intermediate.dense"]))
    assert sorted(n for n, _ in checks.adapter_layers(model)) == [
        f"bert.encoder.layer.{i}.{p}"
        for i in range(2)
        for p in ("attention.self.query", "intermediate.dense")
    ]
    assert count_parameters(model)["trainable"] == 2 * (64 + 128)
    regex = inject(
        tiny_bert_classifier(),
        BitFit(target_modules=r".*LayerNorm", exclude_modules=["embeddings.LayerNorm"]),
    )
    assert count_parameters(regex)["trainable"] == 2 * 2 * 64  # two LayerNorms per layer


class NormCNN(nn.Module):
    """A ResNet-style stem: bias-free convolutions followed by BatchNorm and GroupNorm (the only biases)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 8, kernel_size=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():  # running statistics away from their init, as after pre-training
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.pointwise(torch.relu(self.bn(self.conv(image)))))
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("build", "forward"),
    [
        (tiny_bert_classifier, checks.logits),
        (tiny_gpt2, checks.logits),  # transformers' Conv1D
        (MLPConv, lambda m: m(*MLPConv.example_inputs())),  # Conv1d, Conv2d (3x3 and 1x1), Linear
        (lambda: NormCNN().train(), lambda m: m(MLPConv.example_inputs()[0])),  # batch statistics
        (lambda: NormCNN().eval(), lambda m: m(MLPConv.example_inputs()[0])),  # running statistics
    ],
    ids=["bert", "gpt2_conv1d", "mlpconv", "batchnorm_train", "batchnorm_groupnorm_eval"],
)
def test_output_equals_the_base_model_with_the_trained_biases(build: Callable, forward: Callable) -> None:
    model = inject(build(), BitFit())
    checks.randomise(model)
    reference = copy.deepcopy(build())
    with torch.no_grad():
        for name, layer in checks.adapter_layers(model):
            reference.get_submodule(name).bias.copy_(layer.bitfit_bias["default"])
        expected = forward(reference)
        assert torch.equal(forward(model), expected)  # the same kernels, with the trained bias
        merge(model)  # merging copies the bias: bit for bit, both ways
        assert torch.equal(forward(model), expected)
        unmerge(model)
        for name, layer in checks.adapter_layers(model):
            assert torch.equal(layer.base_layer.bias, build().get_submodule(name).bias), name


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@case_param
def test_init_is_a_no_op(case: str) -> None:
    checks.assert_init_is_identity(*build_and_method(case))


@case_param
def test_training_changes_only_the_biases(case: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(case))
    assert all(".bitfit_bias." in k or ".modules_to_save." in k for k in changed)


@case_param
def test_save_load_roundtrip(case: str, tmp_path: Path) -> None:
    loaded = checks.assert_roundtrip(*build_and_method(case), tmp_path)
    assert all(".bitfit_bias." in k or "classifier" in k for k in adapter_state_dict(loaded))


@case_param
def test_merge_unmerge_and_merge_and_unload_match_unmerged(case: str) -> None:
    checks.assert_merge_matches(*build_and_method(case))


def test_non_finite_merge_is_refused() -> None:
    checks.assert_non_finite_merge_is_refused(tiny_bert_classifier, BitFit(), poison="bitfit_bias")


@case_param
def test_disable_gives_the_base_output(case: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(case), mergeable=True)


@case_param
def test_unload_restores_the_base_model_exactly(case: str) -> None:
    checks.assert_unload_restores_base(*build_and_method(case))


def test_two_named_adapters_in_one_model(tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(tiny_bert_classifier, BitFit, tmp_path)


def test_gradient_checkpointing_gives_grads_to_the_same_parameters() -> None:
    checks.assert_checkpointing_gives_same_grads(tiny_qwen2, BitFit)


@pytest.mark.parametrize("case", list(CASES))
def test_trains_through_the_callback_and_the_loss_goes_down(case: str) -> None:
    checks.assert_trains_through_callback(*build_and_method(case))


def test_a_layernorm_subclass_with_its_own_forward_runs_that_forward() -> None:
    """ConvNeXt's channels-first LayerNorm permutes before normalising: BitFit must run its forward, not F.layer_norm."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_labels=2, image_size=32)
    model = ConvNextForImageClassification(config).eval()
    reference = copy.deepcopy(model)
    pixels = torch.randn(2, 3, 32, 32)
    inject(model, BitFit())
    channels_first = [
        m
        for m in model.modules()
        if isinstance(m, BitFitLayer) and getattr(m.base_layer, "data_format", None) == "channels_first"
    ]
    assert channels_first  # the case under test is there
    torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
                reference.get_parameter(
                    name.replace("base_layer.", "").replace(".bitfit_bias.default", ".bias")
                ).add_(0.1)
    torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
    merge(model)
    torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
