"""Learned gates on LoRA, bottleneck adapters and prefixes: the parts of UniPELT (Mao et al. 2022).

A gate ``g(x) = sigmoid(W x + b)`` in (0, 1) lets the model turn a part up or down for each input (UniPELT,
https://arxiv.org/abs/2110.07577, sec. 3.2): a part that does not help a task can be switched off instead of
hurting it. Each gated part here is the existing method with a gate added through an optional hook of its layer,
not a copy of it:

* :class:`GatedLoRA`: ``W x + g(x) * s * B A x``, ``g`` per token from the layer's input ``x`` (a LoRA variant,
  :class:`~lightning_peft.methods.lora.variants.GatedVariant`; the gate module in ``lora_gate``);
* :class:`GatedAdapter`: ``h + s * g(h) * f(h)``, ``g`` per token from the bottleneck's input ``h``
  (a :class:`GatedBottleneck`, ``Adapter.bottleneck_class``);
* :class:`GatedPrefixTuning`: layer ``i``'s prefix keys and values are multiplied by ``g_i``, computed from that
  attention layer's input ``x`` (``VirtualTokens.prefix_gates``). Keys are shared by every query, so ``g_i`` is
  one value per sequence: the mean of ``sigmoid(W_i x_t + b_i)`` over the sequence's real tokens (AdapterHub
  averages over all positions, padding included; leaving padding out keeps padded batches equal to their
  sequences). A forward pre-hook on each attention module scales the prefix in the cache the module is about to
  read; no attention code is copied. In cached generation the gate is computed once, from the prompt, and kept
  for the generated tokens, as the cache keeps the gated keys and values.

``W`` and ``b`` start as ``nn.Linear`` does, so every gate starts near 0.5. None of the gated parts can merge:
their contribution depends on the input.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer, adapter_layers
from lightning_peft.methods.adapter import Adapter, Bottleneck
from lightning_peft.methods.lora.layers import LoraLayer, LoraLinear
from lightning_peft.methods.lora.lora import LoRA
from lightning_peft.methods.lora.variants import attach_gate
from lightning_peft.methods.prompt.hooks import prefix_record
from lightning_peft.methods.prompt.prefix_tuning import PrefixTuning
from lightning_peft.methods.prompt.prompting import embedding_weight, find_host
from lightning_peft.methods.prompt.virtual_tokens import VirtualTokens, virtual_tokens_layer

_GATE_HOOK = "_lightning_peft_prefix_gate_hook"


class Gate(nn.Linear):
    """``g(x) = sigmoid(W x + b)``: ``(..., dim) -> (..., outputs)``, each value in (0, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x.to(self.weight.dtype)))


class GatedBottleneck(Bottleneck):
    """A :class:`Bottleneck` whose output is scaled per token by a gate on its input: ``g(h) * f(h)``."""

    def build_gate(self, dim: int, device: torch.device | None, dtype: torch.dtype | None) -> Gate:
        return Gate(dim, 1, device=device, dtype=dtype)


@dataclass(kw_only=True)
class GatedLoRA(LoRA):
    """:class:`~lightning_peft.methods.LoRA` with a per-token gate on each update (a UniPELT part).

    Args: those of :class:`~lightning_peft.methods.LoRA`; targets must be linear layers.
    """

    mergeable: ClassVar[bool] = False

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        super().inject_layers(model, adapter_name)
        for name, layer in adapter_layers(model):
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
                continue
            if not isinstance(layer, LoraLinear):
                raise ValueError(
                    f"{self.name} gates LoRA on linear layers; {name} is {type(layer.base_layer).__name__}. "
                    "Choose linear target_modules (e.g. the attention's query and value projections)."
                )
            weight = layer.lora_A[adapter_name].weight
            attach_gate(
                layer, adapter_name, Gate(layer.in_features, 1, device=weight.device, dtype=weight.dtype)
            )


@dataclass(kw_only=True)
class GatedAdapter(Adapter):
    """:class:`~lightning_peft.methods.Adapter` whose bottlenecks are :class:`GatedBottleneck` (a UniPELT part).

    Args: those of :class:`~lightning_peft.methods.Adapter`.
    """

    bottleneck_class: ClassVar[type[Bottleneck]] = GatedBottleneck


@dataclass(kw_only=True)
class GatedPrefixTuning(PrefixTuning):
    """:class:`~lightning_peft.methods.PrefixTuning` with a per-sequence gate on each layer's prefix (a UniPELT part).

    Args: those of :class:`~lightning_peft.methods.PrefixTuning`.
    """

    # One gate per layer index: an encoder-decoder has three such modules.
    encoder_decoders: ClassVar[bool] = False

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        super().inject_layers(model, adapter_name)
        host = find_host(model, self.name)
        _, tokens = virtual_tokens_layer(model)
        attentions = attention_modules(host, tokens.specs[adapter_name].num_layers, self.name)
        weight = next(tokens.prompt_encoder[adapter_name].parameters())
        dim = embedding_weight(tokens.base_layer, self.name).shape[1]  # what each attention layer reads
        tokens.prefix_gates[adapter_name] = nn.ModuleList(
            Gate(dim, 1, device=weight.device, dtype=weight.dtype) for _ in attentions
        )
        host_ref = weakref.ref(host)
        for attention in attentions:  # once per module: the hook serves every gated adapter of the model
            if getattr(attention, _GATE_HOOK, None) is None:
                hook = partial(_gate_prefix, host_ref)
                handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
                object.__setattr__(attention, _GATE_HOOK, handle)


def attention_modules(host: nn.Module, num_layers: int, method: str) -> list[nn.Module]:
    """The modules that read layer ``i``'s cache (found by :func:`~lightning_peft.core.transformers_compat.attention_modules`).

    Raises:
        ValueError: they do not cover layers ``0 .. num_layers - 1`` exactly once.
    """
    found = hf.attention_modules(host, exclude=lambda m: isinstance(m, AdapterLayer))
    indices = [hf.layer_index(m) for m in found]
    if indices != list(range(num_layers)):
        raise ValueError(
            f"{method} gates each layer's prefix in the attention module that reads it: a module with an integer "
            f"`layer_idx` whose forward takes the cache ({' or '.join(hf.CACHE_ARGUMENTS)}). "
            f"{type(host).__name__} has such modules for layers {indices}, expected one for each of "
            f"0..{num_layers - 1}. Give the attention modules `layer_idx` and a cache argument, or use "
            "PrefixTuning (no gates) for this model."
        )
    return found


def sequence_gate(gates: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token gates ``(B, T, 1)`` over the real tokens of ``mask`` ``(B, T)`` -> ``(B, 1)``."""
    if mask is None or tuple(mask.shape) != tuple(gates.shape[:2]):
        return gates.mean(dim=1)
    weights = mask.to(gates.dtype).unsqueeze(-1)  # (B, T, 1)
    return (gates * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    # Named otherwise, or positional: the first argument, as in every transformers attention module.
    return args[0] if args else next(iter(kwargs.values()))


def _gate_prefix(host_ref: weakref.ref, attention: nn.Module, args: tuple, kwargs: dict) -> None:
    host = host_ref()
    tokens = host.get_input_embeddings() if host is not None else None
    if not isinstance(tokens, VirtualTokens):  # unloaded: the hook goes too
        getattr(attention, _GATE_HOOK).remove()
        object.__delattr__(attention, _GATE_HOOK)
        return
    adapter_name = tokens.active_adapter()
    if adapter_name is None or adapter_name not in tokens.prefix_gates:
        return
    cache = hf.module_cache(attention, args, kwargs)
    n = tokens.specs[adapter_name].num_virtual_tokens
    record = prefix_record(host, cache)  # the prefix this cache holds, and the padding mask of the call
    if record is None or (record.adapter_name, record.num_virtual_tokens) != (adapter_name, n):
        return
    index = hf.layer_index(attention)
    if (
        hf.cache_length(cache, index) != n
    ):  # a continuing call: the prefix was gated in the call that wrote it
        return
    hidden = _hidden_states(attention, args, kwargs)  # (B, T, d)
    gate = tokens.prefix_gates[adapter_name][index]
    g = sequence_gate(gate(hidden), record.input_mask)  # (B, 1)
    keys, values = hf.cache_key_values(cache, index)
    g = g.view(-1, 1, 1, 1).to(keys.dtype)  # one factor per sequence on its (n_kv_heads, n, head_dim)
    hf.set_cache_key_values(cache, index, keys * g, values * g)
