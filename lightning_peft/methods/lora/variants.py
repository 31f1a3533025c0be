"""LoRA variants: strategies that change what one adapter of a LoRA layer adds, beside the layer, not inside it.

A :class:`~lightning_peft.methods.lora.layers.LoraLayer` computes plain LoRA, ``base(x) + s B A dropout(x)``, and
merges ``W + s B A``. An adapter that does more holds a :class:`LoraVariant` object in the layer's ``lora_variant``
(one object per adapter; plain adapters have none), and the layer calls its hooks where plain LoRA would compute
the update, fold it into the weight or unfold it. A variant owns its extra state: the tensors in the layer
attributes it declares in ``containers`` (so saved keys stay peft's, e.g. ``lora_magnitude_vector.<adapter>``) and
whatever it must remember between hooks (DoRA's merge-time norms) on the object itself.

Here: the base class (whose hooks are plain LoRA) and :class:`GatedVariant`, a per-input gate on the update
(UniPELT's gated LoRA). DoRA is in :mod:`lightning_peft.methods.lora.dora`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.adapter_layer import NotMergeableError

# The hooks take the layer as ``Any``: importing LoraLayer here would make layers.py and this file import each other.


class LoraVariant:
    """What one adapter of a LoRA layer computes beyond plain LoRA; each hook's default is plain LoRA's.

    Attributes:
        containers: Layer attributes (``ModuleDict``/``ParameterDict`` keyed by adapter name) that hold the
            variant's tensors; every LoRA layer has them, so their keys (and peft's file format) do not depend on
            whether a variant is used.
    """

    containers: ClassVar[dict[str, type[nn.Module]]] = {}

    def update(
        self, layer: Any, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor
    ) -> torch.Tensor:
        """What the adapter adds to ``base_result`` (the output so far) for input ``x``."""
        return layer.adapter_output(adapter_name, x, base_result)

    def fusable(self, layer: Any, adapter_name: str, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_forward` computes exactly what the module path would (the layer's own rules
        - plain modules, no hooks, one dtype - already hold)."""
        return False

    def fused_forward(self, layer: Any, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The whole output, base included, as one fused kernel (only called when :meth:`fusable`)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused kernel.")

    def merged_weight(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """The base ``weight`` with the adapter folded in (``delta = s B A`` in the weight's layout); no side effect."""
        return weight + delta

    def merge(self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """:meth:`merged_weight`, when it is about to be written: the variant may keep what unmerging needs."""
        return self.merged_weight(layer, adapter_name, weight, delta)

    def unmerged_weight(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """The base weight back from a merged ``weight``."""
        return weight - delta


class GatedVariant(LoraVariant):
    """``g(x) * update``: the update (of ``inner``, or plain LoRA) scaled per input by a gate module
    ``(..., in) -> (..., 1)`` in ``layer.lora_gate[adapter]`` (UniPELT; the gate is built by
    :class:`~lightning_peft.methods.composite.gating.GatedLoRA`). Input-dependent, so it neither fuses nor merges."""

    containers: ClassVar[dict[str, type[nn.Module]]] = {"lora_gate": nn.ModuleDict}

    def __init__(self, inner: LoraVariant | None = None) -> None:
        self.inner = inner if inner is not None else LoraVariant()

    def update(
        self, layer: Any, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor
    ) -> torch.Tensor:
        update = self.inner.update(layer, adapter_name, x, base_result)
        return (
            layer.lora_gate[adapter_name](x) * update
        )  # (..., 1) in (0, 1): the update's share for this input

    def merged_weight(
        self, layer: Any, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        raise NotMergeableError(
            f"LoRA adapter '{adapter_name}' is gated per input (UniPELT): its update depends on the input, so it "
            "cannot fold into a weight."
        )


def attach_gate(layer: Any, adapter_name: str, gate: nn.Module) -> None:
    """Gate adapter ``adapter_name`` of a LoRA layer by ``gate`` (``(..., in) -> (..., 1)``), on top of its variant."""
    layer.lora_gate[adapter_name] = gate
    layer.lora_variant[adapter_name] = GatedVariant(layer.lora_variant.get(adapter_name))
