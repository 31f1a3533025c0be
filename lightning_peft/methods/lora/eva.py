"""EVA, Explained Variance Adaptation (Paischer et al. 2024, "One Initialization to Rule Them All",
https://arxiv.org/abs/2410.07170): a data-driven LoRA initialisation.

Each target layer's *inputs* over a few batches are decomposed with an incremental SVD; ``A`` becomes the top
right-singular vectors (the directions the layer's inputs vary most in), ``B = 0``, so the adapted model still
equals the base at step 0 while the first gradients already point along the input's principal directions. The
ranks are then redistributed across layers: every layer offers up to ``round(r * rho)`` components, and the
``sum(r)`` components with the highest explained-variance ratio over all layers win. A layer can end up with
a higher rank than ``r``, a lower one, or none (its LoRA layer is removed). Layers that see the very same input
(``q/k/v`` projections of one attention block) share one SVD.

The numerics follow Hugging Face peft's ``initialize_lora_eva_weights`` (incremental PCA with a seeded
randomised SVD, sign canonicalisation on the right-singular vectors, convergence by cosine similarity ``tau``
between consecutive components), so the same model and batches give peft's ranks and ``A``. The saved adapter is
plain LoRA with per-module ``rank_pattern``/``alpha_pattern``, as peft writes it.

Use it with ``LoRA(init_lora_weights="eva", eva_config=EvaConfig(...))``: :class:`~lightning_peft.PEFTCallback`
runs :func:`initialize_eva_weights` at fit start over the train loader; without a Trainer call it yourself after
:func:`~lightning_peft.inject`.

The data pass (the incremental SVD of each layer's inputs over batches, the rank redistribution) is in
:mod:`.eva_svd`; this module holds the settings and puts the components into the LoRA layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.core.injection import disable_adapters, injection_record, unwrap
from lightning_peft.core.targeting import pattern_value, replace_module
from lightning_peft.methods.lora.eva_svd import (  # the data pass; its public names are importable from here too
    ForwardFn,
    IncrementalSVD,
    default_forward,
    eva_components,
    layer_rows,
    token_mask,
)
from lightning_peft.methods.lora.layers import LoraLayer, LoraLinear

__all__ = [
    "EvaConfig", "ForwardFn", "IncrementalSVD", "check_eva_target", "default_forward", "eva_alpha", "eva_components",
    "eva_config_from", "eva_targets", "fit_to_saved", "initialize_eva_weights", "layer_rows", "resize", "token_mask",
]  # fmt: skip


@dataclass(kw_only=True)
class EvaConfig:
    """EVA's settings (the fields of peft's ``EvaConfig``, plus ``max_batches``).

    Args:
        rho: Each layer may take up to ``round(r * rho)`` components in the redistribution (``>= 1``; 1 keeps
            every layer at ``r``).
        tau: Cosine similarity between consecutive SVD steps' components above which a component has converged.
        use_label_mask: Leave out token positions whose ``labels`` equal ``label_mask_value`` (prompt tokens,
            padding). Only token-level labels (the shape of ``input_ids``) mask; a classifier's ``(batch,)`` labels
            are ignored.
        label_mask_value: The ignored label value.
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: When a layer's rank changes from ``r`` to ``r'``, scale its alpha by ``r' / r``
            too, so every layer's update keeps the same scale.
        max_batches: Give up (with an error) if the components have not converged after this many batches; peft
            loops over the data until they do. Not written to ``adapter_config.json``.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True
    max_batches: int = 1000

    def __post_init__(self) -> None:
        if not self.rho >= 1.0:
            raise ValueError(f"EvaConfig rho={self.rho!r} must be >= 1.0 (1.0: no rank redistribution).")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(
                f"EvaConfig tau={self.tau!r} must be in [0, 1] (a cosine similarity; peft: 0.99)."
            )
        if not isinstance(self.max_batches, int) or self.max_batches < 1:
            raise ValueError(f"EvaConfig max_batches={self.max_batches!r} must be an integer >= 1.")

    def to_peft(self) -> dict[str, Any]:
        """The ``eva_config`` entry of peft's ``adapter_config.json`` (peft's fields only)."""
        return {
            "rho": self.rho, "tau": self.tau, "use_label_mask": self.use_label_mask,
            "label_mask_value": self.label_mask_value, "whiten": self.whiten,
            "adjust_scaling_factors": self.adjust_scaling_factors,
        }  # fmt: skip


def eva_config_from(value: EvaConfig | Mapping[str, Any] | None) -> EvaConfig:
    """An :class:`EvaConfig` from itself, a dict (YAML, ``adapter_config.json``) or ``None`` (the defaults)."""
    if isinstance(value, EvaConfig):
        return value
    if value is None:
        return EvaConfig()
    if not isinstance(value, Mapping):
        raise TypeError(f"eva_config must be an EvaConfig or a dict of its fields, got {value!r}.")
    known = set(EvaConfig.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"eva_config has unknown fields {unknown}; known: {sorted(known)}.")
    return EvaConfig(**value)


# --- applying it to an injected model ---------------------------------------------------------------------
def eva_targets(model: nn.Module, adapter_name: str, r: int, rank_pattern: dict[str, int]) -> dict[str, int]:
    """``{name: configured rank}`` of the LoRA layers holding ``adapter_name``."""
    return {
        name: int(pattern_value(name, rank_pattern, r))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    }


def check_eva_target(name: str, layer: LoraLayer, r: int, rho: float) -> None:
    """Refuse, at injection, a layer EVA cannot initialise (as peft, EVA covers Linear and GPT-2 Conv1D)."""
    if not isinstance(layer, LoraLinear):
        raise ValueError(
            f"LoRA init_lora_weights='eva': EVA initialises Linear and Conv1D layers only; {name} is "
            f"{type(layer.base_layer).__name__}. Exclude it (exclude_modules) or use another init."
        )
    if round(r * rho) > layer.in_features:
        raise ValueError(
            f"LoRA init_lora_weights='eva': {name} has {layer.in_features} input features, fewer than "
            f"round(r * rho) = {round(r * rho)} components; lower r or EvaConfig.rho (or set rank_pattern)."
        )


@torch.no_grad()
def initialize_eva_weights(
    model: nn.Module,
    batches: Iterable | None = None,
    adapter_name: str = "default",
    forward_fn: ForwardFn = default_forward,
    components: dict[str, torch.Tensor] | None = None,
    broadcast: Callable[[Any], Any] | None = None,
) -> dict[str, int]:
    """Run EVA on a model injected with ``LoRA(init_lora_weights="eva")``: resize every layer to its redistributed
    rank, set ``A`` to its components and ``B = 0`` (layers given rank 0 lose their LoRA layer).

    Args:
        model: The injected model.
        batches: Batches of model inputs (a DataLoader or a list), iterated cyclically until EVA converges.
        adapter_name: The EVA adapter.
        forward_fn: ``(model, batch) -> output``; default :func:`default_forward`.
        components: Precomputed ``{name: A}`` (e.g. from :func:`eva_components` on another process) instead of
            ``batches``.
        broadcast: Makes every process use the same result (``trainer.strategy.broadcast``: rank 0's).

    Returns:
        ``{module name: rank}`` after redistribution.
    """
    model = unwrap(model)
    record = injection_record(model)
    method = record.methods.get(adapter_name) if record is not None else None
    if method is None or getattr(method, "init_lora_weights", None) != "eva":
        raise ValueError(
            f"initialize_eva_weights needs adapter '{adapter_name}' injected with LoRA(init_lora_weights='eva'); "
            f"this model has {sorted(record.methods) if record else 'no adapters'}."
        )
    config = eva_config_from(method.eva_config)
    layers = eva_targets(model, adapter_name, method.r, method.rank_pattern)
    if components is None:
        if batches is None:
            raise ValueError("initialize_eva_weights needs batches (a DataLoader or a list) or components.")
        with disable_adapters(model):
            components = eva_components(model, layers, batches, config, forward_fn, method.r)
    if broadcast is not None:
        components = broadcast({k: v.cpu() for k, v in components.items()})
    ranks = {}
    for name, r in layers.items():
        layer = model.get_submodule(name)
        u = components[name]
        ranks[name] = rank = u.shape[0]
        if rank == 0:
            if len(layer.r) > 1:
                raise ValueError(
                    f"EVA gave {name} rank 0, but the layer holds other adapters {sorted(layer.r)}."
                )
            replace_module(model, name, layer.base_layer)
            continue
        alpha = eva_alpha(pattern_value(name, method.alpha_pattern, method.alpha), r, rank, config)
        if rank != r:
            resize(layer, adapter_name, rank, alpha, method.use_rslora)
        weight = layer.lora_A[adapter_name].weight
        weight.copy_(u.to(weight))
        layer.lora_B[adapter_name].weight.zero_()
    return ranks


def eva_alpha(alpha: float, r: int, rank: int, config: EvaConfig) -> float:
    """A layer's alpha after EVA moved its rank from ``r`` to ``rank`` (peft's arithmetic, so files agree)."""
    if rank != r and config.adjust_scaling_factors:
        alpha *= rank / r
    return alpha


def resize(layer: LoraLayer, adapter_name: str, rank: int, alpha: float, use_rslora: bool) -> None:
    """Give ``layer``'s adapter new ``A (rank, in)`` and ``B (out, rank)`` (``B`` zero) and the matching scale."""
    old = layer.lora_A[adapter_name].weight
    trainable = old.requires_grad
    layer.r[adapter_name] = rank
    layer.scaling[adapter_name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    layer.create_weights(adapter_name, rank, device=old.device, dtype=old.dtype)
    layer.lora_A[adapter_name].train(layer.training)
    layer.lora_B[adapter_name].train(layer.training)
    torch.nn.init.zeros_(layer.lora_B[adapter_name].weight)
    for p in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight):
        p.requires_grad_(trainable)


def fit_to_saved(model: nn.Module, adapter_name: str, alpha_of: Callable[[str, int], float], use_rslora: bool,
                 shapes: dict[str, torch.Size | None]) -> None:  # fmt: skip
    """Give each EVA layer the rank its saved ``lora_A`` has (``shapes[name]``; ``None``: not saved, rank 0), so
    a checkpoint written after EVA loads into a freshly injected model."""
    for name, shape in shapes.items():
        layer = model.get_submodule(name)
        if shape is None:
            replace_module(model, name, layer.base_layer)
        elif shape[0] != layer.r[adapter_name]:
            resize(layer, adapter_name, shape[0], alpha_of(name, shape[0]), use_rslora)
