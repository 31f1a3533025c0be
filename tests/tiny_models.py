"""Tiny models built from configs (no downloads), shared by the test modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 query heads sharing 2 key/value heads (grouped-query attention)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


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


def token_batch(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
