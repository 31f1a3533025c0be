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
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.injection import disable_adapters, injection_record, unwrap
from lightning_peft.core.targeting import pattern_value, replace_module
from lightning_peft.methods.lora.layers import LoraLayer, LoraLinear

ForwardFn = Callable[[nn.Module, Any], Any]
#: ``rho`` above this is capped at ``max(parameter dim) // r`` (a layer cannot offer more components than that).
_RHO_CAP = 1000


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


class IncrementalSVD:
    """Incremental PCA (Ross et al. 2008, as in scikit-learn's ``IncrementalPCA``) of rows fed batch by batch.

    Each :meth:`partial_fit` decomposes ``[diag(S) V^T; X - mean(X); mean correction]``: the previous components
    scaled by their singular values stand in for all rows seen so far. The SVD is torch's randomised
    ``svd_lowrank`` (``q = 2 n``, 4 subspace iterations) under a fixed seed, so it is reproducible; signs are
    fixed so that each component's largest-magnitude entry is positive. The running mean and variance are float64.
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components, self.seed, self.niter = n_components, seed, niter
        self.components: torch.Tensor | None = None  # (n, features)
        self.singular_values: torch.Tensor | None = None  # (n,)
        self.explained_variance_ratio: torch.Tensor | None = None  # (n,)
        self.mean: torch.Tensor | None = None  # (features,) float64
        self.var: torch.Tensor | None = None
        self.seen = torch.tensor([0])

    def _mean_and_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Running mean and (biased) variance after ``X``, by Chan et al.'s pairwise update, in float64."""
        n_new = torch.tensor([X.shape[0]], device=X.device)
        total = self.seen + n_new
        old_sum = (
            torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
            if self.mean is None
            else self.mean * self.seen
        )
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (old_sum + new_sum) / total
        centred = X - new_sum / n_new  # float64
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_unnormalised = centred.square().sum(dim=0, dtype=torch.float64) - correction / n_new
        if self.var is None:
            return mean, new_unnormalised / total, total
        ratio = self.seen.double() / n_new
        unnormalised = (
            self.var * self.seen + new_unnormalised + ratio / total * (old_sum / ratio - new_sum).square()
        )
        return mean, unnormalised / total, total

    def partial_fit(self, X: torch.Tensor) -> None:
        """Fold the rows of ``X`` (rows, features) into the decomposition."""
        X = X.to(torch.float32).clone()
        rows, features = X.shape
        if self.components is None:
            self.seen = torch.tensor([0], device=X.device)
        if self.n_components > min(rows, features):
            raise ValueError(
                f"IncrementalSVD: {self.n_components} components need at least as many rows and features; got "
                f"{rows} rows of {features} features."
            )
        mean, var, total = self._mean_and_var(X)
        if self.components is None:
            X -= mean
        else:
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            # The shift between the old mean and this batch's, weighted as that many rows: (1, features)
            shift = torch.sqrt(self.seen.double() / total * rows) * (self.mean - batch_mean)
            X = torch.vstack((self.singular_values.view(-1, 1) * self.components, X, shift))
        with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(X, q=2 * self.n_components, niter=self.niter)
        Vh = V.mH
        # Signs: each right-singular vector's largest |entry| positive (deterministic across runs and libraries).
        signs = torch.sign(Vh[torch.arange(Vh.shape[0]), Vh.abs().argmax(dim=1)])
        Vh = Vh * signs.view(-1, 1)
        n = self.n_components
        self.components, self.singular_values = Vh[:n], S[:n]
        self.explained_variance_ratio = (S.square() / torch.sum(var * total))[:n]
        self.mean, self.var, self.seen = mean, var, total


# --- which rows a layer's SVD sees --------------------------------------------------------------------------
def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict batch (its tensors), ``model(batch)`` for a tensor, ``model(batch[0])`` for a
    tuple or list (``(inputs, targets)``)."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(
        f"EVA cannot feed a batch of type {type(batch).__name__} to the model; pass forward_fn=(model, batch) -> "
        "output to initialize_eva_weights (or give the train loader dict batches of model inputs)."
    )


def token_mask(batch: Any, config: EvaConfig) -> torch.Tensor | None:
    """The ``(B, T)`` mask of the positions whose layer inputs the SVD uses: ``attention_mask`` 1 and, with
    ``use_label_mask``, token labels other than ``label_mask_value``. ``None`` (every position) for batches that
    are not dicts with ``input_ids``."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != config.label_mask_value)
    return mask


def layer_rows(x: Any, mask: torch.Tensor | None, layer_name: str) -> torch.Tensor:
    """The ``(rows, in)`` inputs of one layer call: the chosen token positions, else every position."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA: {layer_name} was called with {type(x).__name__}, not a tensor.")
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]  # (B, T, in) -> (N, in), the chosen positions in row-major order
    # Other layouts (a decoder's own length in an encoder-decoder, pooled or image inputs): every position.
    return x.reshape(-1, x.shape[-1])


class _Recorder:
    """A forward hook that keeps a layer's input rows of the current batch (set ``mask`` per batch)."""

    def __init__(self, name: str) -> None:
        self.name, self.mask, self.rows = name, None, None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.rows = layer_rows(args, self.mask, self.name).detach()


# --- the algorithm --------------------------------------------------------------------------------------------
@torch.no_grad()
def eva_components(
    model: nn.Module,
    layers: dict[str, int],
    batches: Iterable,
    config: EvaConfig,
    forward_fn: ForwardFn = default_forward,
    r: int | None = None,
) -> dict[str, torch.Tensor]:
    """The EVA ``A`` of every layer in ``layers`` (``{module name: configured rank}``): ``(rank', in)`` tensors,
    ``rank'`` after redistribution (0 rows: the layer gets no adapter). ``batches`` is iterated (cyclically) until
    every component a layer needs has converged. ``r``: the method's rank, for the cap on a huge ``rho``."""
    budget = sum(layers.values())
    rho = config.rho
    if rho > _RHO_CAP:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // (r or max(layers.values())))
    max_components = {name: round(rank * rho) for name, rank in layers.items()}
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    recorders = {name: _Recorder(name) for name in layers}
    handles = {name: model.get_submodule(name).register_forward_hook(rec) for name, rec in recorders.items()}
    training = model.training
    model.eval()
    try:
        first = _to(next(iter(batches)), device)
        mask = token_mask(first, config)
        for rec in recorders.values():
            rec.mask = mask
        forward_fn(model, first)
        # Layers fed the very same tensor (q/k/v of one block) share one SVD: the first of them ("leader").
        leader_of = _equal_inputs({name: rec.rows for name, rec in recorders.items()})
        for leader in set(leader_of.values()):  # one SVD per group: as many components as its widest member
            group = [n for n, lead in leader_of.items() if lead == leader]
            widest = max(max_components[n] for n in group)
            max_components.update(dict.fromkeys(group, widest))
        _refuse_too_many_components(model, max_components)
        leaders = [n for n in layers if leader_of[n] == n]
        svds = {n: IncrementalSVD(max_components[n]) for n in leaders}
        converged = {n: torch.zeros(max_components[n], dtype=torch.bool) for n in leaders}
        done = dict.fromkeys(leaders, False)
        for name in layers:
            if name not in leaders:
                handles.pop(name).remove()
        # The redistribution's order: leaders, then the followers (ties in the explained variance break by it).
        order = leaders + [n for lead in leaders for n in layers if leader_of[n] == lead and n != lead]
        ranks = dict(max_components)
        for step, batch in enumerate(itertools.cycle(batches)):
            for name in leaders:
                ready = bool(converged[name][: ranks[name]].all())
                if ready and not done[name]:
                    handles.pop(name).remove()
                    done[name] = True
                elif done[name] and not ready:  # its share grew past what has converged: back to work
                    handles[name] = model.get_submodule(name).register_forward_hook(recorders[name])
                    done[name] = False
            if all(done.values()):
                break
            if step >= config.max_batches:
                waiting = [n for n in leaders if not done[n]]
                raise RuntimeError(
                    f"EVA: the components of {len(waiting)} layers (e.g. {waiting[:3]}) had not converged to "
                    f"tau={config.tau} after max_batches={config.max_batches} batches. Lower EvaConfig.tau, raise "
                    "max_batches, or give more varied data."
                )
            batch = _to(batch, device)
            mask = token_mask(batch, config)
            for name in leaders:
                recorders[name].mask, recorders[name].rows = mask, None
            forward_fn(model, batch)
            for name in leaders:
                rows = recorders[name].rows
                if done[name] or rows is None:
                    continue
                if rows.shape[0] < max_components[name]:
                    continue  # fewer rows than components: this batch is skipped for the layer (as in peft)
                svd = svds[name]
                previous = None if svd.components is None else svd.components.clone()
                svd.partial_fit(rows)
                if previous is not None:
                    converged[name] = F.cosine_similarity(svd.components, previous) >= config.tau
            if all(svd.components is not None for svd in svds.values()):
                ranks = _redistribute(svds, leader_of, order, budget, max_components)
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)
    result = {}
    for name in layers:
        svd, rank = svds[leader_of[name]], ranks[name]
        if svd.components is None:
            raise RuntimeError(
                f"EVA: {name} never saw a batch with {max_components[name]} usable token positions."
            )
        u = svd.components[:rank]
        if config.whiten:
            u = u / svd.singular_values[:rank].sqrt().view(-1, 1)
        result[name] = u.clone()
    return result


def _redistribute(
    svds: dict[str, IncrementalSVD],
    leader_of: dict[str, str],
    order: list[str],
    budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:
    """Ranks: the ``budget`` components with the highest explained-variance ratio over every layer."""
    owners, ratios = [], []
    for name in order:
        for value in svds[leader_of[name]].explained_variance_ratio[: max_components[name]]:
            owners.append(name)
            ratios.append(value)
    best = torch.stack(ratios).argsort(descending=True)[:budget]
    counts = Counter(owners[i] for i in best)
    ranks = {name: counts.get(name, 0) for name in order}
    for name in order:
        leader = leader_of[name]
        if (
            leader != name and ranks[leader] < ranks[name]
        ):  # the layer that holds the SVD keeps the larger share
            ranks[leader], ranks[name] = ranks[name], ranks[leader]
    return ranks


def _equal_inputs(rows: dict[str, torch.Tensor | None]) -> dict[str, str]:
    """``{layer: the first layer whose first-batch input equals its own}`` (itself if none)."""
    leader_of: dict[str, str] = {}
    seen: list[str] = []
    for name, x in rows.items():
        if x is None:
            raise RuntimeError(f"EVA: {name} was not called by the model's forward on the first batch.")
        match = next((s for s in seen if rows[s].shape == x.shape and torch.equal(rows[s], x)), None)
        leader_of[name] = match or name
        if match is None:
            seen.append(name)
    return leader_of


def _refuse_too_many_components(model: nn.Module, max_components: dict[str, int]) -> None:
    for name, n in max_components.items():
        width = model.get_submodule(name).in_features
        if n > width:
            raise ValueError(
                f"EVA: {name} has {width} input features but may take round(r * rho) = {n} components; lower r "
                "or EvaConfig.rho (or set rank_pattern for this module)."
            )


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


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
