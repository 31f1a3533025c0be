"""Which modules ``target_modules`` selects (the same rules as Hugging Face peft), and the errors when none fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import inject
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.targeting import find_targets, name_matches, output_head_names, pattern_value
from lightning_peft.methods import LoRA, ModulesToSave
from lightning_peft.methods.lora.layers import LoraLayer
from tests.tiny_models import MLPConv, tiny_bert_classifier, tiny_gpt2, tiny_llama

LLAMA_LINEAR = (nn.Linear,)


def _names(model: nn.Module, targets, **kwargs) -> list[str]:
    kwargs.setdefault("supported", (nn.Linear, Conv1D, nn.Embedding))
    kwargs.setdefault("linear_types", (nn.Linear, Conv1D))
    return [name for name, _ in find_targets(model, targets, **kwargs)]


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class TwoLevels(nn.Module):
    """A ``q_proj`` at top level and another one nested, to tell full-name regexes from suffix lists."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.q_proj = nn.Linear(4, 4)
        self.block.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix match is on whole name segments
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["attn.q_proj"], False),
        ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),
        ("q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # a string is a regex on the *full* name
        ("q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", r".*layers\.1\..*", False),
        ("model.layers.0.self_attn.q_proj", r".*\.(q|v)_proj", True),
        ("model.layers.0.self_attn.k_proj", r".*\.(q|v)_proj", False),
    ],
)
def test_name_matching(name: str, spec, expected: bool) -> None:
    assert name_matches(name, spec) is expected


def test_list_entries_match_whole_segments_on_a_real_model() -> None:
    model = tiny_llama()
    assert _names(model, ["self_attn.q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert _names(model, ["layers.1.self_attn.q_proj", "down_proj"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(ValueError, match="matched no module"):
        _names(model, ["proj"])  # must not select q_proj, k_proj, ...


def test_regex_is_a_full_match() -> None:
    model = TwoLevels()
    assert _names(model, "q_proj") == ["q_proj"]  # only the top-level module named exactly q_proj
    assert _names(model, r".*\.q_proj") == ["block.q_proj"]
    assert _names(model, r".*q_proj") == ["q_proj", "block.q_proj"]
    assert _names(model, ["q_proj"]) == ["q_proj", "block.q_proj"]
    assert _names(tiny_llama(), r".*\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_exclude_modules() -> None:
    model = tiny_llama()
    assert _names(model, ["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert _names(model, "all-linear", exclude_modules=r".*\.mlp\..*") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"
    ]
    with pytest.raises(ValueError, match="matched no module"):
        _names(model, ["q_proj"], exclude_modules=["q_proj"])


def test_all_linear_on_llama_excludes_lm_head() -> None:
    model = tiny_llama()
    assert output_head_names(model) == {"lm_head"}
    expected = [
        f"model.layers.{i}.{part}"
        for i in range(2)
        for part in [f"self_attn.{p}_proj" for p in "qkvo"]
        + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    ]
    assert _names(model, "all-linear") == expected
    inject(model, LoRA(target_modules="all-linear"))
    assert _wrapped(model) == expected
    assert isinstance(model.lm_head, nn.Linear)


def test_all_linear_on_gpt2_takes_conv1d_and_leaves_the_tied_head() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert output_head_names(model) == {"lm_head"}
    assert _names(model, "all-linear") == [
        f"transformer.h.{i}.{part}"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    inject(model, LoRA(target_modules="all-linear"))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, not adapted


def test_all_linear_on_plain_and_classifier_models_leaves_the_last_linear() -> None:
    assert _names(MLPConv(), "all-linear") == ["fc1"]
    bert = tiny_bert_classifier()
    names = _names(bert, "all-linear")
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; pooler


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_all_linear_selects_what_peft_selects(build) -> None:
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(build(), peft.LoraConfig(target_modules="all-linear"))
    theirs = [
        n.removeprefix("base_model.model.")
        for n, m in reference.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert _wrapped(inject(build(), LoRA(target_modules="all-linear"))) == theirs


def test_a_second_all_linear_adapter_extends_the_wrappers_without_nesting() -> None:
    model = inject(tiny_llama(), LoRA(target_modules="all-linear"), "a")
    first = _wrapped(model)
    inject(model, LoRA(target_modules="all-linear"), "b")
    assert _wrapped(model) == first  # not the first adapter's lora_A/lora_B Linears
    for name in first:
        assert set(model.get_submodule(name).r) == {"a", "b"}, name
    # Named targets too: a wrapped module is extended, its base_layer is never a target of its own.
    inject(model, LoRA(target_modules=["q_proj"]), "c")
    assert _wrapped(model) == first


def test_modules_to_save_are_never_lora_targets() -> None:
    # A nested modules_to_save entry uses the list syntax (suffix match) like target_modules.
    model = inject(
        tiny_bert_classifier(), LoRA(target_modules="all-linear", modules_to_save=["pooler.dense"])
    )
    assert isinstance(model.bert.pooler.dense, ModulesToSave)
    assert isinstance(model.bert.pooler.dense.base_layer, nn.Linear)
    assert not any(isinstance(m, AdapterLayer) for m in model.bert.pooler.dense.modules_to_save.modules())
    assert "bert.pooler.dense" not in _wrapped(model)


# --- rank_pattern / alpha_pattern ---------------------------------------------------------------------------
PATTERNS = {"q_proj|k_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "v_proj": 5, r"mlp\..*": 3}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", 2),  # an alternation covers the whole tail
        ("model.layers.0.self_attn.k_proj", 2),
        ("model.layers.1.self_attn.v_proj", 6),  # the first matching key wins
        ("model.layers.0.self_attn.v_proj", 5),
        ("model.layers.0.mlp.down_proj", 3),
        ("model.layers.0.self_attn.o_proj", 8),  # no key: the default
        ("model.layers.0.self_attn.xq_proj", 8),  # keys match whole segments only
    ],
)
def test_pattern_value(name: str, expected: int) -> None:
    assert pattern_value(name, PATTERNS, 8) == expected


def test_pattern_value_agrees_with_peft() -> None:
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    model = tiny_llama()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = get_pattern_key(PATTERNS.keys(), name)
            assert pattern_value(name, PATTERNS, 8) == PATTERNS.get(key, 8), name


def test_rank_and_alpha_patterns_set_each_layer() -> None:
    model = inject(
        tiny_llama(),
        LoRA(
            r=8,
            alpha=16,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"q_proj": 4},
            alpha_pattern={r"layers\.1\..*": 2.0},
        ),
    )
    for i, (rank_q, alpha) in enumerate([(4, 16.0), (4, 2.0)]):
        q = model.model.layers[i].self_attn.q_proj
        v = model.model.layers[i].self_attn.v_proj
        assert q.r["default"] == rank_q and q.lora_A["default"].weight.shape == (rank_q, 64)
        assert v.r["default"] == 8 and v.lora_B["default"].weight.shape == (32, 8)
        assert q.scaling["default"] == alpha / rank_q
        assert v.scaling["default"] == alpha / 8


# --- errors -------------------------------------------------------------------------------------------------
def test_a_target_matching_nothing_names_close_candidates() -> None:
    with pytest.raises(ValueError, match="matched no module") as info:
        inject(tiny_llama(), LoRA(target_modules=["q_prj"]))
    assert "Did you mean: q_proj" in str(info.value)
    assert "model.layers.0.self_attn.q_proj" in str(info.value)


def test_modules_to_save_matching_nothing_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"modules_to_save: target_modules=\['clasifier'\] matched no module"
    ):
        inject(tiny_bert_classifier(), LoRA(target_modules=["query"], modules_to_save=["clasifier"]))


def test_an_unsupported_layer_type_names_the_supported_ones() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="unsupported type") as info:
        inject(model, LoRA(target_modules=["input_layernorm"]))
    message = str(info.value)
    assert "model.layers.0.input_layernorm (LlamaRMSNorm)" in message
    for supported in ("torch.Linear", "transformers.Conv1D", "torch.Embedding", "torch.Conv2d"):
        assert supported in message
    assert list(model.state_dict()) == list(before)  # refused before anything was wrapped
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_a_grouped_convolution_needs_a_rank_divisible_by_its_groups() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(
        ValueError, match=r"grouped convolution 0 \(groups=2\): r=3 must be a multiple of groups"
    ):
        inject(model, LoRA(r=3, target_modules=["0"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_target_modules_none_without_a_model_type_default_is_refused() -> None:
    with pytest.raises(ValueError, match="target_modules is required"):
        find_targets(MLPConv(), None, supported=LLAMA_LINEAR)


def test_the_injected_output_is_unchanged_by_exclusions() -> None:
    model = tiny_llama()
    x = torch.randint(0, 128, (1, 5))
    base = model(input_ids=x).logits
    inject(model, LoRA(target_modules="all-linear", exclude_modules=["mlp.down_proj"]))
    assert not any(n.endswith("down_proj") for n in _wrapped(model))
    assert torch.equal(model(input_ids=x).logits, base)
