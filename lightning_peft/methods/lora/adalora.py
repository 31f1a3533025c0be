"""AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512): LoRA whose rank is allocated during training.

Each targeted layer gets an update in SVD form, ``y = W x + B diag(E) A x * alpha / init_r`` with left
vectors ``B: (out, r)``, singular values ``E: (r, 1)`` and right vectors ``A: (r, in)``. ``E`` starts at zero
(output unchanged), ``A`` and ``B`` at N(0, 0.02). Training adds ``orth_reg_weight * mean ||A A^T - I||_F,
||B^T B - I||_F`` to the loss so ``A``, ``B`` stay near-orthogonal and ``E`` carries the magnitude: then
zeroing an entry of ``E`` removes one rank-1 triplet cleanly, which is how the rank shrinks.

After every optimizer step (before gradients are zeroed) each weight's importance ``|p * grad|`` is smoothed
by an EMA (``beta1``), and so is its uncertainty ``|importance - EMA|`` (``beta2``); a triplet's score is
``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` with ``s = EMA * uncertainty``. The total budget of triplets falls
on a cubic schedule from ``sum of init_r`` to ``target_r * layers`` between steps ``tinit`` and
``total_step - tfinal``; every ``deltaT`` steps the lowest-scoring triplets beyond the budget are masked
(their ``E`` set to zero). At ``total_step - tfinal`` the allocation is final: the rank pattern is logged and
kept masked to the end, and :func:`~lightning_peft.save_adapter` writes it as ``rank_pattern`` with the
masked triplets dropped from the tensors, as peft does. Loading such a directory builds layers of the final
ranks. The scale stays ``alpha / init_r`` throughout, so nothing is rescaled when triplets are dropped.
The EMAs, the latest masks and the total step are checkpointed by :class:`~lightning_peft.PEFTCallback`
(:meth:`AdaLoRA.training_state`), so resuming mid-allocation reproduces the uninterrupted run bit for bit.

Numerics and names (``lora_A``, ``lora_B``, ``lora_E``) follow Hugging Face ``peft``, so adapters load there.
The budget is computed in integers; peft's float formula can land one lower when the exact budget is an
integer (rare: about one step in a million).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_dtype, adapter_layers, oriented
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.injection import clean_key, injection_record
from lightning_peft.core.targeting import default_targets, find_targets, replace_module
from lightning_peft.core.transformers_compat import Conv1D
from lightning_peft.methods.lora.lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS

#: Defaults per transformers ``model_type``: peft's AdaLoRA table, which budgets over more layers than LoRA's for
#: six families (all attention and feed-forward layers); LoRA's defaults for the families it lacks.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    **LORA_DEFAULT_TARGETS,
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}

_SVD = ("lora_A", "lora_E", "lora_B")
_PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}  # ours -> AdaLoraConfig's
_EPS = 1e-5  # added to init_r in the scale, as peft does (guards r = 0)
_EMA_NAMES = ("exp_avg_ipt", "exp_avg_unc")  # peft's RankAllocator names: importance EMA, uncertainty EMA


def budget_schedule(
    step: int, total_step: int, tinit: int, tfinal: int, init_bgt: int, target_bgt: int
) -> int:
    """Number of triplets kept after optimizer step ``step``: cubic decay from ``init_bgt`` to ``target_bgt``."""
    if step <= tinit:
        return init_bgt
    span = total_step - tfinal - tinit
    remaining = max(0, span - (step - tinit))
    # target + (init - target) * (1 - (step - tinit) / span) ** 3, floored, in exact integer arithmetic
    return target_bgt + (init_bgt - target_bgt) * remaining**3 // span**3


class SVDLayer(AdapterLayer):
    """AdaLoRA around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2; weight stored as (in, out))."""

    adapter_attrs = ("lora_A", "lora_B", "lora_E", "lora_dropout")
    adapter_settings = ("scaling", "ranknum", "kept", "rank_mask", "importance")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = oriented(base_layer.weight, self.fan_in_fan_out).shape
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}  # init_r: the scale's denominator, fixed even after pruning
        #: Which of the init_r original triplets the tensors hold (all, unless built from a saved rank_pattern).
        self.kept: dict[str, list[bool]] = {}
        #: Triplets (rows of the tensors) kept by the latest allocation; absent until the first one.
        self.rank_mask: dict[str, torch.Tensor] = {}
        #: Per adapter and tensor name: (EMA of importance, EMA of its uncertainty).
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def add_adapter(  # type: ignore[override]
        self, adapter_name: str, init_r: int, alpha: float, dropout: float, init: bool, kept: list[bool]
    ) -> None:
        r = sum(kept)
        weight = self.base_layer.weight
        kw = {
            "device": weight.device,
            "dtype": adapter_dtype(weight),
        }
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, **kw))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **kw))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **kw))
        if init:  # else: all random, not a no-op (for testing merges)
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = alpha
        self.ranknum[adapter_name] = float(init_r)
        self.kept[adapter_name] = list(kept)
        self.active_adapters = [*self.active_adapters, adapter_name]

    def rank_pattern(self, adapter_name: str) -> list[bool]:
        """Which of the init_r original triplets are kept (the saved ``rank_pattern`` entry)."""
        mask = self.rank_mask.get(adapter_name)
        rows = iter(mask.tolist() if mask is not None else [True] * self.lora_E[adapter_name].shape[0])
        return [next(rows) if held else False for held in self.kept[adapter_name]]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        scale = self.scaling[adapter_name] / (self.ranknum[adapter_name] + _EPS)
        delta = B @ (A * E) * scale  # (out, r) @ ((r, in) * (r, 1)) -> (out, in)
        return oriented(delta, self.fan_in_fan_out).to(self.base_layer.weight.dtype)

    def check_merge(self, adapter_name: str) -> None:
        self.check_finite(
            self.base_layer.weight + self.delta_weight(adapter_name),
            adapter_name,
            type(self.base_layer).__name__,
        )

    def merge_adapter(self, adapter_name: str) -> None:
        self.check_merge(adapter_name)
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight(adapter_name))

    def unmerge_adapter(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.base_layer.weight.sub_(self.delta_weight(adapter_name))

    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapter_names:
            A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            dropped = self.lora_dropout[name](x.to(A.dtype))
            update = dropped @ (A * E).T @ B.T  # (..., in) @ (in, r) @ (r, out) -> (..., out)
            result = result + (update * self.scaling[name] / (self.ranknum[name] + _EPS)).to(result.dtype)
        return result


@register_method
@dataclass(kw_only=True)
class AdaLoRA(PEFTMethod):
    """Adaptive budget allocation for LoRA: SVD-form updates whose ranks shrink to the most important triplets.

    The per-step work (importance, budget, masking) runs in :meth:`on_optimizer_step`, which
    :class:`~lightning_peft.PEFTCallback` calls after every optimizer step, and the orthogonality term comes from
    :meth:`extra_loss`. Without a Trainer, call both yourself (see peft's ``update_and_allocate``).

    Example:
        >>> method = AdaLoRA(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100)
        >>> # 4 layers: 48 triplets at first, 16 at the end
        >>> [budget_schedule(step, 100, 10, 20, init_bgt=48, target_bgt=16) for step in (10, 45, 80, 100)]
        [48, 20, 16, 16]

    Args:
        target_modules: Names (suffix match), a full-match regex, or ``"all-linear"``; ``None`` uses the
            per-architecture default (peft's AdaLoRA table, e.g. ``q_proj, v_proj`` for Llama).
        exclude_modules: Modules to leave alone, same syntax.
        init_r: Rank each layer starts with.
        target_r: Average rank per layer at the end (the final budget is ``target_r * layers``).
        alpha: Scale numerator: the update is multiplied by ``alpha / init_r`` (``lora_alpha`` in peft).
        dropout: Dropout on the adapter's input, in ``[0, 1)``.
        tinit: Warm-up steps before ranks start to shrink.
        tfinal: Final steps with the ranks fixed.
        deltaT: Steps between two budget allocations.
        beta1: EMA factor of the importance.
        beta2: EMA factor of the importance's uncertainty.
        orth_reg_weight: Weight of the orthogonality regulariser (0 disables it).
        total_step: Total optimizer steps; ``None`` takes the Trainer's ``estimated_stepping_batches``.
        init_lora_weights: ``True``: ``E = 0`` (no-op at init). ``False``: all random (for tests only).
        rank_pattern: Kept triplets per layer (``{"<module>.lora_E": [bool] * init_r}``), as saved after
            training; layers are built with the kept ranks. Normally read from a saved adapter, not set by hand.
        modules_to_save: Modules trained in full (e.g. a new classification head).
    """

    peft_type: ClassVar[str] = "ADALORA"
    composable: ClassVar[bool] = False
    not_composable_because: ClassVar[str] = (
        "its rank budget is allocated over its own adapter's layers, and it saves its own peft type (ADALORA)."
    )
    mergeable: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    init_lora_weights: bool = True
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdaLoRA {name}={value!r} must be an integer >= 1.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoRA target_r={self.target_r} > init_r={self.init_r}: the budget only shrinks; start with "
                "init_r >= target_r (peft's defaults: init_r=12, target_r=8)."
            )
        if not self.alpha > 0:
            raise ValueError(f"AdaLoRA alpha={self.alpha!r} must be > 0.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"AdaLoRA dropout={self.dropout!r} must be in [0, 1).")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"AdaLoRA {name}={getattr(self, name)!r} must be in (0, 1) (typical: 0.85).")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight={self.orth_reg_weight!r} must be >= 0.")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoRA tinit={self.tinit}, tfinal={self.tfinal} must be >= 0.")
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        if total_step < 1 or self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"AdaLoRA: total_step={total_step} leaves no budgeting phase between tinit={self.tinit} and "
                f"total_step - tfinal={total_step - self.tfinal}; lower tinit/tfinal or train for more steps."
            )

    # --- injection ------------------------------------------------------------------------------------------
    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        targets = self.target_modules
        if targets is None:
            fix = "pass e.g. target_modules=['q_proj', 'v_proj']."
            targets = default_targets(model, DEFAULT_TARGETS, method="AdaLoRA", fix=fix)
        found = find_targets(
            model,
            targets,
            supported=(nn.Linear, Conv1D, SVDLayer),
            exclude_modules=self.exclude_modules,
            skip=self.modules_to_save or (),
            linear_types=(nn.Linear, Conv1D),
            method="AdaLoRA",
        )
        pattern = self.rank_pattern or {}
        for name, module in found:
            # peft's keys name the lora_E parameter, with or without the adapter name.
            kept = pattern.get(
                f"{name}.lora_E", pattern.get(f"{name}.lora_E.{adapter_name}", [True] * self.init_r)
            )
            if len(kept) != self.init_r:
                raise ValueError(
                    f"AdaLoRA rank_pattern for {name} has {len(kept)} entries; expected init_r={self.init_r}."
                )
            layer = module if isinstance(module, SVDLayer) else SVDLayer(module)
            layer.add_adapter(
                adapter_name, self.init_r, self.alpha, self.dropout, self.init_lora_weights, kept
            )
            if layer is not module:
                replace_module(model, name, layer)

    def _layers(self, model: nn.Module, adapter_name: str) -> list[tuple[str, SVDLayer]]:
        return [
            (n, m) for n, m in adapter_layers(model) if isinstance(m, SVDLayer) and adapter_name in m.lora_A
        ]

    def _training_adapter(self, model: nn.Module, adapter_name: str) -> str | None:
        """``adapter_name`` while it is the model's active (trained) adapter, else None: AdaLoRA's schedule and
        regulariser follow the adapter being trained, one at a time."""
        record = injection_record(model)
        return adapter_name if record is not None and record.active == adapter_name else None

    # --- training: orthogonality and rank allocation --------------------------------------------------------
    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        adapter = self._training_adapter(model, adapter_name)
        if adapter is None or self.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer in self._layers(model, adapter):
            A, B = layer.lora_A[adapter], layer.lora_B[adapter]
            # (r, r) each: the identity when the rows of A and the columns of B are orthonormal
            for cov in (A @ A.T, B.T @ B):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def on_optimizer_step(
        self, model: nn.Module, adapter_name: str, step: int, total_steps: int | None
    ) -> None:
        """Update importance and mask to the budget of ``step`` (the number of optimizer steps done)."""
        adapter = self._training_adapter(model, adapter_name)
        if adapter is None:
            return
        total = self.total_step or total_steps
        if total is None:
            raise ValueError(
                "AdaLoRA needs the total number of optimizer steps for its budget schedule: set total_step, or "
                "give the Trainer max_steps or max_epochs."
            )
        self.check_schedule(total)
        self._total_step_seen = total  # written to adapter_config.json (peft needs a total_step to load)
        layers = [layer for _, layer in self._layers(model, adapter)]
        final_step = total - self.tfinal
        if step < final_step:
            self._update_importance(layers, adapter)
            if step > self.tinit and step % self.deltaT == 0:
                init_bgt = sum(layer.lora_E[adapter].shape[0] for layer in layers)
                budget = budget_schedule(
                    step, total, self.tinit, self.tfinal, init_bgt, self.target_r * len(layers)
                )
                self._mask_to_budget(layers, adapter, budget)
        elif step == final_step:
            # The EMA of the previous step decides (as in peft), then the allocation is final.
            self._mask_to_budget(layers, adapter, self.target_r * len(layers))
            for layer in layers:
                layer.importance.pop(adapter, None)
            ranks = self.ranks(model, adapter)
            rank_zero_info(
                f"lightning-peft: AdaLoRA '{adapter}' final ranks ({sum(ranks.values())} triplets): {ranks}"
            )
        else:
            for layer in layers:  # re-mask what the optimizer revived; masks survive resuming as E's zeros
                E = layer.lora_E[adapter]
                mask = layer.rank_mask.setdefault(adapter, (E != 0).view(-1))
                with torch.no_grad():
                    E.masked_fill_(~mask.view(-1, 1), 0.0)

    def ranks(self, model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
        """Current rank per adapted module: the triplets kept by the latest allocation."""
        return {
            name: sum(layer.rank_pattern(adapter_name)) for name, layer in self._layers(model, adapter_name)
        }

    def _update_importance(self, layers: list[SVDLayer], adapter: str) -> None:
        with torch.no_grad():
            for layer in layers:
                state = layer.importance.setdefault(adapter, {})
                for attr in _SVD:
                    p = getattr(layer, attr)[adapter]
                    ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                    ema, unc = state.get(attr, (torch.zeros_like(p), torch.zeros_like(p)))
                    ema = self.beta1 * ema + (1 - self.beta1) * ipt
                    unc = self.beta2 * unc + (1 - self.beta2) * (ipt - ema).abs()
                    state[attr] = (ema, unc)

    def _triplet_scores(self, layer: SVDLayer, adapter: str) -> torch.Tensor:
        state = layer.importance.get(adapter)
        if (
            state is None
        ):  # no importance yet (e.g. resumed at the final step): the largest singular values win
            return layer.lora_E[adapter].detach().abs().view(-1)
        score = {attr: ema * unc for attr, (ema, unc) in state.items()}
        # (r,) + mean over A's row (in) + mean over B's column (out)
        return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)

    def _mask_to_budget(self, layers: list[SVDLayer], adapter: str, budget: int) -> None:
        scores = [self._triplet_scores(layer, adapter) for layer in layers]
        drop = sum(s.numel() for s in scores) - budget
        threshold = torch.kthvalue(torch.cat(scores).cpu(), drop).values.item() if drop > 0 else -math.inf
        with torch.no_grad():
            for layer, score in zip(layers, scores, strict=True):
                keep = score > threshold  # ties at the threshold are dropped together, as in peft
                layer.lora_E[adapter].masked_fill_(~keep.view(-1, 1), 0.0)
                layer.rank_mask[adapter] = keep

    # --- checkpointed training state (PEFTCallback resumes exactly through it) ------------------------------
    def training_state(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        """The rank allocator's state: per layer the importance EMAs and the latest mask; the total step seen.

        Keys: ``"<module>.<lora_A|lora_E|lora_B>.<exp_avg_ipt|exp_avg_unc>"`` (peft's RankAllocator names),
        ``"<module>.rank_mask"`` (bool, once allocated) and ``"total_step"``; module names as in
        ``named_modules()`` with wrapper segments removed. The EMAs are absent after the final allocation.
        """
        state: dict[str, Any] = {}
        if getattr(self, "_total_step_seen", None) is not None:
            state["total_step"] = int(self._total_step_seen)
        for name, layer in self._layers(model, adapter_name):
            prefix = clean_key(name)
            for attr, pair in layer.importance.get(adapter_name, {}).items():
                state.update({f"{prefix}.{attr}.{k}": v for k, v in zip(_EMA_NAMES, pair, strict=True)})
            if adapter_name in layer.rank_mask:
                state[f"{prefix}.rank_mask"] = layer.rank_mask[adapter_name]
        return state

    def load_training_state(self, model: nn.Module, adapter_name: str, state: dict[str, Any] | None) -> None:
        if state is None:
            rank_zero_warn(
                "lightning-peft: the checkpoint holds no AdaLoRA training state (written by an older version): "
                "the importance statistics (EMAs of sensitivity and uncertainty) restart from zero, so resuming "
                "during rank allocation (between tinit and total_step - tfinal) will not reproduce the "
                "uninterrupted run. Masks after the final allocation are still recovered from E's zeros."
            )
            return
        left = dict(state)
        if "total_step" in left:
            self._total_step_seen = int(left.pop("total_step"))
        for name, layer in self._layers(model, adapter_name):
            prefix = clean_key(name)
            importance = {}
            for attr in _SVD:
                p = getattr(layer, attr)[adapter_name]
                pair = [left.pop(f"{prefix}.{attr}.{k}", None) for k in _EMA_NAMES]
                if any(t is None for t in pair):
                    continue
                if any(t.shape != p.shape for t in pair):  # e.g. local shards under FSDP
                    rank_zero_warn(
                        f"lightning-peft: AdaLoRA training state for {prefix}.{attr} has shape "
                        f"{tuple(pair[0].shape)}, the parameter {tuple(p.shape)}: its importance statistics restart."
                    )
                    continue
                importance[attr] = tuple(t.to(device=p.device, dtype=p.dtype) for t in pair)
            if len(importance) == len(_SVD):
                layer.importance[adapter_name] = importance
            else:
                layer.importance.pop(adapter_name, None)
            mask = left.pop(f"{prefix}.rank_mask", None)
            if mask is not None:
                layer.rank_mask[adapter_name] = mask.to(
                    device=layer.lora_E[adapter_name].device, dtype=torch.bool
                )
            else:
                layer.rank_mask.pop(adapter_name, None)
        if left:
            raise ValueError(
                f"AdaLoRA training state names {len(left)} entries of modules this model does not adapt, e.g. "
                f"{sorted(left)[:3]}; resume with the same target_modules the checkpoint was trained with."
            )

    # --- the Hugging Face peft file format ------------------------------------------------------------------
    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        layers = dict(self._layers(model, adapter_name))
        pruned = any(adapter_name in m.rank_mask or not all(m.kept[adapter_name]) for m in layers.values())
        config = {_PEFT_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        config.update(
            peft_type=self.peft_type,
            target_modules=sorted(layers),  # exact names: peft's suffix matching selects the same modules
            exclude_modules=None,
            # peft refuses a config without a positive total_step, even to load for inference.
            total_step=self.total_step
            or getattr(self, "_total_step_seen", None)
            or self.tinit + self.tfinal + 1,
            rank_pattern={f"{n}.lora_E": m.rank_pattern(adapter_name) for n, m in layers.items()}
            if pruned
            else None,
            use_rslora=False,
            use_dora=False,
            bias="none",
            fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),
        )
        return config

    def to_peft_state_dict(
        self, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Drop the masked triplets (rows of ``lora_A``/``lora_E``, columns of ``lora_B``), as peft saves them."""
        state = dict(state_dict)
        for name, layer in self._layers(model, adapter_name):
            keep = layer.rank_mask.get(adapter_name)
            if keep is None:
                continue
            prefix = clean_key(name)
            for attr in _SVD:
                key = f"{prefix}.{attr}.{adapter_name}"
                state[key] = state[key][:, keep] if attr == "lora_B" else state[key][keep]
        return state

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> AdaLoRA:
        if "lora_alpha" not in config or "init_r" not in config:
            raise ValueError(
                "adapter_config.json for ADALORA lacks 'init_r' or 'lora_alpha'; without them the adapter's scale is "
                "unknown and outputs would be silently wrong. Add the values used in training."
            )
        ours = {peft: name for name, peft in _PEFT_NAMES.items()}
        known = {f.name for f in fields(cls)}
        return cls(
            **{ours.get(k, k): v for k, v in config.items() if ours.get(k, k) in known and v is not None}
        )
