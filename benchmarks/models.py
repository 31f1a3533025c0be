"""What is benchmarked: the base models (a Llama built from a config, or the embedded MiniLM), their batches,
and one configuration per method, the same for every measurement."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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
    UniPELT,
)

VIRTUAL_TOKENS = 20
LLAMA_VOCAB = 2048


@dataclass(frozen=True)
class Shape:
    """The numbers the FLOP model needs about a base model."""

    linear_params: int
    attn_dim: int
    layers: int


def build_model(args: argparse.Namespace) -> nn.Module:
    """A fresh base model with fixed weights (seed 0): the same for every method and for peft."""
    torch.manual_seed(0)
    if args.model == "minilm":
        from transformers import AutoModelForSequenceClassification

        from lightning_peft.tasks import default_model_path

        return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_batch(args: argparse.Namespace, model: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed random batch (seed 1); the loss is the model's own (LM loss, or classification)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    if args.model == "minilm":
        labels = torch.randint(0, 2, (args.batch,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {"input_ids": ids, "labels": ids}


def model_shape(model: nn.Module) -> Shape:
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(linear, config.num_attention_heads * head_dim, config.num_hidden_layers)


def method_catalogue(model_kind: str) -> dict[str, Callable[[], PEFTMethod]]:
    """One factory per method, in the order of the tables. Ranks and sizes are the papers'/peft's defaults."""
    if model_kind == "minilm":
        qv, all_linear, head = ["query", "value"], ["query", "key", "value", "dense"], ["classifier"]
    else:
        qv, all_linear, head = ["q_proj", "v_proj"], "all-linear", None
    n = VIRTUAL_TOKENS
    return {
        "lora": lambda: LoRA(r=8, alpha=16, target_modules=all_linear, modules_to_save=head),
        "lora_qv": lambda: LoRA(r=8, alpha=16, target_modules=qv, modules_to_save=head),
        "dora": lambda: LoRA(r=8, alpha=16, target_modules=all_linear, use_dora=True, modules_to_save=head),
        "adalora": lambda: AdaLoRA(target_modules=qv, total_step=1000, modules_to_save=head),
        "ia3": lambda: IA3(modules_to_save=head),
        "bitfit": lambda: BitFit(modules_to_save=head),
        "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=n, modules_to_save=head),
        "p_tuning": lambda: PTuning(num_virtual_tokens=n, modules_to_save=head),
        "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=n, modules_to_save=head),
        "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=n, modules_to_save=head),
        "adapter_houlsby": lambda: Adapter(style="houlsby", modules_to_save=head),
        "adapter_pfeiffer": lambda: Adapter(style="pfeiffer", modules_to_save=head),
        "adapter_parallel": lambda: Adapter(style="parallel", modules_to_save=head),
        "mam_adapter": lambda: MAMAdapter(modules_to_save=head),
        "unipelt": lambda: UniPELT(modules_to_save=head),
    }


def virtual_tokens(method: PEFTMethod) -> tuple[int, int]:
    """``(extra_query, extra_key)`` tokens the method adds to every sequence (see benchmarks.flops)."""
    kind = getattr(method, "kind", None)
    if kind == "prompt":
        return method.num_virtual_tokens, 0
    if kind == "prefix":
        return 0, method.num_virtual_tokens
    return 0, getattr(method, "prefix_length", 0)  # MAM adapter, UniPELT
