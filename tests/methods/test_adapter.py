"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): insertion points, exact numerics, acceptance checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lightning_peft import inject
from lightning_peft.methods import Adapter
from lightning_peft.methods.adapter import Bottleneck, BottleneckLayer
from lightning_peft.testing import VOCAB, checks
from tests.tiny_models import (
    MLPConv,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_roberta_classifier,
)

STYLES = ["houlsby", "pfeiffer", "parallel"]
FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
}
family_param = pytest.mark.parametrize("family", list(FAMILIES))
style_param = pytest.mark.parametrize("style", STYLES)


def build_and_method(family: str, **kwargs: Any) -> tuple[Callable[[], nn.Module], Adapter]:
    build, extra = FAMILIES[family]
    return build, Adapter(**extra, **kwargs)


def bottleneck(h: torch.Tensor, f: Bottleneck) -> torch.Tensor:
    """relu(h W_down^T + b_down) W_up^T + b_up, written out."""
    return F.relu(h @ f.down.weight.T + f.down.bias) @ f.up.weight.T + f.up.bias


# --- where the bottlenecks go ---------------------------------------------------------------------------------
def _wrapped(model: nn.Module) -> dict[str, str]:
    return {
        n: layer.placement["default"]
        for n, layer in checks.adapter_layers(model)
        if isinstance(layer, BottleneckLayer)
    }


@pytest.mark.parametrize(
    ("build", "style", "expected"),
    [
        (tiny_llama, "houlsby", {"self_attn.o_proj": "sequential", "mlp.down_proj": "sequential"}),
        (tiny_llama, "pfeiffer", {"mlp.down_proj": "sequential"}),
        (tiny_llama, "parallel", {"mlp": "parallel"}),
        (tiny_qwen2, "houlsby", {"self_attn.o_proj": "sequential", "mlp.down_proj": "sequential"}),
        (tiny_mistral, "parallel", {"mlp": "parallel"}),
        (tiny_gpt2, "houlsby", {"attn.c_proj": "sequential", "mlp.c_proj": "sequential"}),
        (tiny_gpt2, "parallel", {"mlp": "parallel"}),
        (
            tiny_bert_classifier,
            "houlsby",
            {"attention.output.dense": "sequential", "output.dense": "sequential"},
        ),
        (tiny_bert_classifier, "pfeiffer", {"output.dense": "sequential"}),
        (tiny_bert_classifier, "parallel", {"output": "parallel_residual"}),
        (
            tiny_roberta_classifier,
            "houlsby",
            {"attention.output.dense": "sequential", "output.dense": "sequential"},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None),
)
def test_default_insertion_points_per_family(build: Callable, style: str, expected: dict[str, str]) -> None:
    model = build()
    base_out = checks.logits(model)
    inject(model, Adapter(style=style))
    blocks = {
        "llama": "model.layers",
        "qwen2": "model.layers",
        "mistral": "model.layers",
        "gpt2": "transformer.h",
    }
    prefix = blocks.get(model.config.model_type, f"{model.config.model_type}.encoder.layer")
    assert _wrapped(model) == {f"{prefix}.{i}.{site}": p for i in range(2) for site, p in expected.items()}
    assert torch.equal(checks.logits(model), base_out)  # up = 0: exactly the base model


def test_attention_sublayer_with_parallel_style_and_bottleneck_size() -> None:
    model = inject(
        tiny_llama(), Adapter(style="parallel", sublayers=["attention", "feed_forward"], reduction_factor=8)
    )
    assert set(_wrapped(model)) == {f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn", "mlp")}
    f = model.model.layers[0].self_attn.bottleneck["default"]
    assert (f.down.weight.shape, f.up.weight.shape) == ((8, 64), (64, 8))  # 64 / 8
    assert model.model.layers[0].self_attn.scaling["default"] == 4.0  # He et al.
    assert torch.count_nonzero(f.up.weight) == torch.count_nonzero(f.up.bias) == 0


# --- exact numerics -------------------------------------------------------------------------------------------
def test_sequential_adds_the_bottleneck_of_the_sublayer_output() -> None:
    model = inject(tiny_llama(), Adapter(style="houlsby", scaling=0.5))
    checks.randomise(model)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, 64)
    h = layer.base_layer(x)
    torch.testing.assert_close(
        layer(x), h + 0.5 * bottleneck(h, layer.bottleneck["default"]), atol=1e-6, rtol=0
    )
    gpt2 = inject(tiny_gpt2(), Adapter(style="pfeiffer"))
    checks.randomise(gpt2)
    c_proj = gpt2.transformer.h[1].mlp.c_proj  # transformers' Conv1D
    z = torch.randn(3, 256)
    h = c_proj.base_layer(z)
    torch.testing.assert_close(c_proj(z), h + bottleneck(h, c_proj.bottleneck["default"]), atol=1e-6, rtol=0)


def test_parallel_adds_the_scaled_bottleneck_of_the_sublayer_input() -> None:
    model = inject(tiny_llama(), Adapter(style="parallel"))
    checks.randomise(model)
    mlp = model.model.layers[1].mlp
    x = torch.randn(3, 64)
    expected = mlp.base_layer(x) + 4.0 * bottleneck(x, mlp.bottleneck["default"])
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)


def test_parallel_on_post_layernorm_blocks_joins_before_the_layernorm() -> None:
    model = inject(tiny_bert_classifier(), Adapter(style="parallel"))
    checks.randomise(model)
    output = model.bert.encoder.layer[0].output  # BertOutput: LN(dropout(dense(h)) + r)
    base = output.base_layer
    h, r = torch.randn(3, 128), torch.randn(3, 64)
    expected = base.LayerNorm(base.dense(h) + r + 4.0 * bottleneck(r, output.bottleneck["default"]))
    torch.testing.assert_close(output(h, r), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output(h, input_tensor=r), expected, atol=1e-6, rtol=0)  # by keyword too


def test_parallel_attention_reads_hidden_states_given_by_keyword_in_the_whole_model() -> None:
    method = Adapter(style="parallel", sublayers=["attention"], scaling=2.0)
    model = inject(tiny_llama(), method)
    checks.randomise(model)
    # The same computation with forward hooks on an unwrapped base model, using the adapted model's bottlenecks.
    reference = tiny_llama()
    for i, block in enumerate(reference.model.layers):
        f = model.model.layers[i].self_attn.bottleneck["default"]

        def hook(module, args, kwargs, out, f=f):
            return (out[0] + 2.0 * bottleneck(kwargs["hidden_states"], f), *out[1:])

        block.self_attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(model), checks.logits(reference), atol=1e-5, rtol=0)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(16, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.mix(x)
        return h + self.ff(h)


def test_any_model_with_user_given_module_names() -> None:
    model = nn.Sequential(_Block(), _Block())
    method = Adapter(
        attention_modules=["mix"], feed_forward_modules=["ff"], reduction_factor=4, non_linearity="gelu"
    )
    inject(model, method)
    assert _wrapped(model) == {
        "0.mix": "sequential",
        "0.ff": "sequential",
        "1.mix": "sequential",
        "1.ff": "sequential",
    }
    assert model[0].ff.bottleneck["default"].down.weight.shape == (4, 16)  # hidden size from ff's last Linear
    with pytest.raises(
        ValueError, match=r"no default attention insertion point for model_type=None.*attention_modules"
    ):
        inject(MLPConv(), Adapter())


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@family_param
@style_param
def test_init_is_a_no_op(family: str, style: str) -> None:
    checks.assert_init_is_identity(*build_and_method(family, style=style))


@family_param
def test_training_changes_only_adapter_parameters(family: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(family))
    assert all(".bottleneck.default." in k or ".modules_to_save." in k for k in changed)


@family_param
def test_save_load_roundtrip(family: str, tmp_path: Path) -> None:
    checks.assert_roundtrip(
        *build_and_method(family, style="parallel", sublayers=["attention", "feed_forward"]), tmp_path
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["style"], config["reduction_factor"]) == (
        "BOTTLENECK_ADAPTER",
        "parallel",
        16,
    )
    layer = "model.layers.0.mlp" if family == "llama" else "bert.encoder.layer.0.output"
    assert load_file(tmp_path / "adapter_model.safetensors")[
        f"base_model.model.{layer}.bottleneck.up.bias"
    ].shape == (64,)


@family_param
def test_merge_is_refused_clearly(family: str) -> None:
    checks.assert_not_mergeable(*build_and_method(family))


@family_param
@style_param
def test_disable_gives_the_base_output(family: str, style: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(family, style=style), mergeable=False)


@family_param
def test_unload_restores_the_base_model_exactly(family: str) -> None:
    checks.assert_unload_restores_base(*build_and_method(family, style="houlsby"))


@family_param
def test_two_named_adapters_in_one_model(family: str, tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(FAMILIES[family][0], lambda: Adapter(style="houlsby"), tmp_path)


@pytest.mark.parametrize("style", ["houlsby", "parallel"])
def test_gradient_checkpointing_gives_grads_to_the_same_parameters(style: str) -> None:
    checks.assert_checkpointing_gives_same_grads(
        tiny_llama, lambda: Adapter(style=style, sublayers=["attention", "feed_forward"])
    )


@family_param
@style_param
def test_trains_through_the_callback_and_the_loss_goes_down(family: str, style: str) -> None:
    checks.assert_trains_through_callback(*build_and_method(family, style=style))


def test_half_precision_base_gets_fp32_bottlenecks_and_stays_exact() -> None:
    model = tiny_llama().to(torch.bfloat16)
    base_out = checks.logits(model)
    inject(model, Adapter(style="houlsby"))
    assert {p.dtype for n, p in model.named_parameters() if "bottleneck" in n} == {torch.float32}
    assert torch.equal(checks.logits(model), base_out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "serial"}, "style='serial' must be one of"),
        ({"reduction_factor": 0}, "reduction_factor=0 must be > 0"),
        ({"non_linearity": "sine"}, "non_linearity='sine' is unknown"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"sublayers": ["ffn"]}, "use a non-empty list of 'attention', 'feed_forward'"),
        ({"sublayers": []}, "use a non-empty list"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Adapter(**kwargs)


def test_bottleneck_is_reusable_on_its_own() -> None:
    f = Bottleneck(32, reduction_factor=4, non_linearity="tanh")
    assert f(torch.randn(2, 5, 32)).abs().max() == 0  # zero up-projection
    nn.init.normal_(f.up.weight)
    h = torch.randn(2, 32)
    torch.testing.assert_close(f(h), torch.tanh(f.down(h)) @ f.up.weight.T + f.up.bias)
    inner = nn.Linear(32, 32)
    layer = BottleneckLayer(inner)
    layer.add_adapter("gated", f, "sequential", scaling=1.0)
    torch.testing.assert_close(layer(h), inner(h) + f(inner(h)))


def _tiny(config_class: type, model_class: type, **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    config = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra,
    )  # fmt: skip
    return model_class(config).eval()


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_default_layouts_of_llama_layout_decoders(family: str) -> None:
    """Qwen3 and Gemma have Llama's block: the bottleneck follows o_proj and down_proj."""
    import transformers

    if family == "qwen3":
        model = _tiny(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=8)
    else:
        model = _tiny(transformers.GemmaConfig, transformers.GemmaForCausalLM, head_dim=8)
    base_out = checks.logits(model)
    inject(model, Adapter(style="houlsby"))
    sites = ("self_attn.o_proj", "mlp.down_proj")
    assert set(_wrapped(model)) == {f"model.layers.{i}.{site}" for i in range(2) for site in sites}
    assert torch.equal(checks.logits(model), base_out)  # up = 0: exactly the base model


def test_a_parallel_bottleneck_over_a_widening_module_is_refused_at_injection() -> None:
    from tests.tiny_models import tiny_opt

    model = tiny_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"parallel bottleneck beside .*fc1 .*the widths must be equal"):
        inject(model, Adapter(style="parallel", feed_forward_modules=["fc1"]))
    assert not _wrapped(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_blocks_get_bottlenecks_of_the_hidden_size(family: str) -> None:
    """The routed block is wrapped whole: Mixtral's holds no linear layer (experts are 3-D tensors), Qwen2-MoE's
    ends in the 1-wide ``shared_expert_gate``; both bottlenecks must be hidden-wide and change the output."""
    import transformers

    if family == "mixtral":
        model = _tiny(transformers.MixtralConfig, transformers.MixtralForCausalLM, num_local_experts=4)
    else:
        model = _tiny(
            transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        )  # fmt: skip
    base_out = checks.logits(model)
    inject(model, Adapter(style="houlsby", reduction_factor=4))
    wrapped = _wrapped(model)
    assert set(wrapped) == {
        f"model.layers.{i}.{site}" for i in range(2) for site in ("self_attn.o_proj", "mlp")
    }
    for name in wrapped:
        bottleneck = model.get_submodule(name).bottleneck["default"]
        assert (bottleneck.down.in_features, bottleneck.down.out_features, bottleneck.up.out_features) == (
            32,
            8,
            32,
        )
    assert torch.equal(checks.logits(model), base_out)
    checks.randomise(model, seed=1, scale=0.1)
    assert not torch.allclose(checks.logits(model), base_out, atol=1e-3)
