"""DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) as a LoRA variant: ``W' = m (W + sBA) / ||W + sBA||``.

The adapted weight is split into a direction, ``W + sBA`` normalised per output (row of a linear weight, output
channel of a convolution's kernel), and a trained magnitude ``m`` (``lora_magnitude_vector.<adapter>``: ``(out,)``
on linear layers, ``(1, out, 1, ...)`` on convolutions, as peft stores them). In a forward pass, with
``k = m / ||W + sBA||`` and the norm a constant to autograd (the paper, sec. 4.3),

    ``y = base(x) + (k - 1) W x' + k s B A x'``

where ``x'`` is the dropped input; without dropout (or in eval) ``W x'`` is the base output less its bias, so the
base matmul runs once. Merging writes ``k (W + sBA)`` and keeps that norm on the variant object, which unmerging
needs (the merged weight no longer tells it). Everything DoRA adds is here: the magnitude's creation, the update,
merge/unmerge, and the fused linear kernel (:class:`FusedDoraLinear`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import adapter_dtype, oriented
from lightning_peft.methods.lora.kernels import flat_inputs
from lightning_peft.methods.lora.variants import LoraVariant


class DoraVariant(LoraVariant):
    """DoRA on one adapter of a LoRA layer; subclasses give the layer kind's norm and per-output shapes."""

    containers: ClassVar[dict[str, type[nn.Module]]] = {"lora_magnitude_vector": nn.ParameterDict}

    def __init__(self) -> None:
        self.merged_norm: torch.Tensor | None = None  # ||W + sBA|| when merged: unmerge divides by it

    # --- per layer kind ---------------------------------------------------------------------------------------
    def weight_norm(self, layer: Any, adapter_name: str) -> torch.Tensor:
        """``||W + sBA||`` per output, in the magnitude's shape; a constant to autograd."""
        raise NotImplementedError

    def factor(self, layer: Any, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        """``m / norm`` shaped to scale the ``(out, in, ...)`` weight per output, in the base weight's dtype."""
        raise NotImplementedError

    def output_bias(self, bias: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base bias shaped to broadcast over an output."""
        return bias

    def transposed(self, layer: Any) -> bool:
        """Whether the layer stores its weight ``(in, out)`` (GPT-2's ``Conv1D``)."""
        return False

    def base_term(self, layer: Any, dropped: torch.Tensor) -> torch.Tensor:
        """``W x'`` (no bias) for the dropped input."""
        raise NotImplementedError

    # --- the hooks ----------------------------------------------------------------------------------------------
    def create(self, layer: Any, adapter_name: str) -> None:
        """The magnitude starts at ``||W + sBA||``, so the adapted layer starts as LoRA's."""
        with torch.no_grad():
            layer.lora_magnitude_vector[adapter_name] = nn.Parameter(self.weight_norm(layer, adapter_name))

    def update(
        self, layer: Any, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor
    ) -> torch.Tensor:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        dropout, scaling = layer.lora_dropout[adapter_name], layer.scaling[adapter_name]
        dropped = layer.dropped_input(adapter_name, x, A.weight.dtype)
        scale = layer.lora_magnitude_vector[adapter_name] / self.weight_norm(
            layer, adapter_name
        )  # k per output
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = layer.base_layer.bias
            base_no_bias = base_result if bias is None else base_result - self.output_bias(bias, base_result)
        else:  # the base term must see the same dropped input as the LoRA term
            base_no_bias = self.base_term(layer, dropped)
        return (scale - 1) * base_no_bias.to(scale.dtype) + scale * B(A(dropped)) * scaling

    def merged_weight(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return self._fold(layer, adapter_name, weight, delta, self.weight_norm(layer, adapter_name))

    def merge(self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.merged_norm = self.weight_norm(layer, adapter_name)
        return self._fold(layer, adapter_name, weight, delta, self.merged_norm)

    def unmerged_weight(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        fan_in_fan_out = self.transposed(layer)
        factor = self.factor(layer, adapter_name, self.merged_norm)
        self.merged_norm = None
        return oriented(oriented(weight, fan_in_fan_out) / factor, fan_in_fan_out) - delta

    def _fold(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
    ) -> torch.Tensor:
        fan_in_fan_out = self.transposed(layer)
        factor = self.factor(layer, adapter_name, norm)
        return oriented(factor * oriented(weight + delta, fan_in_fan_out), fan_in_fan_out)


class LinearDora(DoraVariant):
    """DoRA on ``nn.Linear``, GPT-2's ``Conv1D`` and bitsandbytes linears: one magnitude per output row, ``(out,)``."""

    def weight_norm(self, layer: Any, adapter_name: str) -> torch.Tensor:
        # built under no_grad, so neither the (out, in) sum nor its graph is kept or even recorded
        with torch.no_grad():
            weight = oriented(layer.base_weight() + layer.delta_weight(adapter_name), layer.fan_in_fan_out)
            return weight.norm(p=2, dim=1).to(adapter_dtype(layer.base_layer.weight))

    def factor(self, layer: Any, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        # (out,) -> (out, 1): one magnitude per output row of the (out, in) weight
        return (
            (layer.lora_magnitude_vector[adapter_name] / norm).unsqueeze(1).to(layer.base_layer.weight.dtype)
        )

    def transposed(self, layer: Any) -> bool:
        return layer.fan_in_fan_out

    def base_term(self, layer: Any, dropped: torch.Tensor) -> torch.Tensor:
        return F.linear(dropped, oriented(layer.base_weight(), layer.fan_in_fan_out).to(dropped.dtype))

    def fusable(self, layer: Any, adapter_name: str, x: torch.Tensor) -> bool:
        # The module path keys the base term on the layer's train/eval mode, the mask on the dropout's: the kernel
        # assumes they agree.
        dropout, magnitude = layer.lora_dropout[adapter_name], layer.lora_magnitude_vector[adapter_name]
        if not isinstance(dropout, nn.Identity) and dropout.training != layer.training:
            return False
        return type(magnitude) is nn.Parameter and magnitude.dtype == x.dtype and magnitude.device == x.device

    def fused_forward(self, layer: Any, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        base, A, B = layer.base_layer, layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        dropout = layer.lora_dropout[adapter_name]  # the base term sees the dropped input only while training
        dropped = x if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
        return FusedDoraLinear.apply(
            x, None if dropped is x else dropped, base.weight, base.bias, A.weight, B.weight,
            layer.lora_magnitude_vector[adapter_name], self.weight_norm(layer, adapter_name),
            layer.scaling[adapter_name], layer.fan_in_fan_out,
        )  # fmt: skip


class ConvDora(DoraVariant):
    """DoRA on ``nn.Conv1d/2d/3d``: one magnitude per output channel, stored ``(1, out, 1, ...)`` as peft does."""

    def weight_norm(self, layer: Any, adapter_name: str) -> torch.Tensor:
        """``||W + sBA||`` over each output channel's kernel, ``(1, out, 1, ...)``; a constant to autograd."""
        with torch.no_grad():
            weight = layer.base_weight() + layer.delta_weight(adapter_name)  # (out, in, *k)
            norm = weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True)  # (out, 1, ...)
            return norm.transpose(0, 1).to(adapter_dtype(layer.base_layer.weight))

    def factor(self, layer: Any, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        # (1, out, 1, ...) -> (out, 1, 1, ...): one magnitude per output channel of the (out, in, *k) weight
        factor = layer.lora_magnitude_vector[adapter_name] / norm
        return factor.transpose(0, 1).to(layer.base_layer.weight.dtype)

    def output_bias(self, bias: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return bias.view((1, -1) + (1,) * (result.dim() - 2))

    def base_term(self, layer: Any, dropped: torch.Tensor) -> torch.Tensor:
        return layer.base_layer._conv_forward(dropped, layer.base_weight().to(dropped.dtype), None)


class FusedDoraLinear(torch.autograd.Function):
    """DoRA's ``base(x) + (k - 1) (x' W^T) + k s (x' A^T) B^T`` with ``k = m / norm`` per output, as one kernel.

    ``x'`` is ``dropped`` (``None`` when it is ``x`` itself) and ``norm`` is ``||W + sBA||`` per output row, a
    constant (no gradient), as on the module path (:meth:`DoraVariant.update`). With ``c = x' W^T + s (x'
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
        x2, d2, w_t = flat_inputs(ctx, x, dropped, weight, bias, scaling, fan_in_fan_out)
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
