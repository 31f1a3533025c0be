"""LoRA(target_parameters=[...]): one low-rank update per expert on the fused 3-D expert weights of MoE blocks (and on
plain 2-D parameters), as peft's ``target_parameters``: the numerics by hand, peft's file layout and outputs both
ways, merge/unmerge, training, and the refusals at injection."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    adapter_state_dict,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    mixed_batch,
    save_adapter,
    unload,
    unmerge,
)
from lightning_peft.core.injection import adapter_state_keys, set_adapter
from lightning_peft.methods import IA3, LoRA
from lightning_peft.methods.lora.param_wrapper import LoraParamWrapper
from lightning_peft.methods.lora.weighted import add_weighted_adapter
from lightning_peft.testing.checks import randomise
from tests.architecture_matrix import FAMILIES
from tests.tiny_models import seeded, tiny_llama, token_batch

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = token_batch(batch=2, length=7)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moe(family: str = "Mixtral") -> nn.Module:
    return FAMILIES[family].build()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- numerics -------------------------------------------------------------------------------------------------------
def test_each_expert_gets_its_own_update_in_peft_layout() -> None:
    """Expert e's weight as its forward reads it is W[e] + s * B[:, e::E] @ A[e*r:(e+1)*r] (peft's layout)."""
    model = inject(
        moe(), LoRA(r=2, alpha=6, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    )
    outer = model.model.layers[0].mlp.experts  # down_proj (registered second) outside, gate_up_proj inside
    inner = outer.base_layer
    assert isinstance(outer, LoraParamWrapper) and isinstance(inner, LoraParamWrapper)
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    experts = inner.base_layer
    E, r, s = 4, 2, 3.0
    for wrapper, W in ((inner, experts.gate_up_proj), (outer, experts.down_proj)):
        A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        assert A.shape == (r * E, W.shape[2]) and B.shape == (W.shape[1], r * E)  # (r*E, in), (out, r*E)
        delta = wrapper.delta_weight("default")
        for e in range(E):
            by_hand = s * B[:, e::E] @ A[e * r : (e + 1) * r]  # (out, r) @ (r, in)
            torch.testing.assert_close(delta[e], by_hand, atol=1e-6, rtol=0)
    # The experts' forward sees exactly those weights: the wrapped call equals the module with W + delta put in.
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 1]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = outer(hidden, index, weights)
        by_hand = torch.zeros_like(hidden)
        gate_up = experts.gate_up_proj + inner.delta_weight("default")
        down = experts.down_proj + outer.delta_weight("default")
        for row in range(5):
            for k in range(2):
                e = int(index[row, k])
                gate, up = F.linear(hidden[row], gate_up[e]).chunk(2, dim=-1)
                by_hand[row] += weights[row, k] * F.linear(F.silu(gate) * up, down[e])
    assert max_diff(got, by_hand) < 1e-5
    assert experts.gate_up_proj is experts._parameters["gate_up_proj"]  # the base parameter is left in place


class TransposedExperts(nn.Module):
    """Experts stored (E, in, out), flagged as transformers flags them (``is_transposed``)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 8, 12))  # (E, in, out)
        self.down = nn.Parameter(torch.randn(3, 12, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, T, 8): expert e on its own tokens
        return torch.bmm(torch.relu(torch.bmm(x, self.up)), self.down)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = TransposedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x)


def test_transposed_experts_equal_peft_both_ways(tmp_path: Path) -> None:
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    base = Block()
    method = LoRA(r=2, alpha=4, target_modules=[], target_parameters=["experts.up", "experts.down"])
    ours = inject(_copy(base), method)
    randomise(ours, scale=0.3)
    wrapper = ours.experts.base_layer  # "up", registered first, is inside
    assert wrapper.parameter_name == "up" and wrapper.delta_weight("default").shape == (3, 8, 12)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_copy(base), tmp_path / "ours")
    with torch.no_grad():
        diff = max_diff(theirs(x), ours(x))
    assert diff < 1e-5, diff
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.up", "experts.down"]
    )
    theirs = peft.get_peft_model(_copy(base), config)
    randomise(theirs, seed=5, scale=0.3)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(_copy(base), tmp_path / "peft")
    with torch.no_grad():
        diff = max_diff(loaded(x), theirs(x))
    assert diff < 1e-5, diff


def _copy(block: Block) -> Block:
    new = Block()
    new.load_state_dict(block.state_dict())
    return new


# --- peft parity on the tiny MoE decoders ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["Mixtral", "Qwen2-MoE"])
def test_peft_parity_both_ways(family: str, tmp_path: Path) -> None:
    """Our directory in peft and peft's in ours: logits within 1e-5 (measured ~1e-7), the same files."""
    # Attention beside the experts: peft 0.21.0 rewrites target_modules named like the old per-expert Linears
    # (Qwen2-MoE's shared_expert.down_proj too) into target_parameters, a quirk of its checkpoint conversion.
    kwargs = dict(
        r=2,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={
            "layers.1.mlp.experts.down_proj": 3
        },  # matched against the parameter's name, as in peft
        alpha_pattern={"gate_up_proj": 5},
    )
    ours = inject(moe(family), LoRA(alpha=4, target_parameters=EXPERTS, use_rslora=True, **kwargs))
    randomise(ours, scale=0.1)
    expected = logits(ours)
    assert max_diff(expected, logits(moe(family))) > 1e-2  # the adapter changes the outputs
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    )
    theirs = peft.PeftModel.from_pretrained(moe(family), tmp_path / "ours").eval()
    diff = max_diff(logits(theirs), expected)
    assert diff < 1e-5, f"ours -> peft: max |diff| {diff}"

    peft_config = peft.LoraConfig(lora_alpha=4, use_rslora=True, target_parameters=EXPERTS, **kwargs)
    theirs = peft.get_peft_model(moe(family), peft_config)
    randomise(theirs, seed=5, scale=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    peft_keys = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    our_keys = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    assert our_keys == peft_keys and len(our_keys) == 8 + 2 * 2 * len(kwargs["target_modules"])
    assert peft_keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (2 * 4, 32)
    assert peft_keys["base_model.model.model.layers.1.mlp.experts.lora_B.weight"] == (32, 3 * 4)
    loaded = load_adapter(moe(family), tmp_path / "peft")
    diff = max_diff(logits(loaded), logits(theirs))
    assert diff < 1e-5, f"peft -> ours: max |diff| {diff}"


_SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, head_dim=8, num_experts_per_tok=2,
)  # fmt: skip
MORE_FAMILIES = {
    "Qwen3-MoE": (
        tf.Qwen3MoeForCausalLM,
        tf.Qwen3MoeConfig,
        dict(_SMALL, moe_intermediate_size=16, num_experts=4, decoder_sparse_step=1),
    ),
    # (E, in, out) experts with biases, flagged is_transposed, gate and up interleaved
    "GPT-OSS": (
        tf.GptOssForCausalLM,
        tf.GptOssConfig,
        dict(_SMALL, num_local_experts=4, layer_types=["full_attention"] * 2),
    ),
}


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_moe_families_equal_peft_both_ways(family: str, tmp_path: Path) -> None:
    model_class, config_class, config = MORE_FAMILIES[family]

    def build() -> nn.Module:
        return seeded(model_class, config_class, 0, **config)

    ours = inject(build(), LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    assert ours.model.layers[0].mlp.experts.transposed == (family == "GPT-OSS")
    randomise(ours, scale=0.1)
    expected = logits(ours)
    assert max_diff(expected, logits(build())) > 1e-2
    save_adapter(ours, tmp_path)
    diff = max_diff(logits(peft.PeftModel.from_pretrained(build(), tmp_path).eval()), expected)
    assert diff < 1e-5, f"ours -> peft: max |diff| {diff}"
    peft_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS)
    theirs = peft.get_peft_model(build(), peft_config)
    randomise(theirs, seed=5, scale=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    diff = max_diff(logits(load_adapter(build(), tmp_path / "peft")), logits(theirs))
    assert diff < 1e-5, f"peft -> ours: max |diff| {diff}"


def test_two_d_parameter_equals_peft_and_lora_on_the_module(tmp_path: Path) -> None:
    """A 2-D (out, in) weight is one expert: the same outputs as peft, and as LoRA on its Linear with the same A, B."""
    ours = inject(
        tiny_llama(), LoRA(r=4, alpha=8, target_modules=[], target_parameters=["self_attn.v_proj.weight"])
    )
    randomise(ours, scale=0.1)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert max_diff(logits(theirs), logits(ours)) < 1e-5
    as_module = inject(tiny_llama(), LoRA(r=4, alpha=8, target_modules=["v_proj"]))
    tensors = {k.replace(".base_layer", ""): v for k, v in adapter_state_dict(ours).items()}
    assert as_module.load_state_dict(tensors, strict=False).unexpected_keys == []
    assert max_diff(logits(as_module), logits(ours)) < 1e-5


# --- training, merging, adapters ------------------------------------------------------------------------------------
def test_init_is_identity_and_only_the_factors_train() -> None:
    model = moe()
    base = logits(model)
    inject(model, LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    assert torch.equal(logits(model), base)
    keys = set(adapter_state_keys(model))
    assert len(keys) == 8 and all(".experts." in k and ".lora_" in k for k in keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B is zero at init: A moves from the second step on
        optimizer.zero_grad()
        model(IDS).logits.square().mean().backward()
        optimizer.step()
    assert not [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == keys


def test_merge_unmerge_and_merge_and_unload() -> None:
    model = inject(moe("Qwen2-MoE"), LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    randomise(model, scale=0.1)
    expected = logits(model)
    experts = model.model.layers[0].mlp.experts.base_layer.base_layer
    base_weight = experts.gate_up_proj.detach().clone()
    merge(model)
    assert max_diff(experts.gate_up_proj, base_weight) > 1e-3
    assert max_diff(logits(model), expected) < 1e-5
    unmerge(model)
    assert max_diff(experts.gate_up_proj, base_weight) < 1e-6
    assert max_diff(logits(model), expected) < 1e-6
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraParamWrapper) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    assert max_diff(logits(plain), expected) < 1e-5


def test_second_adapter_shares_the_wrappers() -> None:
    model = moe()
    inject(model, LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False))
    first = logits(model)
    inject(
        model, LoRA(r=3, alpha=3, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False), "b"
    )
    wrapper = model.model.layers[1].mlp.experts
    assert sorted(wrapper.lora_A) == ["b", "default"] and not isinstance(
        wrapper.base_layer.base_layer, LoraParamWrapper
    )
    second = logits(model)
    assert max_diff(first, second) > 1e-3
    set_adapter(model, "default")
    assert torch.equal(logits(model), first)
    with pytest.raises(ValueError, match="must target the same parameters"):
        inject(model, LoRA(target_modules=[], target_parameters=["experts.down_proj"]), "c")
    set_adapter(model, "b")
    assert torch.equal(logits(model), second)
    with (
        pytest.raises(ValueError, match="cannot pick an adapter per row"),
        mixed_batch(model, ["b", "default"]),
    ):
        pass


def test_half_precision_base_keeps_its_dtype_with_float32_factors() -> None:
    model = inject(moe().to(torch.bfloat16), LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    wrapper = model.model.layers[0].mlp.experts
    assert wrapper.lora_A["default"].weight.dtype == torch.float32
    randomise(model, scale=0.1)
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert wrapper.base_layer.base_layer.down_proj.dtype == torch.bfloat16


# --- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropout": 0.1}, "dropout cannot be applied"),
        ({"use_dora": True}, "DoRA is not supported on parameters"),
        ({"init_lora_weights": "pissa"}, "parameters support True, False and 'gaussian'"),
        ({"target_parameters": "experts.*"}, "give a list of parameter names"),
    ],
)
def test_unsupported_options_are_refused_at_construction(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRA(**{"target_parameters": EXPERTS, **options})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target_parameters": ["experts.gate_proj"]}, r"matched no parameter.*experts\.gate_up_proj"),
        ({"target_parameters": ["input_layernorm.weight"]}, r"shape \(32,\): only 2-D .* and 3-D"),
        (
            {"target_modules": ["q_proj"], "target_parameters": ["self_attn.q_proj.weight"]},
            "target_modules selects it too",
        ),
    ],
)
def test_bad_targets_are_refused_at_injection_leaving_the_model_unchanged(options: dict, match: str) -> None:
    model = moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        inject(model, LoRA(**{"target_modules": ["v_proj"], **options}))
    assert not hasattr(model, "_lightning_peft")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_of_an_already_adapted_module_is_refused() -> None:
    model = inject(moe(), LoRA(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="it is wrapped by LoraLinear"):
        inject(model, LoRA(target_modules=[], target_parameters=["q_proj.weight"]), "b")
    assert sorted(model._lightning_peft.methods) == ["default"]


def test_only_parameters_round_trip_through_peft_config(tmp_path: Path) -> None:
    """target_modules=[]: the config says so, and peft adapts the experts only, as we do."""
    model = inject(moe(), LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    randomise(model, scale=0.1)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and len(config["target_parameters"]) == 4
    theirs = peft.PeftModel.from_pretrained(moe(), tmp_path).eval()
    assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in theirs.modules())
    assert max_diff(logits(theirs), logits(model)) < 1e-5
    loaded = load_adapter(moe(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_weighted_combination_of_parameter_adapters_is_refused() -> None:
    model = inject(moe(), LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    inject(model, LoRA(r=2, target_modules=[], target_parameters=EXPERTS), "b")
    with pytest.raises(ValueError, match="adapts parameters directly"):
        add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "mix")
    assert sorted(model._lightning_peft.methods) == ["b", "default"]


def test_the_adapted_weight_keeps_only_the_factors_for_backward() -> None:
    """W + s * lhs @ rhs is one baddbmm: autograd saves the two (E, ., r) factors, no (E, out, in) delta or W."""
    model = inject(moe(), LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    wrapper = model.model.layers[0].mlp.experts.base_layer  # gate_up_proj (4, 128, 32)
    saved: list[tuple[int, ...]] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        adapted = wrapper.adapted_weight("default", wrapper.parameter())
    assert adapted.shape == (4, 128, 32) and adapted.requires_grad
    assert sorted(saved) == [(4, 2, 32), (4, 128, 2)]


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_reads_the_adapted_weight(implementation: str) -> None:
    """transformers runs the experts through one of several kernels; each sees W + delta (equal to merged)."""
    model = inject(moe(), LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    randomise(model, scale=0.1)
    merged = merge_and_unload(_injected_copy(model))
    model.set_experts_implementation(implementation)
    merged.set_experts_implementation(implementation)
    diff = max_diff(logits(model), logits(merged))
    assert diff < 1e-5, diff
    assert max_diff(logits(model), logits(moe())) > 1e-2


def _injected_copy(model: nn.Module) -> nn.Module:
    copy = inject(moe(), LoRA(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    copy.load_state_dict(adapter_state_dict(model), strict=False)
    return copy


def test_disable_and_unload_give_the_base_model_back() -> None:
    base = moe()
    expected = logits(base)
    model = inject(base, LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    randomise(model, scale=0.1)
    with disable_adapters(model):
        assert torch.equal(logits(model), expected)
    experts = model.model.layers[0].mlp.experts.base_layer.base_layer
    plain = unload(model)
    assert plain.model.layers[0].mlp.experts is experts
    assert torch.equal(logits(plain), expected)
    assert all(p.requires_grad for p in plain.parameters())


def test_a_file_claiming_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    model = inject(moe(), LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 10**9}))  # 4e9 rows per lora_A
    fresh = moe()
    with pytest.raises(ValueError, match=r"wrong shape .*\(8, 64\) vs \(4000000000, 64\)"):
        load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "_lightning_peft")
    assert not any(isinstance(m, LoraParamWrapper) for m in fresh.modules())


def test_another_methods_file_that_sets_target_parameters_is_refused(tmp_path: Path) -> None:
    """Only LoRA reads target_parameters: an IA3 file setting it (a feature we lack there) is refused, not ignored."""
    model = inject(moe(), IA3(target_modules=["k_proj", "v_proj", "o_proj"], feedforward_modules=["o_proj"]))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": EXPERTS}))
    with pytest.raises(
        ValueError, match=r"sets \['target_parameters'\].*peft features lightning-peft does not"
    ):
        load_adapter(moe(), tmp_path)


def test_a_partitioned_parameter_is_named_at_forward() -> None:
    """DeepSpeed ZeRO-3 empties a parameter's data outside its own module's forward: a clear error, not a matmul one."""
    model = inject(moe(), LoRA(r=2, target_modules=[], target_parameters=EXPERTS))
    experts = model.model.layers[0].mlp.experts.base_layer.base_layer
    experts.down_proj.data = torch.empty(0)  # what ZeRO-3's partitioning leaves on the module
    with pytest.raises(
        RuntimeError, match=r"down_proj is \(0,\) at forward but was \(4, 32, 64\) at injection"
    ):
        logits(model)
