"""The fused forward/backward of one LoRA (or DoRA) adapter on a linear layer: ``y = x W^T + b + s (x' A^T) B^T``.

Written as separate modules (base, ``lora_A``, ``lora_B``, ``* s``, ``+``) the update costs, beyond its matmuls,
an elementwise pass over the ``(tokens, out)`` output for the scale, another for the sum (plus its allocation),
a scale pass over the output gradient in backward, and a ``(tokens, in)`` sum of the two input gradients. Here
the update is accumulated into the base output by one ``addmm_`` (the scale rides in its ``alpha``), the scale
is applied to ``(tokens, r)`` and ``(out, r)`` tensors only, and the input gradient of both branches is one
``mm`` + ``addmm_``. The result equals the module composition up to float rounding.

The rank-``r`` intermediates are kept as ``(r, tokens)`` and every thin product is written in the operand
layout BLAS runs fastest for skinny shapes: ``A @ x^T`` rather than ``x @ A^T`` and ``B^T @ g^T`` rather than
``g @ B`` (the layouts autograd's ``linear`` uses). On CPU (MKL, 256 tokens, r = 8, 512 -> 1365) those two
products run 1.2-2x and 3-4x faster (benchmarks/lora_kernel_layouts.py measures them).

DoRA (:class:`FusedDoraLinear`) is the same update times a per-output factor ``m / ||W + sBA||``: the factor
applies once to the ``(tokens, out)`` sum rather than to the base output and the update separately, and that
un-scaled sum is the one ``(tokens, out)`` tensor kept for backward (the magnitude's gradient).

Only tensors go in: callers use it where no hook needs the modules to run (:meth:`LoraLinear.fusable_adapter`).
"""

from __future__ import annotations

from typing import Any

import torch


def _flat_inputs(
    ctx: Any,
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` and the adapter's input as ``(tokens, in)`` and ``W^T`` as an ``(in, out)`` view; notes on ``ctx``
    what backward needs besides tensors."""
    ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
    ctx.has_bias = bias is not None
    x2 = x.reshape(-1, x.shape[-1])
    d2 = x2 if dropped is None else dropped.reshape(-1, dropped.shape[-1])
    return x2, d2, weight if fan_in_fan_out else weight.t()


class FusedLoraLinear(torch.autograd.Function):
    """``linear(x, W, b) + s * linear(linear(dropped, A), B)``; ``dropped`` is ``None`` when it is ``x`` itself.

    ``W`` is ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out`` (transformers' ``Conv1D``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        x2, d2, w_t = _flat_inputs(ctx, x, dropped, weight, bias, scaling, fan_in_fan_out)
        result = x2 @ w_t if bias is None else torch.addmm(bias, x2, w_t)  # (tokens, out)
        after_A_t = lora_A @ d2.t()  # (r, in) @ (in, tokens) -> (r, tokens)
        result.addmm_(after_A_t.t(), lora_B.t(), alpha=scaling)  # += s * (tokens, r) @ (r, out), in place
        ctx.save_for_backward(x2, None if dropped is None else d2, weight, lora_A, lora_B, after_A_t)
        return result.view(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, d2, weight, lora_A, lora_B, after_A_t = ctx.saved_tensors
        needs_x, needs_dropped, needs_w, needs_b, needs_A, needs_B = ctx.needs_input_grad[:6]
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        w_t = weight if ctx.fan_in_fan_out else weight.t()
        grad_after_A_t = None  # (r, tokens): the gradient reaching A's output, scale included
        if needs_x or needs_dropped or needs_A:
            grad_after_A_t = (lora_B.t() @ g.t()).mul_(s)  # (r, out) @ (out, tokens)
        grad_x = grad_dropped = grad_w = grad_b = grad_A = grad_B = None
        if needs_x:
            grad_x = g @ w_t.t()  # (tokens, in)
            if d2 is None:  # x is also the adapter's input: both branches' gradients in one buffer
                grad_x.addmm_(grad_after_A_t.t(), lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if needs_dropped:
            grad_dropped = (grad_after_A_t.t() @ lora_A).view(ctx.x_shape)
        if needs_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if needs_b and ctx.has_bias:
            grad_b = g.sum(0)
        if needs_A:
            grad_A = grad_after_A_t @ (x2 if d2 is None else d2)  # (r, tokens) @ (tokens, in)
        if needs_B:
            grad_B = (after_A_t @ g).mul_(s).t()  # (r, tokens) @ (tokens, out) -> (out, r)
        return grad_x, grad_dropped, grad_w, grad_b, grad_A, grad_B, None, None


class FusedDoraLinear(torch.autograd.Function):
    """DoRA's ``base(x) + (k - 1) (x' W^T) + k s (x' A^T) B^T`` with ``k = m / norm`` per output, as one kernel.

    ``x'`` is ``dropped`` (``None`` when it is ``x`` itself) and ``norm`` is ``||W + sBA||`` per output row, a
    constant (no gradient), as on the module path (``LoraLinear.adapter_output``). With ``c = x' W^T + s (x'
    A^T) B^T`` (the un-scaled combined output) that is ``k c + b`` when ``x' = x`` and ``(x - x') W^T + b + k c``
    under dropout; ``c`` is kept for the magnitude's gradient ``sum_tokens(g c) / norm`` (only when ``m`` needs
    one). Every other factor of ``k`` lands on an ``(out,)`` or ``(out, r)`` tensor, except the base term's
    output gradient ``g k`` (``g (k - 1)`` under dropout).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        scaling: float,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        x2, d2, w_t = _flat_inputs(ctx, x, dropped, weight, bias, scaling, fan_in_fan_out)
        factor = magnitude / norm  # (out,)
        combined = d2 @ w_t  # (tokens, out)
        after_A_t = lora_A @ d2.t()  # (r, in) @ (in, tokens) -> (r, tokens)
        combined.addmm_(after_A_t.t(), lora_B.t(), alpha=scaling)  # += s * (tokens, r) @ (r, out), in place
        keep = ctx.needs_input_grad[6]  # the magnitude's gradient is the only use of the un-scaled output
        if dropped is not None:  # the base term sees x, the magnitude's terms the dropped input
            x_minus_d = x2 - d2
            result = x_minus_d @ w_t if bias is None else torch.addmm(bias, x_minus_d, w_t)
            result.addcmul_(combined, factor)
        elif not keep:
            result = combined.mul_(factor) if bias is None else combined.mul_(factor).add_(bias)
        else:
            result = combined * factor if bias is None else torch.addcmul(bias, combined, factor)
        ctx.save_for_backward(
            x2, None if dropped is None else d2, weight, lora_A, lora_B, after_A_t, factor, norm,
            combined if keep else None,
        )  # fmt: skip
        return result.view(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, d2, weight, lora_A, lora_B, after_A_t, factor, norm, combined = ctx.saved_tensors
        needs_x, needs_dropped, needs_w, needs_b, needs_A, needs_B, needs_m = ctx.needs_input_grad[:7]
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        w_t = weight if ctx.fan_in_fan_out else weight.t()
        lora_in = x2 if d2 is None else d2
        lora_factor = factor * ctx.scaling  # (out,): k s, the update's factor per output
        grad_after_A_t = None  # (r, tokens): the gradient reaching A's output, k s included
        if needs_x or needs_dropped or needs_A:
            grad_after_A_t = (lora_B * lora_factor.unsqueeze(1)).t() @ g.t()  # (r, out) @ (out, tokens)
        g_base = None  # the output gradient reaching the magnitude-scaled base term
        if needs_x or needs_dropped or needs_w:
            g_base = g * factor if d2 is None else g * (factor - 1)
        grad_x = grad_dropped = grad_w = grad_b = grad_A = grad_B = grad_m = None
        if needs_x:
            if d2 is None:  # x is also the adapter's input: both branches' gradients in one buffer
                grad_x = g_base @ w_t.t()  # (tokens, in)
                grad_x.addmm_(grad_after_A_t.t(), lora_A)
            else:
                grad_x = g @ w_t.t()
            grad_x = grad_x.view(ctx.x_shape)
        if needs_dropped:
            grad_dropped = (g_base @ w_t.t()).addmm_(grad_after_A_t.t(), lora_A).view(ctx.x_shape)
        if needs_w:
            if d2 is None:
                grad_w = x2.t() @ g_base if ctx.fan_in_fan_out else g_base.t() @ x2
            elif ctx.fan_in_fan_out:
                grad_w = torch.addmm(x2.t() @ g, d2.t(), g_base)
            else:
                grad_w = torch.addmm(g.t() @ x2, g_base.t(), d2)
        if needs_b and ctx.has_bias:
            grad_b = g.sum(0)
        if needs_A:
            grad_A = grad_after_A_t @ lora_in  # (r, tokens) @ (tokens, in)
        if needs_B:
            grad_B = (after_A_t @ g).mul_(lora_factor).t()  # (r, tokens) @ (tokens, out) -> (out, r)
        if needs_m:
            grad_m = (g * combined).sum(0).div_(norm)
        return grad_x, grad_dropped, grad_w, grad_b, grad_A, grad_B, grad_m, None, None, None
