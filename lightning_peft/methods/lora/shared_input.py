"""Shared-input LoRA: LoRA layers that read the same input tensor compute their A products as one matmul.

The query, key and value projections of an attention block read the same hidden states, and so do an MLP's gate
and up projections. Separately, each layer's rank-``r`` product ``A x^T`` is a skinny matmul (``r`` rows) that
runs far below BLAS peak, and so are their backward products; concatenating the A weights of the layers reading
``x`` turns them into one ``(sum r, in) @ (in, tokens)`` product forward, one for A's gradient and one for
``x``'s. Each layer then adds ``s B (A x)`` from its own rows into its own base output, as the fused kernel does
(:class:`~lightning_peft.methods.lora.kernels.LoraLinearFromA`); B products are not batched: each is accumulated
into that layer's output by the base matmul's ``addmm``, which a batched product would have to undo.

Which layers share is found at run time, never from names: every enrolled layer notes the tensor object it is
called with, and a run of consecutive calls on the same object (same ``_version``: not modified in between) is a
group. From then on the group's first layer computes the shared product when it is called and leaves each other
member its rows, tagged with the input object, its version, the member's ``A`` (object and version) and the grad
mode; a member uses them only if all of those match its own call, else it computes its own product. So a wrong
guess costs time, never a wrong result. A layer shares only where the fused kernel would run anyway
(:meth:`~lightning_peft.methods.lora.layers.LoraLinear.fusable_adapter`: one plain LoRA adapter active, no
hooks or FSDP units, no quantized base, one dtype, no autocast, no mixed batch) and its dropout is inactive
(``p = 0`` or eval): a dropout mask is drawn per layer, so under train-mode dropout each layer keeps its own
input and its own product. Under ``torch.compile`` it steps aside (the plain fused path).

Opt-in (:func:`share_lora_inputs`): the outputs equal the separate layers' only to fp32 rounding (the summation
order of the shared products differs), and the bookkeeping is Python state that compiled graphs cannot see.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.methods.lora.kernels import LoraLinearFromA, SharedAProduct
from lightning_peft.methods.lora.layers import LoraLinear


@dataclass
class _Rows:
    """A member's rows of a shared A product, and what its call must match to use them."""

    x: weakref.ref
    x_version: int
    A: torch.Tensor
    A_version: int
    grad_enabled: bool
    after_A_t: torch.Tensor  # (r, tokens)

    def match(self, x: torch.Tensor, A: torch.Tensor) -> bool:
        return (
            self.x() is x
            and x._version == self.x_version
            and A is self.A
            and A._version == self.A_version
            and torch.is_grad_enabled() == self.grad_enabled
        )


class SharedInputs:
    """The groups of one model's enrolled layers and the rows handed from a group's first layer to the others."""

    def __init__(self) -> None:
        self.groups: dict[nn.Module, list[nn.Module]] = {}  # first layer -> the run it led last time
        self._rows: dict[nn.Module, _Rows] = {}
        self._run: list[nn.Module] = []
        self._run_x: weakref.ref | None = None
        self._run_version = -1
        self.shared = 0  # A products computed for a group
        self.reused = 0  # calls that used rows handed to them

    def __deepcopy__(
        self, memo: dict
    ) -> SharedInputs:  # a copy relearns its groups (rows hold autograd graphs)
        fresh = SharedInputs()
        memo[id(self)] = fresh
        return fresh

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output through a shared A product, or None: the caller runs its own fused kernel."""
        if torch.compiler.is_compiling() or not _dropout_inactive(layer, adapter_name):
            return None
        self._observe(layer, x)
        A = layer.lora_A[adapter_name].weight
        rows = self._rows.pop(layer, None)
        if rows is not None and rows.match(x, A):
            self.reused += 1
            return _apply(layer, adapter_name, x, rows.after_A_t)
        group = self.groups.get(layer)
        if group is None:
            return None
        members = [(m, name) for m in group if (name := _shareable(m, x)) is not None]
        if len(members) < 2 or members[0][0] is not layer:
            return None
        weights = [m.lora_A[name].weight for m, name in members]
        after_A_t = SharedAProduct.apply(x, *weights)  # (sum r, tokens): one matmul
        parts = after_A_t.split([w.shape[0] for w in weights])
        grad_enabled = torch.is_grad_enabled()
        self.shared += 1
        for (member, _), weight, part in zip(members[1:], weights[1:], parts[1:], strict=True):
            self._rows[member] = _Rows(
                weakref.ref(x), x._version, weight, weight._version, grad_enabled, part
            )
        return _apply(layer, adapter_name, x, parts[0])

    def _observe(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Extend the run of layers called on ``x``, or close it (a group if 2+ long) and start a new one."""
        if self._run_x is not None and self._run_x() is x and x._version == self._run_version:
            self._run.append(layer)
            return
        if self._run:
            if len(self._run) > 1:
                self.groups[self._run[0]] = self._run
            else:
                self.groups.pop(self._run[0], None)
        self._run, self._run_x, self._run_version = [layer], weakref.ref(x), x._version


def _dropout_inactive(layer: LoraLinear, adapter_name: str) -> bool:
    dropout = layer.lora_dropout[adapter_name]
    return isinstance(dropout, nn.Identity) or not dropout.training


def _shareable(layer: nn.Module, x: torch.Tensor) -> str | None:
    """The adapter ``layer`` would run on ``x`` through the plain fused kernel with an inactive dropout, else None."""
    if not isinstance(layer, LoraLinear) or layer.in_features != x.shape[-1]:
        return None
    name = layer.fusable_adapter(x, (), {})
    if name is None or name in layer.lora_variant or not _dropout_inactive(layer, name):
        return None
    return name


def _apply(layer: LoraLinear, adapter_name: str, x: torch.Tensor, after_A_t: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    return LoraLinearFromA.apply(
        x, after_A_t, base.weight, base.bias, layer.lora_B[adapter_name].weight, layer.scaling[adapter_name],
        layer.fan_in_fan_out,
    )  # fmt: skip


def share_lora_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Let ``model``'s LoRA linear layers that read the same input share their A product (see the module docs);
    ``enabled=False`` turns it off. Call it after injecting (layers added later are not enrolled).

    Returns:
        The number of layers enrolled (0 when turning it off).

    Raises:
        ValueError: ``model`` has no LoRA linear layer.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError(
            "share_lora_inputs: the model has no LoRA linear layer; inject LoRA (lightning_peft.inject with "
            "lightning_peft.methods.LoRA) first."
        )
    coordinator = SharedInputs() if enabled else None
    for layer in layers:
        layer.shared_inputs = coordinator
    return len(layers) if enabled else 0
