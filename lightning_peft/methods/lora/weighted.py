"""Weighted combinations of LoRA adapters (``add_weighted_adapter``), as Hugging Face ``peft``'s."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.injection import inject, require_record, set_adapter
from lightning_peft.methods.lora.layers import LoraLayer, LoraLinear
from lightning_peft.methods.lora.lora import LoRA


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: Literal["linear", "cat"] = "cat",
) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights``, as peft's ``add_weighted_adapter``.

    ``"cat"`` is exact: the new adapter's rank is the sum of the ranks, ``A`` stacks ``w_i * s_i * A_i`` and ``B``
    stacks ``B_i``, so its update is ``sum_i w_i * s_i * B_i A_i``. ``"linear"`` needs equal ranks and keeps that
    rank: ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i`` and ``B = sum_i sqrt(|w_i s_i|) B_i``. Its update is the
    weighted sum of the updates *plus cross terms* ``B_i A_j`` (``i != j``), an approximation that is exact only for
    one adapter (or adapters whose cross products vanish); use ``"cat"`` when the exact sum matters.
    The new adapter has scale 1 and is not made active (use :func:`lightning_peft.set_adapter`).

    Args:
        model: A model holding the LoRA ``adapters``.
        adapters: Names of the adapters to combine.
        weights: One weight per adapter.
        adapter_name: Name of the new adapter.
        combination_type: ``"cat"`` (exact) or ``"linear"`` (same ranks; approximate).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: unknown or non-LoRA adapters, mismatched lengths, DoRA/gated adapters, adapters on different
            modules or on non-Linear layers, unequal ranks for ``"linear"``, or an unknown ``combination_type``.
    """
    record = require_record(model)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if combination_type not in ("linear", "cat"):
        raise ValueError(f"combination_type={combination_type!r}: use 'cat' (exact) or 'linear'.")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"Give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights."
        )
    unknown = sorted(set(adapters) - set(record.methods))
    if unknown:
        raise ValueError(f"Unknown adapters {unknown}; this model has {sorted(record.methods)}.")
    for adapter in adapters:
        method = record.methods[adapter]
        if not isinstance(method, LoRA) or method.use_dora:
            raise ValueError(
                f"Adapter '{adapter}' is {method.name}{' with DoRA' if getattr(method, 'use_dora', False) else ''}; "
                "only plain LoRA adapters can be combined."
            )
    layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, LoraLayer)}
    holding = {a: sorted(n for n, layer in layers.items() if a in layer.r) for a in adapters}
    targets = holding[adapters[0]]
    for adapter in adapters[1:]:
        if holding[adapter] != targets:
            raise ValueError(
                f"Adapters '{adapters[0]}' and '{adapter}' adapt different modules "
                f"({sorted(set(targets) ^ set(holding[adapter]))[:3]} ...); only adapters on the same modules can be "
                "combined."
            )
    ranks: dict[str, int] = {}
    for name in targets:
        layer = layers[name]
        if not isinstance(layer, LoraLinear) or any(a in layer.lora_gate for a in adapters):
            raise ValueError(
                f"{name} ({type(layer.base_layer).__name__}) cannot be combined: weighted adapters support plain "
                "(ungated) LoRA on Linear/Conv1D layers."
            )
        layer_ranks = [layer.r[a] for a in adapters]
        if combination_type == "linear" and len(set(layer_ranks)) != 1:
            raise ValueError(
                f"combination_type='linear' needs equal ranks, but {name} has ranks {dict(zip(adapters, layer_ranks, strict=True))}; "
                "use combination_type='cat'."
            )
        ranks[name] = sum(layer_ranks) if combination_type == "cat" else layer_ranks[0]
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    first = record.methods[adapters[0]]
    # alpha = r gives scale 1: the weights and scales are folded into A (and B) below, as peft does.
    # A plain LoRA even when combining QLoRA adapters: the base is already in place, only A and B are new.
    method = LoRA(
        **{f.name: getattr(first, f.name) for f in dataclasses.fields(LoRA)},
    )
    method = dataclasses.replace(
        method,
        target_modules=targets,
        exclude_modules=None,
        r=default_r,
        alpha=default_r,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != default_r},
        alpha_pattern={re.escape(n): r for n, r in ranks.items() if r != default_r},
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        bias="none",
        modules_to_save=None,
    )
    previous_active = record.active
    inject(model, method, adapter_name)
    with torch.no_grad():
        for name in targets:
            layer = layers[name]
            A, B = _combined(layer, adapters, weights, combination_type)
            layer.lora_A[adapter_name].weight.copy_(A)
            layer.lora_B[adapter_name].weight.copy_(B)
    set_adapter(model, previous_active)
    return model


def _combined(
    layer: LoraLinear, adapters: list[str], weights: list[float], combination_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    As = [layer.lora_A[a].weight for a in adapters]  # (r_i, in)
    Bs = [layer.lora_B[a].weight for a in adapters]  # (out, r_i)
    scales = [w * layer.scaling[a] for a, w in zip(adapters, weights, strict=True)]
    if combination_type == "cat":
        # [B_1 ... B_n] @ [w_1 s_1 A_1; ...; w_n s_n A_n] = sum_i w_i s_i B_i A_i: (out, sum r) @ (sum r, in)
        return torch.cat([s * A for s, A in zip(scales, As, strict=True)]), torch.cat(Bs, dim=1)
    roots = [math.sqrt(abs(s)) for s in scales]
    A = sum(math.copysign(root, s) * A for root, s, A in zip(roots, scales, As, strict=True))
    B = sum(root * B for root, B in zip(roots, Bs, strict=True))
    return A, B
