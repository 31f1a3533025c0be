"""Tiny transformers models built from configs (no download), for checking a method in seconds on a CPU."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

VOCAB = 128

# The Llama-family decoders: 2 layers, 4 query heads sharing 2 key/value heads (grouped-query attention).
DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
# The BERT-style encoders, before their positions and labels.
ENCODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


def seeded(
    model_class: type[PreTrainedModel], config_class: type[PretrainedConfig], seed: int, **config: Any
) -> PreTrainedModel:
    """``model_class(config_class(**config))`` in eval mode, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_class(config_class(**config)).eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """DECODER as a Llama; ``overrides`` replace config fields (a wider model, another vocabulary)."""
    return seeded(LlamaForCausalLM, LlamaConfig, seed, **{**DECODER, **overrides})


def tiny_bert_classifier(
    seed: int = 0, num_labels: int = 3, initializer_range: float = 0.02
) -> BertForSequenceClassification:
    return seeded(
        BertForSequenceClassification, BertConfig, seed, **ENCODER, max_position_embeddings=64,
        num_labels=num_labels, initializer_range=initializer_range,
    )  # fmt: skip


def token_batch(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """``(batch, length)`` token ids below :data:`VOCAB`, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
