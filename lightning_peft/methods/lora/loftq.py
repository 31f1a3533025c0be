"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization", https://arxiv.org/abs/2310.08659): a
QLoRA initialisation that starts from the full-precision model instead of the quantized one.

Quantizing ``W`` to 4 bits loses ``W - Q(W)``; with ``B = 0`` QLoRA starts from ``Q(W)`` and must first learn that
error back. LoftQ alternates, for ``loftq_iter`` iterations, quantizing what the adapter does not hold and
taking the rank-``r`` SVD of what the quantization misses::

    Q_t = quant(W - L_{t-1} R_{t-1})          (L_0 R_0 = 0)
    L_t R_t = top-r SVD of (W - dequant(Q_t)),  L = U sqrt(S), R = sqrt(S) V^T

The base then holds the last ``Q`` and the adapter ``L R``, so ``dequant(Q) + s B A`` approximates ``W`` better
than ``dequant(quant(W))`` alone. As peft's ``loftq_init``: NF4 or FP4 in blocks of 64, the SVD in float32,
``A = R``, ``B = L`` where the LoRA scale ``s`` is 1. peft ignores ``s``; here ``A = R / sqrt(s)`` and
``B = L / sqrt(s)``, so ``s B A = L R`` for every ``alpha`` (the same tensors as peft's when ``s = 1``).

:class:`~lightning_peft.methods.QLoRA` runs it with ``init_lora_weights="loftq"`` on the Linears it quantizes
(targets it leaves in full precision have no quantization error and start as plain LoRA). The saved adapter
is plain LoRA (``init_lora_weights: true``, as in peft's LoftQ example, so loading never re-runs it); it belongs
to the LoftQ-quantized base, which :func:`~lightning_peft.core.quantization.dequantize` gives in floats.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_peft.core.quantization import TorchLinear, dequantize_weight, quantize_linear
from lightning_peft.core.targeting import replace_module


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L (out, r), R (r, in)`` with ``L R`` the best rank-``r`` approximation of ``residual`` (out, in)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    sqrt_s = S[:r].sqrt()
    return U[:, :r] * sqrt_s, sqrt_s.unsqueeze(1) * Vh[:r]  # (out, r), (r, in)


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, settings: dict) -> nn.Module:
    """A bitsandbytes 4-bit Linear holding ``weight`` (out, in), quantized as QLoRA quantizes its base."""
    linear = TorchLinear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = bias
    return quantize_linear(linear, **settings)


@torch.no_grad()
def loftq(
    weight: torch.Tensor, r: int, num_iter: int, settings: dict, bias: torch.Tensor | None = None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ on one ``(out, in)`` weight.

    Args:
        weight: The full-precision weight.
        r: The adapter's rank.
        num_iter: Alternating iterations (``>= 1``; 1 is quantize, then one SVD of the error).
        settings: :func:`~lightning_peft.core.quantization.quantize_linear`'s ``quant_type``, ``double_quant``,
            ``compute_dtype``.
        bias: The layer's bias, kept in the returned layer.

    Returns:
        The 4-bit layer holding the last quantized residual, and ``L (out, r)``, ``R (r, in)`` in float32.
    """
    W = weight.float()
    target = W
    for i in range(num_iter):
        layer = _quantized(target.to(weight.dtype), bias, settings)
        L, R = low_rank(W - dequantize_weight(layer).float(), r)
        if i + 1 < num_iter:
            target = W - L @ R  # (out, r) @ (r, in): what the next quantization must hold
    return layer, L, R


@torch.no_grad()
def apply_loftq(
    model: nn.Module,
    adapter_name: str,
    originals: dict[str, torch.Tensor],
    quantized: list[str],
    num_iter: int,
    settings: dict,
) -> list[str]:
    """Replace each quantized LoRA target's base by LoftQ's quantized residual and its ``A, B`` by the factors.

    ``originals`` holds the full-precision weights from before quantization; ``quantized`` the names quantization
    replaced. Returns the names LoftQ initialised.
    """
    done = []
    for name in quantized:
        layer = model.get_submodule(name)
        if name not in originals or adapter_name not in getattr(layer, "r", {}):
            continue  # quantized but not a LoRA target: nothing to correct
        r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        base, L, R = loftq(originals[name], r, num_iter, settings, layer.base_layer.bias)
        base.train(layer.base_layer.training)
        replace_module(layer, "base_layer", base)
        root = math.sqrt(scaling)  # s * B A = L R
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        A.copy_((R / root).to(A))
        B.copy_((L / root).to(B))
        done.append(name)
    return done
