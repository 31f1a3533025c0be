"""Prompt Tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).

``n`` trained vectors ("virtual tokens") are prepended to the input embeddings of a frozen model; nothing else
changes. The paper found initialising them from real token embeddings (sampled vocabulary, or the tokens of a
task description) trains faster and more stably than random vectors. Input rewriting, padding, positions and
generation are shared with the other soft-prompt methods (:mod:`lightning_peft.methods.prompt.hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_peft.core.contract import register_method
from lightning_peft.methods.prompt.prompting import PromptLearningMethod, embedding_weight, tokenize_init_text
from lightning_peft.methods.prompt.virtual_tokens import PromptEmbedding, VirtualTokenSpec


@register_method
@dataclass(kw_only=True)
class PromptTuning(PromptLearningMethod):
    """Trained virtual-token embeddings prepended to the inputs.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_peft import count_parameters, inject
        >>> from lightning_peft.methods import PromptTuning
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2))
        >>> model = inject(model, PromptTuning(num_virtual_tokens=8))
        >>> count_parameters(model)["trainable"]  # 8 virtual tokens x hidden size 64
        512

    Args:
        num_virtual_tokens: Number of virtual tokens ``n``.
        prompt_tuning_init: ``"RANDOM"`` (N(0, 1), as ``nn.Embedding`` and peft), ``"SAMPLE_VOCAB"`` (embeddings
            of uniformly sampled tokens) or ``"TEXT"`` (embeddings of ``prompt_tuning_init_text``, cut or repeated
            to ``n`` tokens).
        prompt_tuning_init_text: The text for ``"TEXT"``, e.g. ``"Classify the sentiment of this review:"``.
        tokenizer_name_or_path: Tokenizer for ``"TEXT"`` (a local directory or hub name).
        modules_to_save: Modules trained in full, e.g. ``["classifier"]``.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    # The saved embeddings replace any initialisation: loading needs no tokenizer.
    init_only_fields: ClassVar[dict[str, Any]] = {
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
    }  # fmt: skip

    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise ValueError(
                f"PromptTuning prompt_tuning_init={self.prompt_tuning_init!r}: use 'RANDOM', 'SAMPLE_VOCAB' or 'TEXT'."
            )
        if self.prompt_tuning_init == "TEXT" and not (
            self.prompt_tuning_init_text and self.tokenizer_name_or_path
        ):
            raise ValueError(
                "PromptTuning prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path."
            )

    def build_encoder(
        self, host: nn.Module, embedding: nn.Module, spec: VirtualTokenSpec, dtype: torch.dtype
    ) -> nn.Module:
        vocab = embedding_weight(embedding, self.name)
        n = self.num_virtual_tokens
        if self.prompt_tuning_init == "RANDOM":
            weight = torch.randn(n, vocab.shape[1], device=vocab.device, dtype=dtype)
        else:
            if self.prompt_tuning_init == "SAMPLE_VOCAB":
                ids = torch.randint(0, vocab.shape[0], (n,), device=vocab.device)
            else:
                text, tokenizer = self.prompt_tuning_init_text, self.tokenizer_name_or_path
                ids = torch.tensor(tokenize_init_text(text, tokenizer, n), device=vocab.device)  # type: ignore[arg-type]
            with torch.no_grad():
                weight = embedding(ids).detach().to(dtype)  # (n, d): the embeddings of real tokens
        return PromptEmbedding(weight)

    def peft_config_fields(self) -> dict[str, Any]:
        return {
            "prompt_tuning_init": self.prompt_tuning_init,
            "prompt_tuning_init_text": self.prompt_tuning_init_text,
            "tokenizer_name_or_path": self.tokenizer_name_or_path,
            "tokenizer_kwargs": None,
        }
