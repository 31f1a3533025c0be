"""Weighted combinations of LoRA adapters (``add_weighted_adapter``), as Hugging Face ``peft``'s.

Two families. The *factor-wise* types (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``)
merge the ``A`` matrices among themselves and the ``B`` matrices among themselves, so they need equal ranks and keep
that rank; they are cheap but approximate (``B A`` of merged factors has cross terms ``B_i A_j``). The *SVD* types
(``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) merge the full updates
``s_i B_i A_i`` with the same rule and refactor the result by a truncated SVD, so ranks may differ. ``cat`` stacks the
factors: exact, rank = sum of ranks.

The merge rules, on task tensors ``t_i`` (factors or updates) with weights ``w_i``:

- linear (task arithmetic, Ilharco et al. 2023): ``sum_i w_i t_i``.
- magnitude_prune: keep the ``density`` fraction of each ``t_i`` with the largest magnitude, then ``sum_i w_i t_i``.
- TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each ``t_i`` as magnitude_prune does; elect a
  sign per entry (``"total"``: the sign of ``sum_i t_i``; ``"frequency"``: of ``sum_i sign(t_i)``; ties go to +);
  disjoint merge: the mean of ``w_i t_i`` over the ``i`` whose trimmed entry is non-zero and has the elected sign.
- DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop each entry of ``t_i`` with probability
  ``1 - density`` and rescale the kept ones by ``1 / density`` (the expectation is unchanged); then linear
  (``dare_linear``) or TIES' sign election and disjoint merge (``dare_ties``).

As in peft, the weights enter after trimming and sign election (the vote uses the unweighted ``t_i``), and the
factor-wise types weight ``A_i`` by ``sign(w_i s_i) sqrt(|w_i s_i|)`` and ``B_i`` by ``sqrt(|w_i s_i|)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers, oriented
from lightning_peft.core.injection import inject, require_record, set_adapter
from lightning_peft.methods.lora.layers import LoraLayer, LoraLinear
from lightning_peft.methods.lora.lora import LoRA

CombinationType = Literal[
    "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
]  # fmt: skip
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: CombinationType = "cat",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights``, as peft's ``add_weighted_adapter``.

    ``"cat"`` is exact: the new adapter's rank is the sum of the ranks, ``A`` stacks ``w_i * s_i * A_i`` and ``B``
    stacks ``B_i``, so its update is ``sum_i w_i * s_i * B_i A_i``. The factor-wise types (``"linear"``, ``"ties"``,
    ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``) need equal ranks and keep that rank; ``"linear"``'s
    update is the weighted sum of the updates *plus cross terms* ``B_i A_j`` (``i != j``). The ``*_svd`` types (and
    ``"svd"``) merge the updates ``s_i B_i A_i`` themselves and keep the top ``svd_rank`` singular directions:
    ``B = U_r diag(S_r)``, ``A = Vh_r``; exact when ``svd_rank`` reaches the rank of the merged update. See the
    module docstring for the merge rules. The new adapter has scale 1 and is not made active (use
    :func:`lightning_peft.set_adapter`).

    Unlike peft, a single adapter gets the requested combination too (peft silently uses ``"linear"`` for one
    adapter, ignoring ``density`` and ``svd_rank``), and an ``svd_rank`` above ``min(out, in)`` of a layer is
    lowered to it there (lossless) where peft fails.

    Args:
        model: A model holding the LoRA ``adapters``.
        adapters: Names of the adapters to combine.
        weights: One finite weight per adapter (negative subtracts).
        adapter_name: Name of the new adapter.
        combination_type: One of ``"cat"``, ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
            ``"magnitude_prune"``, ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
            ``"magnitude_prune_svd"``.
        svd_rank: Rank of the new adapter (SVD types); the largest rank among ``adapters`` by default.
        svd_clamp: Quantile in (0, 1] of the SVD factors' entries; both factors are clamped to ``[-q, q]``
            (SVD types; no clamping by default).
        svd_full_matrices: Passed to ``torch.linalg.svd`` (SVD types).
        svd_driver: cuSOLVER driver for ``torch.linalg.svd`` on CUDA: ``"gesvd"``, ``"gesvdj"`` or ``"gesvda"``.
        density: Fraction of entries kept, in (0, 1]; required by the TIES, DARE and magnitude-prune types.
        majority_sign_method: ``"total"`` or ``"frequency"``, the sign election of the TIES types.
        seed: Seeds a fresh generator for DARE's random drops (DARE types), so a call is reproducible.
        generator: A ``torch.Generator`` for DARE's drops instead (on the adapters' device). With neither, the
            global RNG: ``torch.manual_seed(s)`` right before the call gives the masks of ``seed=s`` (this call
            draws nothing else from it). The masks are drawn in peft's order (layers in module order; per layer
            A_1..A_n then B_1..B_n, or the updates 1..n for the SVD types), so they equal peft's when its global
            RNG is seeded with ``s`` after it initialises the new adapter (peft draws that init first).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: unknown or non-LoRA adapters, mismatched lengths, non-finite weights, DoRA/gated adapters,
            adapters on different modules or on non-Linear layers, unequal ranks for the factor-wise types, an
            unknown ``combination_type``, or an option out of range or not used by ``combination_type``.
    """
    record = require_record(model)
    adapters, weights = list(adapters), [float(w) for w in weights]
    kind = combination_type
    _check_options(kind, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method,
                   seed, generator)  # fmt: skip
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"Give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights}: every weight must be finite.")
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
        if getattr(method, "target_parameters", None):
            raise ValueError(
                f"Adapter '{adapter}' adapts parameters directly (target_parameters): weighted combinations are "
                "defined for LoRA on modules only (as in peft). Combine adapters without target_parameters."
            )
    # Module order (not sorted names): the DARE masks draw from the RNG layer by layer, in peft's order.
    layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, LoraLayer)}
    holding = {a: [n for n, layer in layers.items() if a in layer.r] for a in adapters}
    targets = holding[adapters[0]]
    for adapter in adapters[1:]:
        if holding[adapter] != targets:
            raise ValueError(
                f"Adapters '{adapters[0]}' and '{adapter}' adapt different modules "
                f"({sorted(set(targets) ^ set(holding[adapter]))[:3]} ...); only adapters on the same modules can be "
                "combined."
            )
    for name in targets:
        layer = layers[name]
        if not isinstance(layer, LoraLinear) or any(a in layer.lora_variant for a in adapters):
            raise ValueError(
                f"{name} ({type(layer.base_layer).__name__}) cannot be combined: weighted adapters support plain "
                "(ungated) LoRA on Linear/Conv1D layers."
            )
    ranks = _new_ranks({n: layers[n] for n in targets}, adapters, kind, svd_rank)
    devices = {layers[n].lora_A[a].weight.device for n in targets for a in adapters}
    if svd_driver is not None and any(d.type != "cuda" for d in devices):
        raise ValueError(
            f"svd_driver={svd_driver!r} selects a cuSOLVER driver, but the adapters are on {sorted(map(str, devices))}; "
            "drop svd_driver (or move the model to CUDA)."
        )
    if generator is not None and any(d.type != generator.device.type for d in devices):
        raise ValueError(
            f"generator is on {generator.device}, the adapters on {sorted(map(str, devices))}; pass a generator on "
            "their device, or seed=... instead."
        )
    rng = _generator_source(seed, generator)

    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    first = record.methods[adapters[0]]
    # alpha = r gives scale 1: the weights and scales are folded into A (and B) below, as peft does.
    # A plain LoRA even when combining QLoRA adapters: the base is already in place, only A and B are new.
    method = dataclasses.replace(
        LoRA(**{f.name: getattr(first, f.name) for f in dataclasses.fields(LoRA)}),
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
    # The new factors are overwritten below: their random init must not consume the caller's RNG (DARE's masks
    # are then the first draws after the caller's torch.manual_seed).
    cuda = sorted(
        {d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"}
    )
    with torch.random.fork_rng(devices=cuda):
        inject(model, method, adapter_name)
    with torch.no_grad():
        for name in targets:
            layer = layers[name]
            if kind == "cat":
                A, B = _concatenated(layer, adapters, weights)
            elif kind in SVD:
                merged = _merge(kind, [_update(layer, a) for a in adapters], weights, density, majority_sign_method,
                                rng)  # fmt: skip
                A, B = _truncated_svd(
                    oriented(merged, layer.fan_in_fan_out),
                    ranks[name],
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )
            else:
                A, B = _factor_wise(layer, adapters, weights, kind, density, majority_sign_method, rng)
            layer.lora_A[adapter_name].weight.copy_(A)
            layer.lora_B[adapter_name].weight.copy_(B)
    set_adapter(model, previous_active)
    return model


def _check_options(
    kind: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
    density: float | None,
    majority_sign_method: str,
    seed: int | None,
    generator: torch.Generator | None,
) -> None:
    """Refuse, before anything changes, an unknown type, an option out of range, or one ``kind`` would ignore."""
    if kind not in ("cat", *FACTOR_WISE, *SVD):
        raise ValueError(
            f"combination_type={kind!r}: use 'cat' (exact), one of {list(FACTOR_WISE)} (equal ranks) or one of "
            f"{list(SVD)} (SVD of the merged update)."
        )
    base = kind.removesuffix("_svd")
    pruned, sign_elected, random = base in ("ties", "dare_linear", "dare_ties", "magnitude_prune"), base in (
        "ties", "dare_ties"), base.startswith("dare")  # fmt: skip
    given = {
        "svd_rank": svd_rank is not None, "svd_clamp": svd_clamp is not None,
        "svd_full_matrices": svd_full_matrices is not True, "svd_driver": svd_driver is not None,
        "density": density is not None, "majority_sign_method": majority_sign_method != "total",
        "seed": seed is not None, "generator": generator is not None,
    }  # fmt: skip
    used = {
        "svd_rank": kind in SVD, "svd_clamp": kind in SVD, "svd_full_matrices": kind in SVD, "svd_driver": kind in SVD,
        "density": pruned, "majority_sign_method": sign_elected, "seed": random, "generator": random,
    }  # fmt: skip
    ignored = [option for option in given if given[option] and not used[option]]
    if ignored:
        raise ValueError(
            f"combination_type={kind!r} does not use {ignored}; drop them or choose a type that does."
        )
    if pruned and (density is None or not 0 < density <= 1):
        raise ValueError(
            f"combination_type={kind!r} needs density in (0, 1] (the fraction of entries kept), got {density}."
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r}: use 'total' or 'frequency'.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank={svd_rank!r}: use a positive int (or None for the largest adapter rank).")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ValueError(f"svd_clamp={svd_clamp!r}: use a quantile in (0, 1] (or None for no clamping).")
    if svd_driver is not None and svd_driver not in SVD_DRIVERS:
        raise ValueError(f"svd_driver={svd_driver!r}: use one of {list(SVD_DRIVERS)} or None.")
    if seed is not None and generator is not None:
        raise ValueError("Give seed or generator, not both.")


def _new_ranks(
    layers: dict[str, LoraLinear], adapters: list[str], kind: str, svd_rank: int | None
) -> dict[str, int]:
    if kind in SVD:
        # peft's default: the largest rank among the adapters, for every layer
        rank = svd_rank or max(layer.r[a] for layer in layers.values() for a in adapters)
        return {n: min(rank, layer.in_features, layer.out_features) for n, layer in layers.items()}
    ranks = {}
    for name, layer in layers.items():
        layer_ranks = [layer.r[a] for a in adapters]
        if kind in FACTOR_WISE and len(set(layer_ranks)) != 1:
            raise ValueError(
                f"combination_type={kind!r} needs equal ranks, but {name} has ranks "
                f"{dict(zip(adapters, layer_ranks, strict=True))}; use 'cat' or an SVD type (e.g. 'svd', 'ties_svd')."
            )
        ranks[name] = sum(layer_ranks) if kind == "cat" else layer_ranks[0]
    return ranks


def _generator_source(
    seed: int | None, generator: torch.Generator | None
) -> Callable[[torch.device], torch.Generator | None]:
    """The generator DARE draws from on a device: the given one, one seeded per device, or None (global RNG)."""
    seeded: dict[torch.device, torch.Generator] = {}

    def source(device: torch.device) -> torch.Generator | None:
        if seed is None:
            return generator
        if device not in seeded:
            seeded[device] = torch.Generator(device=device).manual_seed(seed)
        return seeded[device]

    return source


def _update(layer: LoraLinear, adapter: str) -> torch.Tensor:
    """``s * B @ A`` in the base weight's layout ((in, out) for GPT-2's Conv1D), in at least float32.

    That layout, not (out, in), because DARE draws its masks entry by entry in it, as peft does.
    """
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dtype = torch.promote_types(A.dtype, torch.float32)
    update = (B.to(dtype) @ A.to(dtype)) * layer.scaling[adapter]  # (out, r) @ (r, in) -> (out, in)
    return oriented(update, layer.fan_in_fan_out)


def _concatenated(
    layer: LoraLinear, adapters: list[str], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    As = [layer.lora_A[a].weight for a in adapters]  # (r_i, in)
    Bs = [layer.lora_B[a].weight for a in adapters]  # (out, r_i)
    scales = [w * layer.scaling[a] for a, w in zip(adapters, weights, strict=True)]
    # [B_1 ... B_n] @ [w_1 s_1 A_1; ...; w_n s_n A_n] = sum_i w_i s_i B_i A_i: (out, sum r) @ (sum r, in)
    return torch.cat([s * A for s, A in zip(scales, As, strict=True)]), torch.cat(Bs, dim=1)


def _factor_wise(
    layer: LoraLinear, adapters: list[str], weights: list[float], kind: str, density: float | None,
    sign_method: str, rng: Callable[[torch.device], torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    scales = [w * layer.scaling[a] for a, w in zip(adapters, weights, strict=True)]
    # sqrt(|w s|) on both factors, the sign on A only: B_i A_i is then weighted by w_i s_i
    roots = [math.sqrt(abs(s)) for s in scales]
    signed = [math.copysign(root, s) for root, s in zip(roots, scales, strict=True)]
    A = _merge(kind, [layer.lora_A[a].weight for a in adapters], signed, density, sign_method, rng)
    B = _merge(kind, [layer.lora_B[a].weight for a in adapters], roots, density, sign_method, rng)
    return A, B


def _merge(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None, sign_method: str,
    rng: Callable[[torch.device], torch.Generator | None],
) -> torch.Tensor:  # fmt: skip
    """Merge same-shaped task tensors by ``kind``'s rule (its ``_svd`` suffix dropped; ``svd`` is linear)."""
    rule = "linear" if kind == "svd" else kind.removesuffix("_svd")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    tensors = [t.to(dtype) for t in tensors]
    if rule in ("ties", "magnitude_prune"):
        tensors = [_trim(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [_drop_and_rescale(t, density, rng(t.device)) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    w = torch.tensor(weights, dtype=dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if rule not in ("ties", "dare_ties"):
        return (stacked * w).sum(dim=0)
    # Elect a sign per entry from the unweighted tensors, then average the entries that carry it
    votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(dtype)
    agrees = stacked.sign() == elected  # (n, *shape); trimmed (zero) entries never agree
    return (stacked * w * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries (TIES' trim; magnitude pruning)."""
    keep = int(density * tensor.numel())
    if keep >= tensor.numel():
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def _drop_and_rescale(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it (expectation unchanged)."""
    if density >= 1:  # nothing dropped, and no draw from the RNG (as peft)
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _truncated_svd(
    update: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``update ~= B @ A`` with ``B = U_r diag(S_r)`` (out, r) and ``A = Vh_r`` (r, in); optionally clamped."""
    U, S, Vh = torch.linalg.svd(update, full_matrices=full_matrices, driver=driver)
    B, A = U[:, :rank] * S[:rank], Vh[:rank]  # (out, r), (r, in)
    if clamp is not None:
        bound = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-bound, bound), A.clamp(-bound, bound)
    return A, B
