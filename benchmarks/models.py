"""What is benchmarked: the base model (a Llama built from a config, the embedded MiniLM, or the user's own
Hugging Face model folder), its batches, and one configuration per method, the same for every measurement."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

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


BUILT_IN = ("llama", "minilm")


def check_model(model: str) -> str:
    """``model`` as given if it is built in or a local model folder; otherwise a message naming the choices."""
    if model in BUILT_IN or (Path(model) / "config.json").is_file():
        return model
    raise SystemExit(
        f"--model {model!r} is neither {' nor '.join(BUILT_IN)} nor a folder with a config.json (a Hugging Face "
        "model saved with save_pretrained); pass one of those."
    )


def model_label(model: str) -> str:
    """The name of the results folder and tables: ``llama``, ``minilm`` or the model folder's name."""
    return model if model in BUILT_IN else Path(model).resolve().name


@functools.cache
def is_causal_lm(model: str) -> bool:
    """Causal LM (LM loss on random tokens) or sequence classification (2 labels), from the config's
    architectures: a folder saved from transformers' causal-LM class of its model type (``*ForCausalLM``,
    GPT-2's ``GPT2LMHeadModel``) is a causal LM; anything else is benchmarked as a classifier."""
    if model in BUILT_IN:
        return model == "llama"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return any(a.endswith("ForCausalLM") or a == causal for a in config.architectures or [])


def build_model(args: argparse.Namespace) -> nn.Module:
    """A fresh base model with fixed weights (seed 0): the same for every method and for peft."""
    torch.manual_seed(0)
    if args.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=LLAMA_VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lightning_peft.app.tasks import default_model_path

    path = default_model_path() if args.model == "minilm" else args.model
    if is_causal_lm(args.model):
        return AutoModelForCausalLM.from_pretrained(path)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def make_batch(args: argparse.Namespace, model: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed random batch (seed 1); the loss is the model's own (LM loss, or classification)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    if not is_causal_lm(args.model):
        labels = torch.randint(0, 2, (args.batch,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {"input_ids": ids, "labels": ids}


def _classification_head(model: str) -> list[str] | None:
    """The new head of a sequence classifier (trained in full next to every method), found on a weightless copy."""
    if is_causal_lm(model):
        return None
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model, num_labels=2)
    with torch.device("meta"):
        names = {name for name, _ in AutoModelForSequenceClassification.from_config(config).named_children()}
    return [name for name in ("classifier", "score") if name in names] or None


def model_shape(model: nn.Module) -> Shape:
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(linear, config.num_attention_heads * head_dim, config.num_hidden_layers)


def method_catalogue(model: str) -> dict[str, Callable[[], PEFTMethod]]:
    """One factory per method, in the order of the tables. Ranks and sizes are the papers'/peft's defaults; on a
    model folder, "qv" targets are each method's default targets for its model_type."""
    if model == "minilm":
        qv, all_linear, head = ["query", "value"], ["query", "key", "value", "dense"], ["classifier"]
    elif model == "llama":
        qv, all_linear, head = ["q_proj", "v_proj"], "all-linear", None
    else:
        qv, all_linear, head = None, "all-linear", _classification_head(model)
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
