"""P-Tuning (Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Like Prompt Tuning, ``n`` virtual tokens are prepended to the input embeddings, but they are the output of a
small trained *prompt encoder* applied to ``n`` free embeddings: an MLP, or a bidirectional LSTM followed by an
MLP. The paper's point is that the reparametrisation couples the virtual tokens (they are no longer independent
vectors), which optimises faster and more stably. After training only the encoder's output is needed:
:func:`~lightning_peft.methods.prompt.virtual_tokens.freeze_prompt_encoder` folds it into a plain embedding table, and that
output is what :func:`~lightning_peft.save_adapter` writes (peft's ``prompt_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_peft.core.contract import register_method
from lightning_peft.methods.prompt.prompting import PromptLearningMethod, embedding_weight
from lightning_peft.methods.prompt.virtual_tokens import VirtualTokenSpec


class PromptEncoder(nn.Module):
    """``n`` embeddings -> MLP (or bidirectional LSTM -> MLP) -> ``n`` virtual tokens; names as in peft."""

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        hidden_size: int,
        reparameterization: Literal["MLP", "LSTM"],
        lstm_layers: int,
        dropout: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
        self.lstm_head: nn.LSTM | None = None
        if reparameterization == "LSTM":
            self.lstm_head = nn.LSTM(
                token_dim, hidden_size, num_layers=lstm_layers, dropout=dropout if lstm_layers > 1 else 0.0,
                bidirectional=True, batch_first=True, **factory,
            )  # fmt: skip
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden_size, 2 * hidden_size, **factory),
                nn.ReLU(),
                nn.Linear(2 * hidden_size, token_dim, **factory),
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden_size, **factory),
                nn.ReLU(),
                nn.Linear(hidden_size, hidden_size, **factory),
                nn.ReLU(),
                nn.Linear(hidden_size, token_dim, **factory),
            )

    def forward(self) -> torch.Tensor:
        tokens = self.embedding.weight  # (n, d)
        if self.lstm_head is not None:
            tokens = self.lstm_head(tokens.unsqueeze(0))[0].squeeze(0)  # (1, n, d) -> (1, n, 2h) -> (n, 2h)
        return self.mlp_head(tokens)  # (n, d)


@register_method
@dataclass(kw_only=True)
class PTuning(PromptLearningMethod):
    """Virtual tokens produced by a trained prompt encoder (MLP or bidirectional LSTM + MLP).

    Example:
        >>> PTuning(num_virtual_tokens=10, encoder_reparameterization_type="LSTM").encoder_num_layers
        2

    Args:
        num_virtual_tokens: Number of virtual tokens ``n``.
        encoder_reparameterization_type: ``"MLP"`` (3 linear layers with ReLU) or ``"LSTM"`` (bidirectional LSTM,
            then 2 linear layers).
        encoder_hidden_size: Hidden width ``h`` of the encoder; ``None`` uses the model's hidden size.
        encoder_num_layers: LSTM layers (the MLP always has 3 linear layers, as in peft).
        encoder_dropout: Dropout between LSTM layers.
        modules_to_save: Modules trained in full, e.g. ``["classifier"]``.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                f"PTuning encoder_reparameterization_type={self.encoder_reparameterization_type!r}: use 'MLP' or "
                "'LSTM'."
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(
                f"PTuning encoder_hidden_size={self.encoder_hidden_size!r} must be >= 1 (or None)."
            )
        if self.encoder_num_layers < 1 or not 0 <= self.encoder_dropout < 1:
            raise ValueError(
                f"PTuning encoder_num_layers={self.encoder_num_layers!r} must be >= 1 and "
                f"encoder_dropout={self.encoder_dropout!r} in [0, 1)."
            )

    def build_encoder(
        self, host: nn.Module, embedding: nn.Module, spec: VirtualTokenSpec, dtype: torch.dtype
    ) -> nn.Module:
        vocab = embedding_weight(embedding, self.name)
        token_dim = vocab.shape[1]
        return PromptEncoder(
            self.num_virtual_tokens, token_dim, self.encoder_hidden_size or token_dim,
            self.encoder_reparameterization_type, self.encoder_num_layers, self.encoder_dropout,
            device=vocab.device, dtype=dtype,
        )  # fmt: skip

    def peft_config_fields(self) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.encoder_reparameterization_type,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }
