"""LoRA on parameters that no ``nn.Linear`` holds: the fused expert weights of MoE blocks (peft's ``target_parameters``).

transformers 5.x stores a MoE block's routed experts as 3-D parameters of one module (Mixtral, Qwen2-MoE,
Qwen3-MoE, ...: ``experts.gate_up_proj`` ``(E, 2*I, H)`` and ``experts.down_proj`` ``(E, H, I)``, each expert's
weight in ``nn.Linear``'s ``(out, in)`` order; a module whose ``is_transposed`` is true stores ``(E, in, out)``).
The experts' forward reads ``self.gate_up_proj[e]`` itself, so there is no layer whose output an adapter could add
to. :class:`LoraParamWrapper` wraps the module that holds the parameter and, for the duration of its forward only,
presents ``W + s * B_e @ A_e`` (one low-rank update per expert) in place of ``W``.

Why a wrapper and not a parametrization: peft's file layout names the adapter by where a wrapper sits (one wrapper
per parameter, nested when a module holds several: ``experts.lora_A`` belongs to the outer, ``experts.base_layer.
lora_A`` to the inner), so a wrapper module is needed for the keys anyway; and swapping the tensor in for one call
(:func:`torch.func.functional_call`) neither changes the module's class nor re-registers anything per step. The
adapted weight is one ``baddbmm(W, lhs, rhs)`` from the factors, so autograd keeps only the small factors (no
``(E, out, in)`` delta is stored) and the frozen ``W`` gets no gradient. The adapted weight lives while the experts'
forward runs (their matmuls keep slices of it for backward), as any adapted copy of a weight would. Reading
``experts.gate_up_proj`` from outside the forward gives the base weight, as in peft.

The factors are laid out as peft's ``ParamWrapper``: ``lora_A`` is ``Linear(in, r*E)`` (expert ``e`` owns rows
``e*r .. e*r+r-1``), ``lora_B`` is ``Linear(r*E, out)`` (expert ``e`` owns columns ``e, e+E, e+2E, ...``); a 2-D
parameter ``(out, in)`` is one expert. Dropout (it cannot be applied to the input of a weight) and DoRA are refused,
as in peft.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_dtype
from lightning_peft.core.targeting import replace_module

_BASE = "base_layer"


class LoraParamWrapper(AdapterLayer):
    """LoRA on one parameter (``parameter_name``) of the module it wraps; nests for several parameters of one
    module (the first-registered parameter innermost, as peft nests them)."""

    adapter_attrs = ("lora_A", "lora_B")
    adapter_settings = ("r", "scaling")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.parameter().shape
        self.param_shape = tuple(shape)
        self.stacked = len(shape) == 3  # one weight per expert along dim 0
        self.transposed = self.stacked and bool(getattr(self.owner(), "is_transposed", False))
        if self.stacked:
            self.expert_count = shape[0]
            # (E, out, in) as nn.Linear's weights, or (E, in, out) where the module says is_transposed
            self.in_features, self.out_features = (
                (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
            )
        else:
            self.expert_count = 1
            self.out_features, self.in_features = shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.expert_count}"

    # --- where the parameter lives -----------------------------------------------------------------------------
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below every nested wrapper)."""
        module = self.base_layer
        while isinstance(module, LoraParamWrapper):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return self.owner()._parameters[self.parameter_name]

    def _path_below(self) -> str:
        """The parameter's name relative to ``self.base_layer`` (through the nested wrappers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParamWrapper):
            depth, module = depth + 1, module.base_layer
        return ".".join([_BASE] * depth + [self.parameter_name])

    # --- adapters ------------------------------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, r: int, alpha: float, use_rslora: bool, init: bool | str
    ) -> None:  # type: ignore[override]
        weight = self.parameter()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        kwargs: dict[str, Any] = {"bias": False, "device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.expert_count, **kwargs)
        self.lora_B[adapter_name] = nn.Linear(r * self.expert_count, self.out_features, **kwargs)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r)
            nn.init.zeros_(B)
        elif init is False:  # not a no-op: for tests of merge and parity
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:  # refused at construction (LoRA.validate); kept for direct use
            raise ValueError(f"init_lora_weights={init!r} is not supported for target_parameters.")
        self.active_adapters = [*self.active_adapters, adapter_name]

    def pending_adapters(self) -> list[str]:
        return [a for a in super().pending_adapters() if a in self.lora_A]

    def factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``lhs @ rhs`` (batched over experts) in the parameter's own layout, unscaled."""
        E = self.expert_count
        A = self.lora_A[adapter_name].weight  # (r*E, in)
        B = self.lora_B[adapter_name].weight  # (out, r*E)
        A_e = A.reshape(E, -1, A.shape[-1])  # (E, r, in): expert e's rows e*r .. e*r+r-1
        B_e = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (out, r, E) -> (E, out, r): columns e, e+E, ...
        if self.transposed:
            return A_e.transpose(1, 2).to(dtype), B_e.transpose(1, 2).to(dtype)  # (E, in, r), (E, r, out)
        return B_e.to(dtype), A_e.to(dtype)  # (E, out, r), (E, r, in)

    def adapted_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight + s * lhs @ rhs`` in one fused op (autograd keeps the factors, not the delta)."""
        lhs, rhs = self.factors(adapter_name, weight.dtype)
        scaling = self.scaling[adapter_name]
        # The parameter keeps its dtype under autocast: the experts' forward reads it as it would the base.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if self.stacked:
                return torch.baddbmm(weight, lhs, rhs, alpha=scaling)  # (E, a, b) + (E, a, r) @ (E, r, b)
            return torch.addmm(weight, lhs[0], rhs[0], alpha=scaling)  # (out, in) + (out, r) @ (r, in)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B_e @ A_e`` per expert, shaped as the parameter."""
        weight = self.parameter()
        lhs, rhs = self.factors(adapter_name, weight.dtype)
        delta = torch.bmm(lhs, rhs) * self.scaling[adapter_name]  # (E, a, r) @ (E, r, b) -> (E, a, b)
        return delta if self.stacked else delta[0]

    def adapted_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        weight = self.parameter()
        if tuple(weight.shape) != self.param_shape:
            raise RuntimeError(
                f"LoRA target_parameters: {type(self.owner()).__name__}.{self.parameter_name} is {tuple(weight.shape)} "
                f"at forward but was {self.param_shape} at injection: it was partitioned or replaced since. DeepSpeed "
                "ZeRO-3 does that and gathers it only inside the module's own forward, after the adapter must read "
                "it; train adapters on parameters with ZeRO-2, DDP or FSDP instead."
            )
        for name in adapter_names:
            weight = self.adapted_weight(name, weight)
        # For this call only, the module's forward reads the adapted tensor under the parameter's name.
        return functional_call(self.base_layer, {self._path_below(): weight}, args, kwargs)

    # --- merging -------------------------------------------------------------------------------------------------
    def _merged_weight(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            new = self.parameter() + self.delta_weight(adapter_name)
        self.check_finite(new, adapter_name, f"{type(self.owner()).__name__}.{self.parameter_name}")
        return new

    def check_merge(self, adapter_name: str) -> None:
        self._merged_weight(adapter_name)

    def merge_adapter(self, adapter_name: str) -> None:
        new = self._merged_weight(adapter_name)
        with torch.no_grad():
            self.parameter().copy_(new)

    def unmerge_adapter(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.parameter().sub_(self.delta_weight(adapter_name))


# --- finding the targeted parameters ---------------------------------------------------------------------------------
def check_parameter_options(
    target_parameters: Any, *, dropout: float, use_dora: bool, init: Any, method: str = "LoRA"
) -> None:
    """Refuse, at construction, what LoRA on a parameter cannot do (as peft refuses it)."""
    if isinstance(target_parameters, str) or not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(
            f"{method} target_parameters={target_parameters!r}: give a list of parameter names (a parameter matches "
            "when its full name equals an entry or ends with '.' + entry), e.g. ['experts.gate_up_proj', "
            "'experts.down_proj']; regular expressions are not supported (as in peft)."
        )
    if dropout:
        raise ValueError(
            f"{method} target_parameters with dropout={dropout}: the update is added to the weight, which has no "
            "input of its own to drop, so dropout cannot be applied (peft refuses it too). Set dropout=0."
        )
    if use_dora:
        raise ValueError(
            f"{method} target_parameters with use_dora=True: DoRA is not supported on parameters (peft refuses it "
            "too). Use plain LoRA there, or target the model's Linear layers with target_modules for DoRA."
        )
    if not (init is True or init is False or init == "gaussian"):
        raise ValueError(
            f"{method} target_parameters with init_lora_weights={init!r}: parameters support True, False and "
            "'gaussian' (PiSSA and OLoRA decompose a 2-D weight, not a stack of experts)."
        )


@dataclass(frozen=True)
class ParameterTarget:
    """A parameter to adapt: ``name`` without wrapper segments, and the live path of the module that holds it (or of
    the outermost :class:`LoraParamWrapper` around that module) at ``holder``."""

    name: str
    holder: str
    parameter_name: str


def strip_wrappers(name: str) -> str:
    """``model.x.experts.base_layer.base_layer.down_proj`` -> ``model.x.experts.down_proj``."""
    return ".".join(p for p in name.split(".") if p != _BASE)


def find_parameter_targets(
    model: nn.Module,
    target_parameters: list[str],
    *,
    module_targets: set[str] = frozenset(),
    method: str = "LoRA",
) -> list[ParameterTarget]:
    """Resolve ``target_parameters`` (peft's rule: full name equal to an entry or ending with ``.entry``) to the
    parameters to adapt, in module order and, per module, in registration order (the nesting order).

    Raises:
        ValueError: nothing matches (candidates named), a match is not 2-D/3-D or not floating point, sits on the
            top-level module, on a module another adapter layer wraps (or that ``module_targets`` will wrap), or the
            set differs from the parameters other adapters already adapt.
    """
    found: list[ParameterTarget] = []
    candidates: list[str] = []
    for path, module in _base_modules(model):
        if isinstance(module, AdapterLayer):
            continue  # its own tensors are adapter state; the module it wraps comes next
        for parameter_name, param in module.named_parameters(recurse=False):
            name = strip_wrappers(f"{path}.{parameter_name}" if path else parameter_name)
            if param.dim() in (2, 3):
                candidates.append(name)
            if not any(name == t or name.endswith("." + t) for t in target_parameters):
                continue
            _check_target(model, path, name, param, module_targets, method)
            found.append(ParameterTarget(name, _outermost_wrapper(model, path), parameter_name))
    if not found:
        close = difflib.get_close_matches(target_parameters[0], candidates, n=3, cutoff=0.3)
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates if n.count(".")})[:8]
        raise ValueError(
            f"{method}: target_parameters={target_parameters!r} matched no parameter. 2-D/3-D parameters include "
            f"{', '.join(close or candidates[:3]) or 'none'} (by suffix: {', '.join(suffixes) or 'none'}). Name them "
            "as 'experts.gate_up_proj' or by their full name."
        )
    existing = set(wrapped_parameter_names(model))
    wanted = {t.name for t in found}
    if existing and existing != wanted:
        raise ValueError(
            f"{method}: target_parameters selects {len(wanted)} parameters, but other adapters of this model adapt "
            f"{len(existing)} others (e.g. {sorted(existing ^ wanted)[:2]}): every adapter that uses target_parameters "
            "must target the same parameters (their place in the nested wrappers names their keys, as in peft). Use "
            "the same target_parameters, or delete the other adapters first."
        )
    return found


def _base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules reached from the model through plain children and adapter layers' ``base_layer`` only (never
    through an adapter's own tensors, e.g. a ``lora_A`` or a ``modules_to_save`` copy)."""
    kept = []
    for path, module in model.named_modules():
        parts = path.split(".") if path else []
        parent: nn.Module = model
        inside_adapter = False
        for part in parts:
            if isinstance(parent, AdapterLayer) and part != _BASE:
                inside_adapter = True
                break
            parent = getattr(parent, part)
        if not inside_adapter:
            kept.append((path, module))
    return kept


def _check_target(
    model: nn.Module, path: str, name: str, param: torch.Tensor, module_targets: set[str], method: str
) -> None:
    if not path:
        raise ValueError(
            f"{method}: target_parameters selects {name!r}, a parameter of the top-level model itself: a wrapper "
            "cannot replace the model it is part of (as in peft). Target a parameter of a submodule."
        )
    if param.dim() not in (2, 3):
        raise ValueError(
            f"{method}: target_parameters selects {name!r} of shape {tuple(param.shape)}: only 2-D (out, in) and 3-D "
            "(experts, out, in) parameters can hold a low-rank update. Remove it from target_parameters."
        )
    if not param.is_floating_point():
        raise ValueError(
            f"{method}: target_parameters selects {name!r} of dtype {param.dtype} (quantized): the update needs a "
            "float weight. Keep that parameter in floating point."
        )
    owner = strip_wrappers(path)
    wrapped_by = _adapter_layer_above(model, path)
    if owner in module_targets or wrapped_by is not None:
        what = (
            "target_modules selects it too" if owner in module_targets else f"it is wrapped by {wrapped_by}"
        )
        raise ValueError(
            f"{method}: target_parameters selects {name!r}, but its module {owner} is adapted as a module ({what}). "
            "Adapt a module either through target_modules or through its parameters: remove it from one of them "
            "(e.g. target_modules=[] to adapt only parameters)."
        )


def _adapter_layer_above(model: nn.Module, path: str) -> str | None:
    """The type of the nearest adapter layer (other than a parameter wrapper) that wraps the module at ``path``."""
    module: nn.Module = model
    found = None
    for part in path.split("."):
        if isinstance(module, AdapterLayer) and not isinstance(module, LoraParamWrapper):
            found = type(module).__name__
        module = getattr(module, part)
    return found


def _outermost_wrapper(model: nn.Module, path: str) -> str:
    """The live path of the outermost parameter wrapper around the module at ``path`` (``path`` if none)."""
    while path.endswith("." + _BASE):
        parent = path[: -len(_BASE) - 1]
        if not isinstance(model.get_submodule(parent), LoraParamWrapper):
            break
        path = parent
    return path


def _wrapper_of(model: nn.Module, holder: str, parameter_name: str) -> LoraParamWrapper | None:
    module = model.get_submodule(holder)
    while isinstance(module, LoraParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def wrap_parameter(model: nn.Module, target: ParameterTarget) -> LoraParamWrapper:
    """The wrapper adapting ``target``: the existing one, or a new one around what sits at ``target.holder`` (so the
    parameters of one module nest in the order they are wrapped)."""
    existing = _wrapper_of(model, target.holder, target.parameter_name)
    if existing is not None:
        return existing
    wrapper = LoraParamWrapper(model.get_submodule(target.holder), target.parameter_name)
    replace_module(model, target.holder, wrapper)
    return wrapper


def wrapped_parameter_names(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Full names (without wrapper segments) of the parameters holding ``adapter_name`` (any adapter if None)."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, LoraParamWrapper) and (adapter_name is None or adapter_name in module.lora_A):
            names.append(strip_wrappers(f"{path}.{module.parameter_name}"))
    return sorted(set(names))
