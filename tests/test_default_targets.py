"""The per-family default tables: LoRA/AdaLoRA and IA3 targets cover every model type peft has defaults for, with
peft's names; on a tiny model of every family transformers ships, each default names real modules and adapts
exactly the modules peft's defaults adapt; every adapter layout wraps each block's sublayers."""

from __future__ import annotations

import copy
import re
from typing import Any

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Layer as PeftIA3Layer
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import constants as peft_constants
from torch import nn
from transformers import CONFIG_MAPPING, AutoModel

from lightning_peft import inject
from lightning_peft.core.targeting import name_matches
from lightning_peft.methods import IA3, AdaLoRA, Adapter, LoRA
from lightning_peft.methods.adapter import LAYOUTS, BottleneckLayer
from lightning_peft.methods.ia3 import DEFAULT_FEEDFORWARD as IA3_FEEDFORWARD
from lightning_peft.methods.ia3 import DEFAULT_TARGETS as IA3_TARGETS
from lightning_peft.methods.ia3 import IA3Layer
from lightning_peft.methods.lora.adalora import DEFAULT_TARGETS as ADALORA_TARGETS
from lightning_peft.methods.lora.adalora import SVDLayer
from lightning_peft.methods.lora.layers import LoraLayer
from lightning_peft.methods.lora.lora import DEFAULT_TARGETS as LORA_TARGETS
from lightning_peft.testing.checks import randomise
from lightning_peft.testing.models import VOCAB, token_batch

PEFT_LORA = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
PEFT_ADALORA = peft_constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
PEFT_IA3 = peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
PEFT_IA3_FEEDFORWARD = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

# Families peft has no default for, which ours add.
LORA_ONLY_OURS = {"distilbert", "phi3", "qwen2_moe", "vit", "whisper"}
IA3_ONLY_OURS = {"distilbert", "qwen2_moe", "vit", "whisper"}
# AdaLoRA: peft's AdaLoRA table, which for these six names every attention and feed-forward layer; LoRA's table
# for the families peft's AdaLoRA table lacks.
ADALORA_WIDER_IN_PEFT = {"t5", "mt5", "bart", "opt", "roberta", "deberta-v2"}
# Deliberate differences from peft's value: (ours, peft's), and why.
IA3_DIFFERENCES = {
    # transformers 5's Mixtral stacks the routed experts in 3-D tensors: no "w2" layer exists for peft's entry.
    "mixtral": ((["k_proj", "v_proj"], []), (["k_proj", "v_proj", "w2"], ["w2"])),
}
# Names that exist only in some releases or backbones: exactly one group matches the built model.
ALTERNATIVES = {
    ("lora", "vit"): [
        ["query", "value"],
        ["q_proj", "v_proj"],
    ],  # transformers 5.4: query/value, later q_proj/v_proj
    ("ia3", "vit"): [["key", "value", "output.dense"], ["k_proj", "v_proj", "mlp.fc2"]],
    ("ia3-feedforward", "vit"): [["output.dense"], ["mlp.fc2"]],
    ("lora", "blip-2"): [["q", "v"], ["q_proj", "v_proj"]],  # the T5 or OPT language model (built with OPT)
}
# peft's LoraConfig() adapts nothing here: its transformers-v5 MoE conversion turns the unset target_modules into an
# empty set before the default table is read, so get_peft_model raises. Compared with peft's table entry passed
# explicitly instead (and the failure is asserted, so a fixed peft shows up here).
PEFT_LORA_DEFAULT_FAILS = {"mixtral"}

# --- tiny configs: every model type of our tables that transformers ships --------------------------------------------
_DEC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_ENC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
_GPT = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
_T5 = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
    pad_token_id=0, eos_token_id=1,
)  # fmt: skip
_BART = dict(
    vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)  # fmt: skip
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
TINY: dict[str, dict[str, Any]] = {
    "llama": _DEC,
    "llama4": dict(
        text_config={
            **_DEC,
            "head_dim": 8,
            "intermediate_size_mlp": 64,
            "num_local_experts": 2,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": 16,
        },
        vision_config={
            **_VISION,
            "image_size": 28,
            "patch_size": 14,
            "vision_output_dim": 32,
            "projector_input_dim": 32,
            "projector_output_dim": 32,
        },
    ),
    "mistral": _DEC,
    "mixtral": {**_DEC, "num_local_experts": 4},
    "qwen2": _DEC,
    "qwen2_moe": {
        **_DEC,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
    },
    "qwen3": {**_DEC, "head_dim": 8},
    "gemma": {**_DEC, "head_dim": 8},
    "gemma2": {**_DEC, "head_dim": 8},
    "gemma3_text": {**_DEC, "head_dim": 8},
    "gemma4": dict(
        text_config={
            **_DEC,
            "head_dim": 8,
            "global_head_dim": 8,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": VOCAB,
            "sliding_window": 16,
        },
        vision_config={**_VISION, "num_key_value_heads": 4, "head_dim": 8, "position_embedding_size": 64},
        audio_config=None,
    ),
    "stablelm": _DEC,
    "nemotron_h": {
        **_DEC,
        "head_dim": 8,
        "layers_block_type": ["mamba", "attention"],
        "ssm_state_size": 8,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "n_groups": 1,
        "chunk_size": 8,
        "use_mamba_kernels": False,
    },
    "phi": _ENC,
    "phi3": _DEC,
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
    ),
    "gpt2": _GPT,
    "gpt_bigcode": _GPT,
    "gpt_neo": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gptj": {**_GPT, "rotary_dim": 4},
    "codegen": {**_GPT, "n_ctx": 64, "rotary_dim": 4},
    "gpt_neox": _ENC,
    "falcon": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "mpt": dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64),
    "rwkv": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        attention_hidden_size=32,
        intermediate_size=64,
        context_length=64,
    ),
    "bert": _ENC,
    "roberta": {**_ENC, "max_position_embeddings": 80, "pad_token_id": 1},
    "xlm-roberta": {**_ENC, "max_position_embeddings": 80, "pad_token_id": 1},
    "electra": {**_ENC, "embedding_size": 32},
    "layoutlm": _ENC,
    "distilbert": dict(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64
    ),
    "deberta": _ENC,
    "deberta-v2": _ENC,
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "whisper": {
        **_BART,
        "num_mel_bins": 8,
        "max_source_positions": 16,
        "max_target_positions": 64,
        "decoder_start_token_id": 1,
    },
    "blip-2": dict(
        vision_config={**_VISION, "image_size": 28, "patch_size": 14},
        qformer_config={
            **_VISION,
            "vocab_size": VOCAB,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
        },
        num_query_tokens=2,
    ),
    "vit": {**_VISION, "num_hidden_layers": 2, "image_size": 28, "patch_size": 14},
}

FAMILIES = sorted(set(LORA_TARGETS) | set(IA3_TARGETS) | set(LAYOUTS))
SHIPPED = [f for f in FAMILIES if f in CONFIG_MAPPING]
NOT_SHIPPED = {f for f in FAMILIES if f not in CONFIG_MAPPING}


@pytest.fixture(scope="module")
def tiny() -> dict[str, nn.Module]:
    """Built models per family, shared by the module's tests (each test adapts a copy)."""
    return {}


def _model(cache: dict[str, nn.Module], family: str) -> nn.Module:
    if family not in cache:
        torch.manual_seed(0)
        config = CONFIG_MAPPING[family](**TINY[family])
        cache[family] = AutoModel.from_config(config).eval()
    return copy.deepcopy(cache[family])


def _as_list(value: Any) -> list[str] | str:
    return value if isinstance(value, str) else list(value)


# --- the tables against peft's ----------------------------------------------------------------------------------------
def test_lora_table_has_every_peft_model_type_with_peft_names() -> None:
    assert {k: _as_list(v) for k, v in PEFT_LORA.items()} == {k: LORA_TARGETS[k] for k in PEFT_LORA}
    assert set(LORA_TARGETS) - set(PEFT_LORA) == LORA_ONLY_OURS


def test_ia3_tables_have_every_peft_model_type_with_peft_names_except_the_listed_differences() -> None:
    ours = {k: (IA3_TARGETS[k], IA3_FEEDFORWARD[k]) for k in PEFT_IA3}
    theirs = {k: (_as_list(v), _as_list(PEFT_IA3_FEEDFORWARD[k])) for k, v in PEFT_IA3.items()}
    differing = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert differing == IA3_DIFFERENCES
    assert set(IA3_TARGETS) - set(PEFT_IA3) == IA3_ONLY_OURS
    assert set(IA3_FEEDFORWARD) == set(IA3_TARGETS)
    for (
        family,
        targets,
    ) in IA3_TARGETS.items():  # a feed-forward module must also be a target, as peft requires
        assert set(IA3_FEEDFORWARD[family]) <= set(targets), family


def test_every_family_transformers_ships_has_a_tiny_config() -> None:
    assert set(SHIPPED) <= set(TINY)
    # Remote-code models (trust_remote_code) transformers does not ship; gemma4 only from transformers 5.5.
    assert {"RefinedWeb", "RefinedWebModel", "btlm", "chatglm", "rwkv7", "gemma4"} >= NOT_SHIPPED


# --- per family, on a tiny model ----------------------------------------------------------------------------------------
family_param = pytest.mark.parametrize("family", SHIPPED)


def _check_names_exist(model: nn.Module, kind: str, family: str, names: list[str] | str) -> None:
    modules = [n for n, _ in model.named_modules() if n]
    if isinstance(names, str):
        assert any(re.fullmatch(names, n) for n in modules), f"{kind} {family}: {names!r} matches no module"
        return
    groups = ALTERNATIVES.get((kind, family), [])
    grouped = {n for g in groups for n in g}
    missing = [n for n in names if n not in grouped and not any(name_matches(m, [n]) for m in modules)]
    assert not missing, f"{kind} {family}: {missing} match no module"
    if groups:
        present = [all(any(name_matches(m, [n]) for m in modules) for n in g) for g in groups]
        absent = [not any(name_matches(m, [n]) for m in modules for n in g) for g in groups]
        assert sum(present) == 1 and sum(absent) == len(groups) - 1, (kind, family, present, absent)


@family_param
def test_each_default_name_matches_a_module(tiny: dict[str, nn.Module], family: str) -> None:
    model = _model(tiny, family)
    if family in LORA_TARGETS:
        _check_names_exist(model, "lora", family, LORA_TARGETS[family])
    if family in IA3_TARGETS:
        _check_names_exist(model, "ia3", family, IA3_TARGETS[family])
        _check_names_exist(model, "ia3-feedforward", family, IA3_FEEDFORWARD[family])


def _peft_adapted(model: nn.Module, config: Any, layer_type: type) -> dict[str, Any]:
    wrapped = peft.get_peft_model(model, config)
    prefix = "base_model.model."
    return {
        n.removeprefix(prefix): getattr(m, "is_feedforward", None)
        for n, m in wrapped.named_modules()
        if isinstance(m, layer_type) and n.startswith(prefix)
    }


@pytest.mark.parametrize("family", [f for f in SHIPPED if f in LORA_TARGETS])
def test_lora_default_adapts_the_modules_peft_default_adapts(tiny: dict[str, nn.Module], family: str) -> None:
    ours = {n for n, m in inject(_model(tiny, family), LoRA()).named_modules() if isinstance(m, LoraLayer)}
    assert ours
    if family in LORA_ONLY_OURS:
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(_model(tiny, family), peft.LoraConfig())
        assert ours == {
            n for n, _ in _model(tiny, family).named_modules() if n and name_matches(n, LORA_TARGETS[family])
        }
        return
    config = peft.LoraConfig()
    if family in PEFT_LORA_DEFAULT_FAILS:
        with pytest.raises(ValueError, match="No `target_modules` passed"):
            peft.get_peft_model(_model(tiny, family), peft.LoraConfig())
        config = peft.LoraConfig(target_modules=list(PEFT_LORA[family]))
    assert ours == set(_peft_adapted(_model(tiny, family), config, PeftLoraLayer))


def test_adalora_defaults_are_peft_adalora_table_and_lora_defaults_elsewhere() -> None:
    assert {k: ADALORA_TARGETS[k] for k in PEFT_ADALORA} == {k: _as_list(v) for k, v in PEFT_ADALORA.items()}
    elsewhere = set(ADALORA_TARGETS) - set(PEFT_ADALORA)
    assert elsewhere and {k: ADALORA_TARGETS[k] for k in elsewhere} == {k: LORA_TARGETS[k] for k in elsewhere}
    assert set(ADALORA_TARGETS) == set(LORA_TARGETS)
    assert {k for k in PEFT_ADALORA if ADALORA_TARGETS[k] != LORA_TARGETS[k]} == ADALORA_WIDER_IN_PEFT


@pytest.mark.parametrize("family", [f for f in SHIPPED if f in PEFT_ADALORA])
def test_adalora_default_adapts_the_modules_peft_default_adapts(
    tiny: dict[str, nn.Module], family: str
) -> None:
    method = AdaLoRA(init_r=4, target_r=2, total_step=10)
    ours = {n for n, m in inject(_model(tiny, family), method).named_modules() if isinstance(m, SVDLayer)}
    assert ours
    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10)
    assert ours == set(_peft_adapted(_model(tiny, family), config, PeftLoraLayer))


@pytest.mark.parametrize("family", [f for f in SHIPPED if f in IA3_TARGETS])
def test_ia3_default_adapts_the_modules_peft_default_adapts(tiny: dict[str, nn.Module], family: str) -> None:
    model = inject(_model(tiny, family), IA3())
    ours = {n: m.is_feedforward["default"] for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert ours
    if family in IA3_ONLY_OURS:
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(_model(tiny, family), peft.IA3Config())
        return
    assert ours == _peft_adapted(_model(tiny, family), peft.IA3Config(), PeftIA3Layer)
    assert any(ours.values()) == bool(IA3_FEEDFORWARD[family])


# --- adapter layouts ------------------------------------------------------------------------------------------------------
# Each layout's sites inside one block, written out here (not read from LAYOUTS), per style.
_SITES = {
    "decoder": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "parallel": ["mlp"]},
    "moe": {"houlsby": ["self_attn.o_proj", "mlp"], "parallel": ["mlp"]},
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "parallel": ["mlp"]},
    "bert": {"houlsby": ["attention.output.dense", "output.dense"], "parallel": ["output"]},
}
LAYOUT_KIND = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"], "decoder"
    ),
    **dict.fromkeys(["stablelm"], "decoder"),
    **dict.fromkeys(["mixtral", "qwen2_moe"], "moe"),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], "gpt2"),
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "deberta", "deberta-v2"], "bert"
    ),
}


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?(layers|layer|h)\.\d+", n)]


def test_every_layout_is_checked() -> None:
    assert set(LAYOUT_KIND) == set(LAYOUTS)


@pytest.mark.parametrize("style", ["houlsby", "parallel"])
@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_adapter_layout_wraps_every_block_and_changes_the_output_only_once_trained(
    tiny: dict[str, nn.Module], family: str, style: str
) -> None:
    base = _model(tiny, family)
    batch = {"input_ids": token_batch(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = base(**batch).last_hidden_state
    model = inject(base, Adapter(style=style, reduction_factor=4))
    blocks = _blocks(model)
    assert len(blocks) == 2
    sites = {f"{b}.{s}" for b in blocks for s in _SITES[LAYOUT_KIND[family]][style]}
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}
    assert set(wrapped) == sites
    width = model.config.get_text_config().hidden_size
    assert {m.bottleneck["default"].down.in_features for m in wrapped.values()} == {width}
    calls: dict[str, int] = dict.fromkeys(wrapped, 0)
    hooks = [
        m.bottleneck["default"].register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
        for n, m in wrapped.items()
    ]
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, expected)  # up = 0: exactly the base model
        randomise(model)
        trained = model(**batch).last_hidden_state
    for hook in hooks:
        hook.remove()
    assert calls == dict.fromkeys(wrapped, 2)  # every bottleneck ran in both forwards
    assert (trained - expected).abs().max() > 1e-3
