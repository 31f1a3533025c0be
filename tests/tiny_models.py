"""Tiny models built from configs (no downloads), shared by the test modules: the single source of them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

# The models lightning_peft.testing checks methods on, re-exported beside the other families.
from lightning_peft.testing.models import (
    DECODER,
    ENCODER,
    VOCAB,
    seeded,
    tiny_bert_classifier,
    tiny_llama,
    token_batch,
)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """The Llama family member with biases (on q, k, v)."""
    return seeded(Qwen2ForCausalLM, Qwen2Config, seed, **DECODER)


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    return seeded(MistralForCausalLM, MistralConfig, seed, **DECODER)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    return seeded(
        GPT2LMHeadModel, GPT2Config, seed, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64
    )


def tiny_gemma(seed: int = 0) -> GemmaForCausalLM:
    """Scaled embeddings, GeGLU, an explicit head_dim; grouped-query attention as in DECODER."""
    return seeded(GemmaForCausalLM, GemmaConfig, seed, **DECODER, head_dim=16)


def tiny_phi(seed: int = 0) -> PhiForCausalLM:
    """Partial rotary embeddings, a parallel attention/MLP block, biases everywhere."""
    return seeded(
        PhiForCausalLM, PhiConfig, seed, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """Learned positions counted from the attention mask (offset 2), pad id 1."""
    return seeded(
        OPTForCausalLM, OPTConfig, seed, vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
    )  # fmt: skip


def tiny_roberta_classifier(
    seed: int = 0, num_labels: int = 3, initializer_range: float = 0.02
) -> RobertaForSequenceClassification:
    """Positions start after padding_idx=1, as in RoBERTa."""
    return seeded(
        RobertaForSequenceClassification, RobertaConfig, seed, **ENCODER, max_position_embeddings=80,
        num_labels=num_labels, pad_token_id=1, initializer_range=initializer_range,
    )  # fmt: skip


def tiny_distilbert_classifier(seed: int = 0) -> DistilBertForSequenceClassification:
    return seeded(
        DistilBertForSequenceClassification, DistilBertConfig, seed, vocab_size=VOCAB, dim=64, hidden_dim=128,
        n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip


class MLPConv(nn.Module):
    """A plain network with every layer type LoRA supports natively: Conv1d, Conv2d, Embedding, Linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, kernel_size=1)
        self.embed = nn.Embedding(10, 16)
        self.fc1 = nn.Linear(8 * 16 + 16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, image: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pointwise(torch.relu(self.conv2d(image))))  # (B, 8, 4, 4)
        h = torch.relu(self.conv1d(h.flatten(2)))  # (B, 8, 16)
        h = torch.cat([h.flatten(1), self.embed(token)], dim=-1)  # (B, 144)
        return self.fc2(torch.relu(self.fc1(h)))

    @staticmethod
    def example_inputs(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, 4, 4, generator=g), torch.randint(0, 10, (batch,), generator=g)


__all__ = [
    "DECODER",
    "ENCODER",
    "VOCAB",
    "MLPConv",
    "seeded",
    "tiny_bert_classifier",
    "tiny_distilbert_classifier",
    "tiny_gemma",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mistral",
    "tiny_opt",
    "tiny_phi",
    "tiny_qwen2",
    "tiny_roberta_classifier",
    "token_batch",
]
