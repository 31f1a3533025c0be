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

DoRA's kernel (:class:`~lightning_peft.methods.lora.dora.FusedDoraLinear`, with the rest of DoRA) shares
:func:`flat_inputs`.

Only tensors go in: callers use it where no hook needs the modules to run (:meth:`LoraLinear.fusable_adapter`).
"""

from __future__ import annotations

from typing import Any

import torch


def flat_inputs(
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


def base_plus_update(
    x2: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    after_A_t: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x W^T + b + s (A x^T)^T B^T`` as ``(tokens, out)``: the base product, then the update accumulated into it
    in place (the scale in ``addmm_``'s alpha)."""
    result = x2 @ w_t if bias is None else torch.addmm(bias, x2, w_t)  # (tokens, out)
    result.addmm_(after_A_t.t(), lora_B.t(), alpha=scaling)  # += s * (tokens, r) @ (r, out), in place
    return result


def base_and_B_grads(
    ctx: Any,
    g: torch.Tensor,
    x2: torch.Tensor,
    after_A_t: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``W``, ``b`` and ``B`` from the ``(tokens, out)`` output gradient ``g``, each ``None`` unless
    ``needs`` (for ``W``, ``b``, ``B``) asks for it."""
    needs_w, needs_b, needs_B = needs
    grad_w = grad_b = grad_B = None
    if needs_w:
        grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
    if needs_b and ctx.has_bias:
        grad_b = g.sum(0)
    if needs_B:
        grad_B = (after_A_t @ g).mul_(ctx.scaling).t()  # (r, tokens) @ (tokens, out) -> (out, r)
    return grad_w, grad_b, grad_B


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
        x2, d2, w_t = flat_inputs(ctx, x, dropped, weight, bias, scaling, fan_in_fan_out)
        after_A_t = lora_A @ d2.t()  # (r, in) @ (in, tokens) -> (r, tokens)
        result = base_plus_update(x2, w_t, bias, after_A_t, lora_B, scaling)
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
        grad_x = grad_dropped = grad_A = None
        if needs_x:
            grad_x = g @ w_t.t()  # (tokens, in)
            if d2 is None:  # x is also the adapter's input: both branches' gradients in one buffer
                grad_x.addmm_(grad_after_A_t.t(), lora_A)
            grad_x = grad_x.view(ctx.x_shape)
        if needs_dropped:
            grad_dropped = (grad_after_A_t.t() @ lora_A).view(ctx.x_shape)
        if needs_A:
            grad_A = grad_after_A_t @ (x2 if d2 is None else d2)  # (r, tokens) @ (tokens, in)
        grad_w, grad_b, grad_B = base_and_B_grads(ctx, g, x2, after_A_t, (needs_w, needs_b, needs_B))
        return grad_x, grad_dropped, grad_w, grad_b, grad_A, grad_B, None, None


class LoraLinearFromA(torch.autograd.Function):
    """``linear(x, W, b) + s * after_A @ B^T`` where ``after_A`` (kept as ``(r, tokens)``, ``A x^T``) was computed
    by the caller: shared-input LoRA (:mod:`lightning_peft.methods.lora.shared_input`) computes the A products of
    every layer reading ``x`` as one matmul and hands each layer its rows. Autograd takes the gradient reaching
    ``after_A`` back through that shared matmul to ``x`` and each ``A``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        after_A_t: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_B: torch.Tensor,
        scaling: float,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        x2, _, w_t = flat_inputs(ctx, x, None, weight, bias, scaling, fan_in_fan_out)
        result = base_plus_update(x2, w_t, bias, after_A_t, lora_B, scaling)
        ctx.save_for_backward(x2, weight, lora_B, after_A_t)
        return result.view(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, weight, lora_B, after_A_t = ctx.saved_tensors
        needs_x, needs_after_A, needs_w, needs_b, needs_B = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        w_t = weight if ctx.fan_in_fan_out else weight.t()
        grad_x = grad_after_A_t = None
        if needs_x:
            grad_x = (g @ w_t.t()).view(ctx.x_shape)  # (tokens, in): the base term's share only
        if needs_after_A:
            grad_after_A_t = (lora_B.t() @ g.t()).mul_(ctx.scaling)  # (r, out) @ (out, tokens)
        grad_w, grad_b, grad_B = base_and_B_grads(ctx, g, x2, after_A_t, (needs_w, needs_b, needs_B))
        return grad_x, grad_after_A_t, grad_w, grad_b, grad_B, None, None


class SharedAProduct(torch.autograd.Function):
    """``cat(A_1, ..., A_n) @ x^T``, ``(sum r_i, tokens)``: the A products of several LoRA layers reading ``x``
    as one matmul, each layer's rows then split off for :class:`LoraLinearFromA`. Backward is one matmul for
    ``x``'s gradient (in ``x``'s own ``(tokens, in)`` layout) and one for all the A gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *lora_As: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        stacked = torch.cat(lora_As)  # (sum r, in)
        ctx.x_shape, ctx.ranks = x.shape, [a.shape[0] for a in lora_As]
        ctx.save_for_backward(x2, stacked)
        return stacked @ x2.t()  # (sum r, in) @ (in, tokens)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, stacked = ctx.saved_tensors
        grad_x = (grad.t() @ stacked).view(ctx.x_shape) if ctx.needs_input_grad[0] else None  # (tokens, in)
        grads_A: list[torch.Tensor | None] = [None] * len(ctx.ranks)
        if any(ctx.needs_input_grad[1:]):
            grads_A = list((grad @ x2).split(ctx.ranks))  # (sum r, tokens) @ (tokens, in), one row block each
        return grad_x, *grads_A
