"""add_weighted_adapter's combination types: parity with peft 0.21 on adapters it loads from our files, the merge
rules on hand-made tensors, DARE's reproducibility, and the refusals.

(The cat/linear algebra and the older refusals are tested in tests/test_multi_adapter.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import add_weighted_adapter, inject, save_adapter, set_adapter
from lightning_peft.core.injection import injection_record
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.weighted import _merge
from tests.tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

SEED = (
    7  # DARE's masks: our seed=SEED, and peft's global RNG seeded with SEED once it has built the new adapter
)
LLAMA_TARGETS = [
    "q_proj",
    "v_proj",
    "o_proj",
]  # v_proj is 64 -> 32 (grouped-query attention): a non-square update


def _adapters(build: Callable[[], nn.Module], targets: list[str]) -> nn.Module:
    """Three rank-4 LoRAs (different alphas, one rsLoRA) and ``d`` with ranks 2 and 6 (for cat / the SVD types)."""
    model = build()
    for i, (name, options) in enumerate(
        {
            "a": dict(r=4, alpha=8),
            "b": dict(r=4, alpha=4),
            "c": dict(r=4, alpha=16, use_rslora=True),
            "d": dict(r=2, alpha=2, rank_pattern={targets[-1]: 6}, alpha_pattern={targets[-1]: 3}),
        }.items()
    ):
        torch.manual_seed(i + 1)
        inject(model, LoRA(target_modules=targets, init_lora_weights=False, **options), name)
    return model


def _pair(tmp: Path, build: Callable[[], nn.Module], targets: list[str]) -> tuple[nn.Module, nn.Module]:
    """Our model with adapters a-d, and peft's reading the same adapters from the directories we write."""
    ours = _adapters(build, targets)
    for name in "abcd":
        save_adapter(ours, tmp / name, adapter_name=name)
    reference = peft.PeftModel.from_pretrained(build(), tmp / "a", adapter_name="a")
    for name in "bcd":
        reference.load_adapter(tmp / name, adapter_name=name)
    # peft draws the new adapter's random init from the global RNG before DARE's masks: seed right after it
    inject_adapter = reference.base_model.inject_adapter

    def seeded_inject(*args, **kwargs):
        inject_adapter(*args, **kwargs)
        torch.manual_seed(SEED)

    reference.base_model.inject_adapter = seeded_inject
    return ours, reference


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    return _pair(tmp_path_factory.mktemp("llama"), tiny_llama, LLAMA_TARGETS)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    return _pair(tmp_path_factory.mktemp("gpt2"), tiny_gpt2, ["c_attn", "c_proj"])  # Conv1D: fan_in_fan_out


THREE, WEIGHTS = ["a", "b", "c"], [0.7, -0.4, 1.2]
# (model, combination_type, adapters, weights, options); every type of peft 0.21, some with non-default options
CASES = [
    ("llama", "cat", ["a", "b", "d"], WEIGHTS, {}),
    ("llama", "linear", THREE, WEIGHTS, {}),
    ("llama", "svd", THREE, WEIGHTS, {}),
    ("llama", "svd", ["a", "d"], [0.7, -0.4], {}),  # unequal ranks: rank 6, the largest
    ("llama", "svd", THREE, WEIGHTS, dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    ("llama", "ties", THREE, WEIGHTS, dict(density=0.5)),
    ("llama", "ties", THREE, WEIGHTS, dict(density=0.3, majority_sign_method="frequency")),
    ("llama", "ties_svd", ["a", "b", "d"], WEIGHTS, dict(density=0.5, svd_rank=5)),
    ("llama", "dare_linear", THREE, WEIGHTS, dict(density=0.6, seed=SEED)),
    ("llama", "dare_ties", THREE, WEIGHTS, dict(density=0.5, majority_sign_method="frequency", seed=SEED)),
    ("llama", "dare_linear_svd", ["a", "b", "d"], WEIGHTS, dict(density=0.7, seed=SEED)),
    ("llama", "dare_ties_svd", THREE, WEIGHTS, dict(density=0.5, seed=SEED)),
    ("llama", "magnitude_prune", THREE, WEIGHTS, dict(density=0.4)),
    ("llama", "magnitude_prune_svd", THREE, WEIGHTS, dict(density=0.7, svd_clamp=0.95)),
    ("gpt2", "svd", ["a", "b"], [0.5, 1.5], {}),
    ("gpt2", "ties", ["a", "b"], [0.5, 1.5], dict(density=0.5)),
    ("gpt2", "dare_ties_svd", THREE, WEIGHTS, dict(density=0.5, seed=SEED)),  # masks drawn in Conv1D's layout
    ("gpt2", "dare_linear", ["a", "b"], [0.5, 1.5], dict(density=0.5, seed=SEED)),
]


@pytest.mark.parametrize(("family", "kind", "adapters", "weights", "options"), CASES)
def test_combination_matches_peft(
    request: pytest.FixtureRequest,
    family: str,
    kind: str,
    adapters: list[str],
    weights: list[float],
    options: dict,
) -> None:
    ours, reference = request.getfixturevalue(f"{family}_pair")
    name = f"{kind}_{request.node.callspec.id.split('-')[-1]}".replace(".", "_")  # a fresh adapter per case
    add_weighted_adapter(ours, adapters, weights, name, combination_type=kind, **options)
    peft_options = {k: v for k, v in options.items() if k != "seed"}
    reference.add_weighted_adapter(adapters, weights, name, combination_type=kind, **peft_options)
    compared = 0
    for module_name, theirs in reference.base_model.model.named_modules():
        if name in getattr(theirs, "lora_A", {}):
            mine = ours.get_submodule(module_name)
            # cat: peft pads every layer to the sum of the adapters' largest ranks, we use each layer's own sum
            assert mine.r[name] == theirs.r[name] or (kind == "cat" and mine.r[name] < theirs.r[name])
            # Measured: identical (0.0) for every case on CPU fp32; the tolerance allows another BLAS
            torch.testing.assert_close(
                mine.delta_weight(name), theirs.get_delta_weight(name), atol=1e-6, rtol=0
            )
            compared += 1
    assert compared == 6  # both layers' q, v, o (Llama) or c_attn, attn.c_proj, mlp.c_proj (GPT-2)
    tokens = token_batch(batch=2)
    set_adapter(ours, name)
    reference.set_adapter(name)
    with torch.no_grad():
        # Measured: <= 1.9e-6 (the forwards sum in different orders)
        torch.testing.assert_close(ours(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=0)


# --- the merge rules on hand-made tensors -------------------------------------------------------------------
# Trimmed to density 0.5 (the two largest magnitudes): [4, 0, 0, -3], [0, -2.5, 0, 5], [1, 0, 0, -1.5]
TASKS = [
    torch.tensor([4.0, -1.0, 0.5, -3.0]),
    torch.tensor([-2.0, -2.5, 1.0, 5.0]),
    torch.tensor([1.0, 0.2, -0.1, -1.5]),
]
TASK_WEIGHTS = [1.0, 2.0, 0.5]


@pytest.mark.parametrize(
    ("kind", "sign_method", "expected"),
    [
        # votes (sum of trimmed) [5, -2.5, 0, 0.5] -> signs [+, -, +, +]; entry 3: only task 2 agrees -> 2 * 5
        ("ties", "total", [(4 + 0.5 * 1) / 2, 2 * -2.5, 0.0, 2 * 5.0]),
        # sign counts [2, -1, 0, -1] -> [+, -, +, -]; entry 3: tasks 1 and 3 agree -> mean(-3, 0.5 * -1.5)
        ("ties", "frequency", [(4 + 0.5 * 1) / 2, 2 * -2.5, 0.0, (-3 + 0.5 * -1.5) / 2]),
        ("magnitude_prune", "total", [4 + 0.5 * 1, 2 * -2.5, 0.0, -3 + 2 * 5 + 0.5 * -1.5]),
        (
            "ties_svd",
            "total",
            [(4 + 0.5 * 1) / 2, 2 * -2.5, 0.0, 2 * 5.0],
        ),  # the suffix only changes what follows
    ],
)
def test_trim_elect_and_disjoint_merge_by_hand(kind: str, sign_method: str, expected: list[float]) -> None:
    merged = _merge(kind, TASKS, TASK_WEIGHTS, 0.5, sign_method, lambda device: None)
    torch.testing.assert_close(merged, torch.tensor(expected), atol=1e-6, rtol=0)


def test_dare_drops_with_the_seeded_mask_and_rescales() -> None:
    tensor = torch.arange(1.0, 201.0)
    merged = _merge(
        "dare_linear", [tensor], [2.0], 0.25, "total", lambda device: torch.Generator().manual_seed(3)
    )
    keep = torch.bernoulli(torch.full_like(tensor, 0.25), generator=torch.Generator().manual_seed(3))
    assert 0 < keep.sum() < 200
    torch.testing.assert_close(merged, 2.0 * tensor * keep / 0.25, atol=1e-5, rtol=0)
    # density 1 drops nothing
    assert torch.equal(_merge("dare_linear", [tensor], [2.0], 1.0, "total", lambda d: None), 2.0 * tensor)


# --- behaviour of our own ------------------------------------------------------------------------------------
def _q(model: nn.Module) -> nn.Module:
    return model.model.layers[0].self_attn.q_proj


def test_dare_is_reproducible_by_seed_generator_or_global_rng() -> None:
    model = _adapters(tiny_llama, LLAMA_TARGETS)
    kwargs = dict(combination_type="dare_ties", density=0.5)
    add_weighted_adapter(model, THREE, WEIGHTS, "s1", seed=11, **kwargs)
    add_weighted_adapter(model, THREE, WEIGHTS, "s1_again", seed=11, **kwargs)
    add_weighted_adapter(model, THREE, WEIGHTS, "s2", seed=12, **kwargs)
    add_weighted_adapter(model, THREE, WEIGHTS, "gen", generator=torch.Generator().manual_seed(11), **kwargs)
    torch.manual_seed(11)
    add_weighted_adapter(model, THREE, WEIGHTS, "global", **kwargs)
    q = _q(model)
    for same in ("s1_again", "gen", "global"):
        assert torch.equal(q.delta_weight(same), q.delta_weight("s1")), same
    assert not torch.allclose(q.delta_weight("s2"), q.delta_weight("s1"))
    # A non-random combination draws nothing from the caller's RNG (the new adapter's init included)
    state = torch.random.get_rng_state()
    add_weighted_adapter(model, THREE, WEIGHTS, "svd", combination_type="svd")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_svd_is_exact_at_full_rank_and_caps_the_rank_per_layer() -> None:
    model = _adapters(tiny_llama, LLAMA_TARGETS)
    # rank(0.7 a - 0.4 d) <= 4 + 6 = 10 on o_proj, 4 + 2 on q and v: svd_rank=10 is lossless everywhere
    add_weighted_adapter(model, ["a", "d"], [0.7, -0.4], "full", combination_type="svd", svd_rank=10)
    add_weighted_adapter(model, ["a", "d"], [0.7, -0.4], "huge", combination_type="svd", svd_rank=100)
    attn = model.model.layers[1].self_attn
    for layer in (attn.q_proj, attn.v_proj, attn.o_proj):
        expected = 0.7 * layer.delta_weight("a") - 0.4 * layer.delta_weight("d")
        torch.testing.assert_close(layer.delta_weight("full"), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight("huge"), expected, atol=1e-5, rtol=0)
        assert layer.scaling["full"] == layer.scaling["huge"] == 1.0
    assert (attn.q_proj.r["huge"], attn.v_proj.r["huge"]) == (64, 32)  # min(out, in): 64 -> 64 and 64 -> 32
    # One adapter: the requested combination (peft would fall back to "linear"), here its best rank-2 approximation
    add_weighted_adapter(model, ["a"], [2.0], "a2", combination_type="svd", svd_rank=2)
    q = attn.q_proj
    U, S, Vh = torch.linalg.svd(2.0 * q.delta_weight("a"))
    torch.testing.assert_close(q.delta_weight("a2"), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("adapters", "kwargs", "match"),
    [
        (THREE, dict(combination_type="ties"), r"needs density in \(0, 1\]"),
        (THREE, dict(combination_type="dare_linear", density=0.0), r"needs density in \(0, 1\]"),
        (THREE, dict(combination_type="magnitude_prune_svd", density=1.5), r"needs density in \(0, 1\]"),
        (THREE, dict(combination_type="svd", density=0.5), r"does not use \['density'\]"),
        (THREE, dict(combination_type="ties", density=0.5, svd_rank=2, seed=1), r"\['svd_rank', 'seed'\]"),
        (
            THREE,
            dict(combination_type="magnitude_prune", density=0.5, majority_sign_method="frequency"),
            "majority_sign_method",
        ),
        (
            THREE,
            dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
            "'total' or 'frequency'",
        ),
        (THREE, dict(combination_type="svd", svd_rank=0), "positive int"),
        (THREE, dict(combination_type="svd", svd_clamp=1.5), r"quantile in \(0, 1\]"),
        (THREE, dict(combination_type="svd", svd_driver="gesvdj"), "cuSOLVER driver"),
        (THREE, dict(combination_type="svd", svd_driver="lapack"), "gesvd"),
        (
            THREE,
            dict(combination_type="dare_ties", density=0.5, seed=1, generator=torch.Generator()),
            "not both",
        ),
        (["a", "d"], dict(combination_type="ties", density=0.5), "use 'cat' or an SVD type"),
        (["a", "d"], dict(combination_type="dare_linear", density=0.5), "needs equal ranks"),
        (THREE, dict(combination_type="ties_lora"), "combination_type='ties_lora'"),
    ],
)
def test_refusals_name_the_problem(adapters: list[str], kwargs: dict, match: str) -> None:
    model = _adapters(tiny_llama, LLAMA_TARGETS)
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, adapters, [1.0] * len(adapters), "x", **kwargs)
    assert "x" not in injection_record(model).methods  # refused before anything changed


def test_refuses_non_finite_weights_and_non_linear_layers() -> None:
    model = _adapters(tiny_llama, LLAMA_TARGETS)
    with pytest.raises(ValueError, match="must be finite"):
        add_weighted_adapter(model, ["a", "b"], [1.0, float("nan")], "x", combination_type="svd")
    inject(model, LoRA(target_modules=["embed_tokens"], init_lora_weights=False), "e1")
    inject(model, LoRA(target_modules=["embed_tokens"], init_lora_weights=False), "e2")
    with pytest.raises(ValueError, match=r"Embedding.*Linear/Conv1D"):
        add_weighted_adapter(model, ["e1", "e2"], [1.0, 1.0], "x", combination_type="svd")
    assert "x" not in injection_record(model).methods
