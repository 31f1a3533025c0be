"""Every architecture family people fine-tune against every method: each cell works, or refuses clearly.

A cell either injects and passes the checks of :func:`check_cell` (only adapter tensors train; save -> load on a
fresh base gives the same outputs within 1e-6; merge equals unmerged within 1e-5 where the method merges; peft
parity both ways within 1e-5 on :data:`PARITY_FAMILIES`; greedy generation with a cache equals cache-free decoding
on the generative decoders), or refuses at injection with a ``ValueError``/``TypeError``/``NotImplementedError``
raised in ``lightning_peft`` itself. :data:`EXPECTED` says which, per cell; ``tests/test_architecture_matrix.py``
holds every cell to it, and ``python -m tests.architecture_matrix --markdown`` prints README's table from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

from lightning_peft import inject, load_adapter, merge, save_adapter
from lightning_peft.core.adapter_layer import NotMergeableError
from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.methods import (
    IA3,
    AdaLoRA,
    Adapter,
    BitFit,
    LoRA,
    MAMAdapter,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    QLoRA,
    TrainableTokens,
    UniPELT,
)
from lightning_peft.methods.adapter import LAYOUTS
from lightning_peft.methods.ia3 import DEFAULT_TARGETS as IA3_DEFAULTS
from lightning_peft.methods.lora.lora import DEFAULT_TARGETS as LORA_DEFAULTS
from lightning_peft.testing.checks import randomise
from lightning_peft.testing.models import VOCAB, seeded, token_batch

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
N = 4  # virtual tokens of the soft-prompt methods


# --- families -----------------------------------------------------------------------------------------------------
def _text(with_decoder: bool = False) -> Callable[[], dict[str, torch.Tensor]]:
    def inputs() -> dict[str, torch.Tensor]:
        ids = token_batch(batch=2, length=7)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_decoder:
            batch["decoder_input_ids"] = token_batch(batch=2, length=5, seed=2)
        return batch

    return inputs


def _speech() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_features": torch.randn(2, 8, 32, generator=g),
        "decoder_input_ids": token_batch(2, 5, seed=2),
    }


def _image(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    def inputs() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}

    return inputs


@dataclass(frozen=True)
class Family:
    """One architecture: how to build it tiny, feed it, and the targets a user names where no default exists."""

    model_class: type[nn.Module]
    config_class: type[Any]
    config: dict[str, Any]
    inputs: Callable[[], dict[str, torch.Tensor]]
    lora: list[str] = field(default_factory=list)  # attention projections LoRA/AdaLoRA/UniPELT adapt
    ia3: list[str] = field(default_factory=list)  # IA3 targets; the last one is the feed-forward one
    attention_output: list[str] | str = field(default_factory=list)  # sequential bottleneck after attention
    feed_forward_output: list[str] | str = field(default_factory=list)  # ... after the feed-forward
    feed_forward: list[str] | str = field(
        default_factory=list
    )  # the feed-forward block (parallel bottleneck)
    generative: bool = False  # a decoder whose generate() is checked with and without a cache
    head: list[str] | None = (
        None  # a new task head, trained in full (modules_to_save), as users fine-tune one
    )
    experts: list[str] | None = None  # fused 3-D expert weights the LoRA cells adapt too (target_parameters)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def build(self) -> nn.Module:
        return seeded(self.model_class, self.config_class, 0, **self.config)


_DEC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
_ENC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, num_labels=3,
)  # fmt: skip
_LLAMA_LIKE = dict(
    lora=["q_proj", "v_proj"], ia3=["k_proj", "v_proj", "down_proj"], attention_output=["self_attn.o_proj"],
    feed_forward_output=["mlp.down_proj"], feed_forward=["mlp"], generative=True,
)  # fmt: skip
# The whole sparse MoE block maps the hidden state to itself: the bottlenecks go around it, not per expert.
_MOE = dict(
    _LLAMA_LIKE, ia3=["k_proj", "v_proj", "o_proj"], feed_forward_output=["mlp"], feed_forward=["mlp"],
    experts=["experts.gate_up_proj", "experts.down_proj"],
)  # fmt: skip
_BERT_LIKE = dict(
    head=["classifier"], lora=["query", "value"], ia3=["key", "value", "output.dense"], attention_output=["attention.output.dense"],
    feed_forward_output=r".*layer\.\d+\.output\.dense", feed_forward=["intermediate"],
)  # fmt: skip
_BART_LIKE = dict(
    lora=["q_proj", "v_proj"], ia3=["k_proj", "v_proj", "fc2"], attention_output=["self_attn.out_proj"],
    feed_forward_output=["fc2"], feed_forward=["fc1"],
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    "Llama": Family(tf.LlamaForCausalLM, tf.LlamaConfig, _DEC, _text(), **_LLAMA_LIKE),
    "Qwen2": Family(tf.Qwen2ForCausalLM, tf.Qwen2Config, _DEC, _text(), **_LLAMA_LIKE),
    "Qwen3": Family(tf.Qwen3ForCausalLM, tf.Qwen3Config, {**_DEC, "head_dim": 8}, _text(), **_LLAMA_LIKE),
    "Gemma": Family(tf.GemmaForCausalLM, tf.GemmaConfig, {**_DEC, "head_dim": 8}, _text(), **_LLAMA_LIKE),
    "GPT-2": Family(
        tf.GPT2LMHeadModel,
        tf.GPT2Config,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0),
        _text(),
        lora=["c_attn"],
        ia3=["c_attn", "mlp.c_proj"],
        attention_output=["attn.c_proj"],
        feed_forward_output=["mlp.c_proj"],
        feed_forward=["mlp"],
        generative=True,
    ),
    "OPT": Family(
        tf.OPTForCausalLM,
        tf.OPTConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=1,
        ),
        _text(),
        lora=["q_proj", "v_proj"],
        ia3=["k_proj", "v_proj", "fc2"],
        attention_output=["self_attn.out_proj"],
        feed_forward_output=["fc2"],
        feed_forward=["fc1"],
        generative=True,
    ),
    "Phi": Family(
        tf.PhiForCausalLM,
        tf.PhiConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        _text(),
        lora=["q_proj", "v_proj"],
        ia3=["k_proj", "v_proj", "fc2"],
        attention_output=["self_attn.dense"],
        feed_forward_output=["mlp.fc2"],
        feed_forward=["mlp"],
        generative=True,
    ),
    "Falcon": Family(
        tf.FalconForCausalLM,
        tf.FalconConfig,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            new_decoder_architecture=False,
            parallel_attn=True,
            alibi=False,
            pad_token_id=0,
        ),
        _text(),
        lora=["query_key_value"],
        ia3=["query_key_value", "dense_4h_to_h"],
        attention_output=["self_attention.dense"],
        feed_forward_output=["dense_4h_to_h"],
        feed_forward=["mlp"],
        generative=True,
    ),
    "Bloom": Family(
        tf.BloomForCausalLM,
        tf.BloomConfig,
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0),
        _text(),
        lora=["query_key_value"],
        ia3=["query_key_value", "dense_4h_to_h"],
        attention_output=["self_attention.dense"],
        feed_forward_output=["dense_4h_to_h"],
        feed_forward=["mlp"],
        generative=True,
    ),
    "BERT": Family(tf.BertForSequenceClassification, tf.BertConfig, _ENC, _text(), **_BERT_LIKE),
    "RoBERTa": Family(
        tf.RobertaForSequenceClassification,
        tf.RobertaConfig,
        {**_ENC, "max_position_embeddings": 80, "pad_token_id": 1},
        _text(),
        **_BERT_LIKE,
    ),
    "DeBERTa-v2": Family(
        tf.DebertaV2ForSequenceClassification,
        tf.DebertaV2Config,
        {**_ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16},
        _text(),
        lora=["query_proj", "value_proj"],
        ia3=["key_proj", "value_proj", "output.dense"],
        attention_output=["attention.output.dense"],
        feed_forward_output=r".*layer\.\d+\.output\.dense",
        feed_forward=["intermediate"],
        head=["classifier"],
    ),
    "DistilBERT": Family(
        tf.DistilBertForSequenceClassification,
        tf.DistilBertConfig,
        dict(
            vocab_size=VOCAB,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=64,
            num_labels=3,
        ),
        _text(),
        lora=["q_lin", "v_lin"],
        ia3=["k_lin", "v_lin", "ffn.lin2"],
        attention_output=["attention.out_lin"],
        feed_forward_output=["ffn.lin2"],
        feed_forward=["ffn"],
        head=["classifier"],
    ),
    "T5": Family(
        tf.T5ForConditionalGeneration,
        tf.T5Config,
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _text(with_decoder=True),
        lora=["q", "v"],
        ia3=["k", "v", "wo"],
        attention_output=["SelfAttention.o"],
        feed_forward_output=["DenseReluDense.wo"],
        feed_forward=["DenseReluDense"],
    ),
    "BART": Family(
        tf.BartForConditionalGeneration,
        tf.BartConfig,
        dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
        _text(with_decoder=True),
        **_BART_LIKE,
    ),
    "Whisper": Family(
        tf.WhisperForConditionalGeneration,
        tf.WhisperConfig,
        dict(
            vocab_size=VOCAB,
            num_mel_bins=8,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        _speech,
        **_BART_LIKE,
    ),
    "ViT": Family(
        tf.ViTForImageClassification,
        tf.ViTConfig,
        dict(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        ),
        _image(8),
        # transformers 5.4 names ViT's layers as BERT's (query, attention.output.dense, intermediate, output.dense)
        # with the feed-forward split across two modules; later releases as Llama's (q_proj, o_proj, mlp.fc1/fc2).
        lora=["q_proj", "v_proj", "query", "value"],
        ia3=["k_proj", "v_proj", "key", "value", "mlp.fc2"],
        attention_output=r".*attention\.(o_proj|output\.dense)",
        feed_forward_output=r".*(mlp\.fc2|layer\.\d+\.output\.dense)",
        feed_forward=["mlp", "intermediate"],
        head=["classifier"],
    ),
    "ResNet": Family(
        tf.ResNetForImageClassification,
        tf.ResNetConfig,
        dict(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
            num_labels=3,
        ),
        _image(16),
        lora=["convolution"],
        ia3=["convolution"],
        head=["classifier"],
    ),
    "Mixtral": Family(
        tf.MixtralForCausalLM,
        tf.MixtralConfig,
        {**_DEC, "num_local_experts": 4, "num_experts_per_tok": 2},
        _text(),
        **_MOE,
    ),
    "Qwen2-MoE": Family(
        tf.Qwen2MoeForCausalLM,
        tf.Qwen2MoeConfig,
        {
            **_DEC,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
        },
        _text(),
        **_MOE,
    ),
}


# --- methods: one setting each, default targets where the method has them for the family ---------------------------
def _or_default(family: Family, defaults: dict[str, Any], explicit: Any) -> Any:
    return None if family.model_type in defaults else (explicit or None)


def _adapter_modules(family: Family, *, parallel: bool) -> dict[str, Any]:
    if family.model_type in LAYOUTS:
        return {}
    if parallel:
        return {"feed_forward_modules": family.feed_forward or None}
    return {
        "attention_modules": family.attention_output or None,
        "feed_forward_modules": family.feed_forward_output or None,
    }


def _ia3(f: Family) -> IA3:
    if f.model_type in IA3_DEFAULTS:
        return IA3(modules_to_save=f.head)
    return IA3(target_modules=f.ia3 or None, feedforward_modules=f.ia3[-1:] or None, modules_to_save=f.head)


def _lora_targets(f: Family) -> list[str] | None:
    return _or_default(f, LORA_DEFAULTS, f.lora)


METHODS: dict[str, Callable[[Family], PEFTMethod]] = {
    "LoRA": lambda f: LoRA(
        r=4, alpha=8, target_modules=_lora_targets(f), target_parameters=f.experts, modules_to_save=f.head
    ),
    "DoRA": lambda f: LoRA(
        r=4, alpha=8, use_dora=True, target_modules=_lora_targets(f), modules_to_save=f.head
    ),
    "rsLoRA": lambda f: LoRA(
        r=4,
        alpha=8,
        use_rslora=True,
        target_modules=_lora_targets(f),
        target_parameters=f.experts,
        modules_to_save=f.head,
    ),
    "QLoRA": lambda f: QLoRA(r=4, alpha=8, target_modules=_lora_targets(f), modules_to_save=f.head),
    "AdaLoRA": lambda f: AdaLoRA(
        init_r=6, target_r=4, alpha=8, total_step=10, target_modules=_lora_targets(f), modules_to_save=f.head
    ),
    "IA3": _ia3,
    "BitFit": lambda f: BitFit(modules_to_save=f.head),
    "PromptTuning": lambda f: PromptTuning(num_virtual_tokens=N, modules_to_save=f.head),
    "PTuning": lambda f: PTuning(num_virtual_tokens=N, encoder_hidden_size=16, modules_to_save=f.head),
    "PrefixTuning": lambda f: PrefixTuning(
        num_virtual_tokens=N, encoder_hidden_size=16, modules_to_save=f.head
    ),
    "PTuningV2": lambda f: PTuningV2(num_virtual_tokens=N, modules_to_save=f.head),
    "Adapter": lambda f: Adapter(
        style="houlsby", reduction_factor=4, modules_to_save=f.head, **_adapter_modules(f, parallel=False)
    ),
    "Adapter (parallel)": lambda f: Adapter(
        style="parallel", reduction_factor=4, modules_to_save=f.head, **_adapter_modules(f, parallel=True)
    ),
    "MAMAdapter": lambda f: MAMAdapter(
        prefix_length=N,
        encoder_hidden_size=16,
        reduction_factor=4,
        modules_to_save=f.head,
        feed_forward_modules=_adapter_modules(f, parallel=True).get("feed_forward_modules"),
    ),
    "TrainableTokens": lambda f: TrainableTokens(token_indices=[3, 5, 7], modules_to_save=f.head),
    "UniPELT": lambda f: UniPELT(
        lora_r=4,
        prefix_length=N,
        encoder_hidden_size=16,
        reduction_factor=4,
        modules_to_save=f.head,
        target_modules=_lora_targets(f),
        feed_forward_modules=_adapter_modules(f, parallel=False).get("feed_forward_modules"),
    ),
}

#: Families whose cells are also compared with Hugging Face peft in both directions (the whole matrix would take
#: too long; Llama, GPT-2 and BERT are in tests/test_peft_parity_matrix.py).
PARITY_FAMILIES = ("Qwen3", "OPT", "RoBERTa", "BART")
PEFT_TYPES = {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "TRAINABLE_TOKENS"}

# --- the expected outcome of every cell ---------------------------------------------------------------------------
# "ok", or a substring of the refusal's message (the reason, as the README footnote states it).
OK = "ok"


@dataclass(frozen=True)
class Refusal:
    """A cell refused at injection: ``match`` is in the error's message, ``why`` is README's footnote."""

    match: str
    why: str


NO_BIAS = Refusal("has no bias parameters", "the layers are bias-free: BitFit would train nothing")
NO_CACHE = Refusal(
    "attention layers do not read a key/value cache",
    "the attention takes no key/value cache, so a prefix would never be attended to (prompt tuning, P-tuning and "
    "LoRA work)",
)
GATED_ENCODER_DECODER = Refusal(
    "its per-layer prefix gates need one attention module per layer",
    "UniPELT gates each layer's prefix in the one attention module of that layer index; an encoder-decoder has three "
    "(prefix tuning, P-tuning v2 and MAM put the prefix in the decoder's self-attention, as peft)",
)
AUDIO = Refusal(
    "takes no inputs_embeds", "the encoder reads audio features: no token input to put prompts before"
)
AUDIO_PREFIX = Refusal(
    "takes no inputs_embeds",
    "the encoder reads audio features, and peft's encoder-decoder prefix format runs the encoder on token ids",
)
NO_QUANTIZABLE = Refusal(
    "has no nn.Linear inside repeated blocks",
    "no `nn.Linear` in the blocks to quantize (GPT-2's `Conv1D`, convolutions); name `quantize_modules`, or use LoRA",
)
WIDENING = Refusal(
    "the widths must be equal",
    "the feed-forward is inline in the block (`fc1`/`fc2`): no hidden-to-hidden module to run a parallel "
    "bottleneck beside (the Houlsby and Pfeiffer styles work)",
)
NO_TOKEN_TABLE = Refusal(
    "has no 2-D (vocab, dim) `weight`",
    "the input is image patches: no token table to prepend virtual tokens from",
)
NO_TOKENS = Refusal("needs a model that exposes its token embedding", "no token embedding (a CNN)")
NO_EMBED_TOKENS = Refusal(
    "matched no module", "no token embedding (a CNN): nothing to name in target_modules"
)
PATCHES = Refusal(
    "trains rows of a token embedding table", "the input is image patches: no token table to train rows of"
)
LINEAR_ONLY = Refusal(
    "selects modules of an unsupported type",
    "AdaLoRA's SVD-form update is defined for linear layers (as in peft)",
)
NO_LAYOUT = Refusal(
    "no default", "no default insertion points for a CNN: name `attention_modules`/`feed_forward_modules`"
)
PREFIX_METHODS = ("PrefixTuning", "PTuningV2", "MAMAdapter", "UniPELT")
SOFT_PROMPTS = ("PromptTuning", "PTuning", "PrefixTuning", "PTuningV2", "MAMAdapter", "UniPELT")
_REFUSED: dict[str, dict[str, Refusal]] = {
    "Llama": {"BitFit": NO_BIAS},
    "Qwen3": {"BitFit": NO_BIAS},
    "Gemma": {"BitFit": NO_BIAS},
    "GPT-2": {"QLoRA": NO_QUANTIZABLE},
    "OPT": {"Adapter (parallel)": WIDENING, "MAMAdapter": WIDENING},
    "Falcon": dict.fromkeys(PREFIX_METHODS, NO_CACHE),
    "Bloom": dict.fromkeys(PREFIX_METHODS, NO_CACHE),
    "DeBERTa-v2": dict.fromkeys(PREFIX_METHODS, NO_CACHE),
    "DistilBERT": dict.fromkeys(PREFIX_METHODS, NO_CACHE),
    "T5": {"BitFit": NO_BIAS, "UniPELT": GATED_ENCODER_DECODER},
    "BART": {"UniPELT": GATED_ENCODER_DECODER, "Adapter (parallel)": WIDENING, "MAMAdapter": WIDENING},
    "Whisper": {
        "PromptTuning": AUDIO,
        "PTuning": AUDIO,
        **dict.fromkeys(PREFIX_METHODS, AUDIO_PREFIX),
        "Adapter (parallel)": WIDENING,
    },
    "ViT": {
        "PromptTuning": NO_TOKEN_TABLE,
        "PTuning": NO_TOKEN_TABLE,
        **dict.fromkeys(PREFIX_METHODS, NO_CACHE),
        "TrainableTokens": PATCHES,
    },
    "ResNet": {
        "QLoRA": NO_QUANTIZABLE,
        "AdaLoRA": LINEAR_ONLY,
        **dict.fromkeys(SOFT_PROMPTS, NO_TOKENS),
        "Adapter": NO_LAYOUT,
        "Adapter (parallel)": NO_LAYOUT,
        "UniPELT": Refusal("gates LoRA on linear layers", "UniPELT's gated LoRA needs linear layers"),
        "TrainableTokens": NO_EMBED_TOKENS,
    },
    "Mixtral": {"BitFit": NO_BIAS},
}
EXPECTED: dict[str, dict[str, str | Refusal]] = {
    family: {method: _REFUSED.get(family, {}).get(method, OK) for method in METHODS} for family in FAMILIES
}


def expected_here(family: str, method: str) -> str | Refusal:
    """:data:`EXPECTED` (the newest transformers, as README states it), for the installed release.

    transformers 5.4's ViT splits its feed-forward across ``intermediate`` and ``output`` (which adds the residual
    itself), so there is no hidden-to-hidden module to run a parallel bottleneck beside: refused there.
    """
    vit_parallel = (family, method) == ("ViT", "Adapter (parallel)")
    if vit_parallel and not any(name.endswith(".mlp") for name, _ in FAMILIES["ViT"].build().named_modules()):
        return WIDENING
    return EXPECTED[family][method]


# --- the check of one cell ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # "ok", "refused", "skipped" or "fail"
    message: str = ""

    def matches(self, expected: str | Refusal) -> bool:
        if expected == OK:
            return self.status == "ok"
        return self.status == "refused" and expected.match in self.message


def _from_our_code(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "lightning_peft" in frames[-1].filename


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _peft_logits(
    model: nn.Module, inputs: dict[str, torch.Tensor], peft_type: str, num_tokens: int
) -> torch.Tensor:
    from tests.peft_reference import reference_outputs

    out = reference_outputs(model, **inputs).logits
    # peft keeps the virtual positions in a causal LM's token-level outputs; ours drop them.
    if peft_type in {"PROMPT_TUNING", "P_TUNING"} and out.dim() == 3 and out.shape[1] == num_tokens + N:
        out = out[:, N:]
    return out


def _check_parity(
    family: Family,
    method: PEFTMethod,
    inputs: dict[str, torch.Tensor],
    ours_out: torch.Tensor,
    directory: Path,
) -> str:
    """Our directory in peft and peft's in ours give the same outputs; returns why parity was skipped, if it was.

    A QLoRA adapter is compared on the dequantized base (peft would quantize through ``from_pretrained`` only):
    the 4-bit layers compute in float32 from exactly those weights.
    """
    import peft

    from lightning_peft.core.quantization import dequantize

    config = json.loads((directory / "adapter_config.json").read_text())
    peft_type = config["peft_type"]
    if peft_type not in PEFT_TYPES:
        return ""
    num_tokens = ours_out.shape[1] if ours_out.dim() == 3 else 0
    try:
        theirs = peft.PeftModel.from_pretrained(dequantize(fresh_base(family, method)), directory).eval()
        theirs_out = _peft_logits(theirs, inputs, peft_type, num_tokens)
    except (
        pytest.skip.Exception
    ) as skipped:  # peft itself cannot run this family with the installed transformers
        return f"peft parity skipped: {skipped.msg}"
    torch.testing.assert_close(theirs_out, ours_out, atol=1e-5, rtol=0)
    theirs = peft.get_peft_model(
        dequantize(fresh_base(family, method)), peft.PeftConfig.from_pretrained(directory)
    )
    randomise(theirs, seed=5, scale=0.05)
    theirs.eval().save_pretrained(directory / "peft")
    expected = _peft_logits(theirs, inputs, peft_type, num_tokens)
    with torch.no_grad():
        got = forward(load_adapter(fresh_base(family, method), directory / "peft").eval(), inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return ""


def _check_generate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    model.generation_config.eos_token_id = None  # 3 tokens each time, as the cache-free loop below decodes
    with torch.no_grad():
        cached = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True
        )[:, ids.shape[1] :]
        tokens = ids
        for _ in range(3):  # cache-free greedy decoding: the whole sequence every step
            out = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits
            tokens = torch.cat([tokens, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens[:, ids.shape[1] :]), f"cached {cached.tolist()} != {tokens.tolist()}"


def check_cell(family_name: str, method_name: str, parity: bool | None = None) -> Outcome:
    """Run one cell; ``parity`` defaults to whether the family is in :data:`PARITY_FAMILIES`."""
    family = FAMILIES[family_name]
    if method_name == "QLoRA" and not HAS_BITSANDBYTES:
        return Outcome("skipped", "bitsandbytes is not installed")
    inputs = family.inputs()
    model = family.build()
    try:
        method = METHODS[method_name](family)
        inject(model, method)
    except (ValueError, TypeError, NotImplementedError) as error:
        if _from_our_code(error):
            return Outcome("refused", str(error))
        return Outcome("fail", f"injection: {type(error).__name__}: {error}")
    except Exception as error:
        return Outcome("fail", f"injection: {type(error).__name__}: {error}")
    try:
        note = _check_injected(family, method, model, inputs, parity)
    except Exception as error:
        return Outcome("fail", f"{type(error).__name__}: {str(error)[:300]}")
    return Outcome("ok", note)


def _check_injected(
    family: Family, method: PEFTMethod, model: nn.Module, inputs: dict[str, torch.Tensor], parity: bool | None
) -> str:
    # Only adapter parameters get gradients and change after 2 optimizer steps (the second one moves the factors
    # a zero-initialised partner held still in the first).
    adapter_keys = set(adapter_state_keys(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(adapter_state_keys(model, parameters_only=True)), sorted(trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # eps far below any gradient: a step moves every parameter whose gradient is nonzero, however small (a tiny
    # BART's q_proj gets ~4e-16, which Adam's default eps=1e-8 shrinks into fp32 rounding)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-20)
    for _ in range(2):
        optimizer.zero_grad()
        forward(model, inputs).float().square().mean().backward()
        optimizer.step()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad, f"frozen parameters got gradients: {frozen_with_grad[:3]}"
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= adapter_keys, f"non-adapter tensors changed: {sorted(changed - adapter_keys)[:3]}"
    unchanged = sorted(trainable - changed)
    assert not unchanged, f"adapter parameters did not change in 2 steps: {unchanged[:3]}"

    # save_adapter -> load_adapter into a fresh base: the same outputs.
    randomise(model, scale=0.05)
    with torch.no_grad():
        out = forward(model, inputs)
    note = ""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save_adapter(model, directory)
        loaded = load_adapter(fresh_base(family, method), directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(forward(loaded, inputs), out, atol=1e-6, rtol=0)
        if parity if parity is not None else family_name_of(family) in PARITY_FAMILIES:
            note = _check_parity(family, method, inputs, out, directory)
    if family.generative:
        _check_generate(model, inputs)
    if isinstance(
        method, QLoRA
    ):  # W + sBA re-quantized would not be the trained model: refused, model untouched
        with pytest.raises(NotMergeableError, match="quantized"):
            merge(model)
        with torch.no_grad():
            torch.testing.assert_close(forward(model, inputs), out, atol=0, rtol=0)
    elif method.mergeable:
        merge(model)
        with torch.no_grad():
            torch.testing.assert_close(forward(model, inputs), out, atol=1e-5, rtol=0)
    return note


def fresh_base(family: Family, method: PEFTMethod) -> nn.Module:
    """A new base model as the adapter was trained on: 4-bit for QLoRA (quantization is deterministic)."""
    model = family.build()
    if isinstance(method, QLoRA):
        from lightning_peft.core.quantization import quantize

        quantize(model, method.quantize_modules, skip=method.modules_to_save or ())
    return model


def family_name_of(family: Family) -> str:
    return next(name for name, f in FAMILIES.items() if f is family)


# --- the README table ---------------------------------------------------------------------------------------------
def markdown() -> str:
    """README's table: family rows, method columns, ✓ or ✗ with a footnote number per refusal reason."""
    reasons: list[Refusal] = []
    lines = [
        "| family | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for family, row in EXPECTED.items():
        cells = []
        for method in METHODS:
            expected = row[method]
            if expected == OK:
                cells.append("✓")
                continue
            if expected not in reasons:
                reasons.append(expected)
            cells.append(f"✗{reasons.index(expected) + 1}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {reason.why}." for i, reason in enumerate(reasons, 1)]
    lines.append("")
    lines.append(
        "✓: injects, trains only its tensors, saves and reloads to the same outputs, merges to the same outputs "
        "(mergeable methods), generates the same tokens with and without a cache (decoders) and, for "
        f"{', '.join(PARITY_FAMILIES)}, gives peft's outputs from peft's directories and peft ours; ✗: refuses at "
        "injection with the reason given. Generated by `python -m tests.architecture_matrix --markdown` from the "
        "table that `tests/test_architecture_matrix.py` checks every cell against (tiny models built from "
        "transformers configs; QLoRA cells need bitsandbytes)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print README's table")
    parser.add_argument("--run", action="store_true", help="run every cell and print the outcomes")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
    if args.run:
        torch.set_num_threads(1)
        for family in FAMILIES:
            for method in METHODS:
                outcome = check_cell(family, method)
                print(json.dumps([family, method, outcome.status, outcome.message[:400]]), flush=True)


if __name__ == "__main__":
    main()
