"""The causal LM loss over chunks of tokens (:class:`~lightning_peft.app.tasks.CausalLMModule`'s
``loss_chunk_size``), and the check that a model's logits are its output head applied to its last hidden states,
which that loss relies on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: Label of positions the loss ignores (the data module's IGNORE_INDEX, torch's default ignore_index).
IGNORE_INDEX = -100


def chunked_causal_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int
) -> torch.Tensor:
    """The causal LM loss (token ``t`` predicts label ``t + 1``, mean over labels that are not -100), without the
    full logits: ``head`` runs on ``chunk_size`` kept tokens at a time, so only one chunk's ``(chunk_size,
    vocab)`` logits live at once.

    A frozen head (no parameter requires grad: LoRA and the other methods leave it alone) gets each chunk's
    gradient with respect to the hidden states at once, in forward, and frees the chunk's logits: backward scales
    the stored ``(N, H)`` gradient, so the head runs once per token, as in the plain loss. A trainable head
    (``modules_to_save``, LoRA on the head) runs each chunk under activation checkpointing instead: its logits
    are recomputed in backward, one more head matmul per chunk, so its parameters get their gradients through
    autograd as anywhere else.

    Args:
        hidden: ``(B, T, H)`` final hidden states (after the last norm), what the head reads.
        labels: ``(B, T)`` token ids, -100 where no loss is taken.
        head: The output projection (``get_output_embeddings()``), adapted or not: it is called, not read.
        chunk_size: Tokens per chunk.

    Returns:
        The scalar fp32 loss; NaN when no label is kept, like the unchunked loss.
    """
    width = hidden.shape[-1]
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    states = hidden[:, :-1].reshape(-1, width)  # (B*(T-1), H)
    kept = targets != IGNORE_INDEX
    states, targets = states[kept], targets[kept]  # (N, H), (N,): ignored tokens get no logits
    trainable_head = any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and states.requires_grad and not trainable_head:
        total = _FrozenHeadCrossEntropy.apply(states, targets, head, chunk_size)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.shape[0], chunk_size):
            chunk = (head, states[start : start + chunk_size], targets[start : start + chunk_size])
            if trainable_head and torch.is_grad_enabled():
                total = total + checkpoint(_summed_cross_entropy, *chunk, use_reentrant=False)
            else:
                total = total + _summed_cross_entropy(*chunk)
    return total / kept.sum()


def _summed_cross_entropy(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()  # (n, H) -> (n, vocab), upcast as transformers' loss does
    return F.cross_entropy(logits, targets, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """``sum_chunks cross_entropy(head(states[chunk]), targets[chunk])`` for a head without trainable parameters;
    forward also computes ``d loss / d states`` chunk by chunk (the chunk's logits and their gradient are freed
    before the next chunk), backward only scales it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, states: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int
    ) -> torch.Tensor:
        total = states.new_zeros((), dtype=torch.float32)
        grad_states = torch.empty_like(states)  # (N, H)
        for start in range(0, targets.shape[0], chunk_size):
            end = start + chunk_size
            with torch.enable_grad():
                chunk = states[start:end].detach().requires_grad_(True)
                loss = _summed_cross_entropy(head, chunk, targets[start:end])
                (grad_states[start:end],) = torch.autograd.grad(loss, chunk)
            total += loss.detach()
        ctx.save_for_backward(grad_states)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad_states,) = ctx.saved_tensors
        return grad_states * grad_total.to(grad_states.dtype), None, None, None


def check_separable_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Refuse chunked loss unless ``logits == get_output_embeddings()(hidden_states[-1])`` on a short slice of
    ``batch`` (eval mode, no grad): models that scale or soft-cap logits after the head would be silently wrong.

    Raises:
        ValueError: no output head, or the model's logits are not the head applied to its last hidden states.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"loss_chunk_size needs an output head to call on hidden states, but {type(model).__name__}."
            "get_output_embeddings() gives none. Set loss_chunk_size: null."
        )
    ids = batch["input_ids"][:1, :8]  # (1, <=8)
    mask = batch.get("attention_mask")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            output = model(
                input_ids=ids,
                attention_mask=None if mask is None else mask[:1, :8],
                output_hidden_states=True,
            )
            ours = head(output.hidden_states[-1]).float()
    finally:
        for m, training in modes.items():
            m.training = training
    theirs = output.logits.float()
    if ours.shape != theirs.shape or not torch.allclose(
        ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item()
    ):
        raise ValueError(
            f"loss_chunk_size: {type(model).__name__}'s logits are not its output head ({type(head).__name__}) applied "
            "to its last hidden states (it scales or soft-caps them after the head), so a chunked loss would be "
            "wrong. Set loss_chunk_size: null."
        )
