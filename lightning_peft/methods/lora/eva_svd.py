"""EVA's data pass (see :mod:`.eva`): each target layer's inputs over training batches, decomposed by an
incremental SVD that accumulates per layer from batch to batch until its components converge, then the ranks
redistributed across the layers by explained variance (:func:`eva_components`).

It knows no LoRA layer: :mod:`.eva` gives it the target modules and their ranks and puts the components it returns
into the adapters. Its settings come as an :class:`~lightning_peft.methods.lora.eva.EvaConfig` (any object with
the fields of :class:`SVDSettings`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]
#: ``rho`` above this is capped at ``max(parameter dim) // r`` (a layer cannot offer more components than that).
_RHO_CAP = 1000


class SVDSettings(Protocol):
    """The fields of :class:`~lightning_peft.methods.lora.eva.EvaConfig` the data pass reads (documented there)."""

    rho: float
    tau: float
    use_label_mask: bool
    label_mask_value: int
    whiten: bool
    max_batches: int


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


def token_mask(batch: Any, config: SVDSettings) -> torch.Tensor | None:
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
    config: SVDSettings,
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
