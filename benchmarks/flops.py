"""The FLOP model behind the "ideal" column: what a training step must compute, and nothing else.

A matmul with a weight of ``N`` values costs, per token, ``2N`` forward, ``2N`` for the gradient of its
input and ``2N`` for the gradient of its weight (Kaplan et al. 2020, the "6N" rule). So:

- full fine-tuning: ``6N`` per token (every weight trained);
- a PEFT method: ``2N + 2N`` per token for the frozen base (the input gradients still flow through it to the
  adapters below), plus ``6A`` for the ``A`` adapter weights that run on every token (LoRA's A and B, IA3's
  vectors, bottleneck adapters). Soft-prompt parameters (prompt/prefix embeddings and their encoders) run once
  per batch, not per token, so they count 0 here; their cost is the longer sequence instead;
- attention scores and the weighted sum (``QKᵀ`` and ``PV``): ``4·Tq·Tk·d`` forward per layer and sequence,
  twice that backward (both operands are activations), for full and PEFT alike. Prompt tuning lengthens
  ``Tq`` (and ``Tk``) by its virtual tokens; prefix tuning lengthens only ``Tk``.

Left out as small at these sizes: norms, activations, softmax, the embedding lookup, and the input gradient of
layer 0's projections, which autograd skips when nothing below them trains.
"""

from __future__ import annotations


def attention_flops(*, batch: int, query_len: int, key_len: int, attn_dim: int, layers: int) -> int:
    """Forward FLOPs of ``softmax(QKᵀ)V`` (``QKᵀ``: ``2·Tq·Tk·d``; ``PV``: the same), all layers."""
    return 4 * batch * query_len * key_len * attn_dim * layers


def train_step_flops(
    *,
    linear_params: int,
    adapter_params: int,
    batch: int,
    seq: int,
    attn_dim: int,
    layers: int,
    full: bool,
    extra_query: int = 0,
    extra_key: int = 0,
) -> int:
    """FLOPs of forward + backward of one batch (the optimizer step is O(params) and left out).

    Args:
        linear_params: Weights of the base model's matmuls (every ``nn.Linear``, the LM head included).
        adapter_params: Trainable weights that run on every token (0 for full fine-tuning and soft prompts).
        batch: Sequences per batch.
        seq: Tokens per sequence, before virtual tokens.
        attn_dim: ``num_heads * head_dim`` of the queries.
        layers: Transformer blocks.
        full: Full fine-tuning (every base weight gets a gradient) rather than a frozen base.
        extra_query: Virtual tokens prepended to the input (prompt tuning, P-tuning).
        extra_key: Virtual keys/values per layer (prefix tuning, P-tuning v2).
    """
    query_len = seq + extra_query
    tokens = batch * query_len
    attention = attention_flops(
        batch=batch, query_len=query_len, key_len=query_len + extra_key, attn_dim=attn_dim, layers=layers
    )
    per_token = 6 * linear_params if full else 4 * linear_params + 6 * adapter_params
    return tokens * per_token + 3 * attention
