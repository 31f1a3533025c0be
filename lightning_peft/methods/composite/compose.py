"""Composite methods: several methods injected as one adapter.

A :class:`ComposedMethod` is one :class:`~lightning_peft.methods.PEFTMethod` made of other methods, its
*members*, each injected in turn under the composite's own adapter name. Nothing downstream needs to know: the
core records one method per adapter name (the composite), and every member's adapter layers hold that same
name, so ``adapter_state_keys``, ``set_adapter``, ``disable_adapters``, ``unload``, ``save_adapter`` and
checkpoints cover all parts at once. The composite hands the optional hooks (extra state, per-step work, extra
loss terms) to its members, and is mergeable only when every member is. This is AdapterHub's ``ConfigUnion``
(MAM adapter and UniPELT are unions of existing configs) on our own protocol: no member's code is copied.

Sharing one name has two consequences:

* members adapt different layers: two members adapting the same layer under one name would overwrite each
  other, so injection refuses it (and leaves the model as it was);
* members are injected in order, and a member that wraps a whole sublayer (a parallel adapter wraps ``mlp``)
  hides that sublayer's inner modules from later members: put LoRA and prefixes first.

Saved directories are our own format (``peft`` has no unions): ``adapter_config.json`` holds the composite's
fields, and every tensor is keyed as for a single method (state-dict keys without the adapter name). A prefix
member therefore keeps its whole encoder rather than peft's ``prompt_embeddings``, and training can resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.contract import (
    PEFTMethod,
    jsonable,
    known_class_paths,
    method_class,
    register_method,
)


@dataclass(kw_only=True)
class ComposedMethod(PEFTMethod):
    """Base of the composite methods: :meth:`members` says which methods, in which order, make up the adapter.

    Members are rebuilt from the composite's fields on each call, so they must keep no state of their own between
    calls (every method here keeps its state in the model's adapter layers).
    """

    def members(self) -> list[PEFTMethod]:
        """The parts, in injection order, each with the composite's ``modules_to_save`` so they leave them alone."""
        raise NotImplementedError

    def validate(self) -> None:
        try:  # the members check their own hyperparameters; say whose they are
            self.members()
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from error

    # --- properties that follow from the members -------------------------------------------------------------
    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        """Only when every member can merge (LoRA + IA3 can; a prefix never can)."""
        return all(member.mergeable for member in self.members())

    @property
    def modifies_inputs(self) -> bool:  # type: ignore[override]
        return any(member.modifies_inputs for member in self.members())

    @property
    def may_have_unused_parameters(self) -> bool:  # type: ignore[override]
        return any(member.may_have_unused_parameters for member in self.members())

    # --- injection ------------------------------------------------------------------------------------------
    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        for member in self.members():
            before = _holdings(model, adapter_name)
            member.inject_layers(model, adapter_name)
            after = _holdings(model, adapter_name)
            clashes = [
                name
                for key, (name, state) in before.items()
                if _changed(state, after.get(key, ("", None))[1])
            ]
            if clashes:  # inject() then takes the half-built adapter out again
                raise ValueError(
                    f"{self.name}: {member.name} adapts {clashes[0]}, which an earlier part already adapts as "
                    f"'{adapter_name}'; the second would overwrite the first. Give the parts different target modules."
                )

    def extra_state_names(self, model: nn.Module, adapter_name: str) -> list[str]:
        names = [n for member in self.members() for n in member.extra_state_names(model, adapter_name)]
        return list(dict.fromkeys(names))

    # --- per-step hooks -------------------------------------------------------------------------------------
    def on_optimizer_step(
        self, model: nn.Module, adapter_name: str, step: int, total_steps: int | None
    ) -> None:
        for member in self.members():
            member.on_optimizer_step(model, adapter_name, step, total_steps)

    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        terms = [t for member in self.members() if (t := member.extra_loss(model, adapter_name)) is not None]
        return torch.stack(terms).sum() if terms else None

    # --- file format: the members decide what of their state is saved; the layout is the composite's ---------
    def to_peft_state_dict(
        self, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        for member in self.members():
            state_dict = member.to_peft_state_dict(model, adapter_name, state_dict)
        return state_dict


def _holdings(model: nn.Module, adapter_name: str) -> dict[int, tuple[str, dict[str, torch.Tensor]]]:
    """``id(layer) -> (name, its tensors of adapter_name)`` for each layer holding the adapter.

    Keyed by layer, not name (a later member may wrap an earlier one's layer, which renames it); the tensors
    themselves are kept so that a member replacing them under the same keys is seen.
    """
    holdings = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names():
            state = layer.state_dict(keep_vars=True)
            holdings[id(layer)] = (name, {k: state[k] for k in layer.adapter_state_names(adapter_name)})
    return holdings


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor] | None) -> bool:
    return after is None or before.keys() != after.keys() or any(after[k] is not v for k, v in before.items())


@register_method
@dataclass(kw_only=True)
class MethodUnion(ComposedMethod):
    """Any methods trained together as one adapter, e.g. LoRA on attention with IA3 on the feed-forward.

    Example:
        >>> from lightning_peft.methods import IA3, LoRA, PrefixTuning
        >>> MethodUnion(methods=[LoRA(target_modules=["q_proj"]), IA3(target_modules=["down_proj"])]).mergeable
        True
        >>> MethodUnion(methods=[LoRA(), PrefixTuning(num_virtual_tokens=8)]).mergeable
        False

    Args:
        methods: The parts, injected in this order (methods wrapping whole sublayers, such as parallel adapters,
            last). Each adapts its own layers; their ``modules_to_save`` stay unset.
        modules_to_save: Modules trained in full for the whole union (e.g. a new classification head).

    Raises:
        ValueError: no methods, a method with its own ``modules_to_save``, or a method that is not ``composable``
            (AdaLoRA).
    """

    peft_type: ClassVar[str] = "METHOD_UNION"

    methods: list[PEFTMethod] = field(default_factory=list)

    def validate(self) -> None:
        if not self.methods:
            raise ValueError("MethodUnion needs at least one method, e.g. methods=[LoRA(...), IA3(...)].")
        for method in self.methods:
            if not isinstance(method, PEFTMethod):
                raise TypeError(f"MethodUnion methods must be PEFTMethods, got {type(method).__name__}.")
            if method.modules_to_save:
                raise ValueError(
                    f"MethodUnion: {method.name} sets modules_to_save={method.modules_to_save}; set it on the "
                    "MethodUnion instead, which trains each such module once for all its methods."
                )
            if not method.composable:
                raise ValueError(
                    f"MethodUnion cannot hold {method.name}: {method.not_composable_because} Inject {method.name} "
                    "as an adapter of its own."
                )
        super().validate()

    def members(self) -> list[PEFTMethod]:
        if not self.modules_to_save:
            return list(self.methods)
        return [replace(method, modules_to_save=self.modules_to_save) for method in self.methods]

    # --- configs: members are stored as they were given (class path and arguments), not as peft configs --------
    def config_dict(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": {
                "methods": [method.config_dict() for method in self.methods],
                "modules_to_save": jsonable(self.modules_to_save),
            },
        }

    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        return {"peft_type": self.peft_type, **self.config_dict()["init_args"]}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> MethodUnion:
        return cls(
            methods=[method_from_config_dict(m).for_loading() for m in config.get("methods") or []],
            modules_to_save=config.get("modules_to_save"),
        )


def method_from_config_dict(config: dict[str, Any]) -> PEFTMethod:
    """Inverse of :meth:`PEFTMethod.config_dict`; only classes of already imported methods are looked up.

    Raises:
        ValueError: ``class_path`` names no known method.
    """
    path = config.get("class_path")
    cls = method_class(path) if isinstance(path, str) else None
    if cls is None:
        raise ValueError(f"Unknown method class_path {path!r}; known: {known_class_paths()}.")
    kwargs = dict(config.get("init_args") or {})
    if issubclass(cls, MethodUnion):
        kwargs["methods"] = [method_from_config_dict(m) for m in kwargs.get("methods") or []]
    return cls(**kwargs)
