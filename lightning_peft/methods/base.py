"""The method contract: :class:`PEFTMethod` and the :class:`AdapterLayer` protocol.

A method is a typed, validated config (a dataclass, so LightningCLI/jsonargparse
can build it from YAML) that knows how to inject itself into a model. Everything
generic - freezing, collecting adapter state, merging, disabling, saving - is
driven by two small protocols, so the callback and the functional API never
branch on the method type:

* :class:`AdapterLayer`: a wrapper around one frozen base layer holding any
  number of *named* adapters in ``ModuleDict``/``ParameterDict`` attributes
  listed in ``adapter_attrs``. Knowing those attribute names is enough to find
  an adapter's parameters, drop or rename them for the peft file format, and
  switch adapters.
* :class:`PEFTMethod`: hooks with no-op defaults for what only some methods
  need (per-step work after the optimizer step, extra loss terms, input
  rewriting), plus the peft ``adapter_config.json`` mapping.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.methods.field_types import check_field_types
from lightning_peft.targeting import find_targets, replace_module

_REGISTRY: dict[str, type[PEFTMethod]] = {}


_BASE_GUARDS: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []


def about_to_change_base(tensor: torch.Tensor) -> None:
    """Call before writing into a base model's tensor in place (PiSSA's residual weight): inside
    :func:`restorable_base_changes` its value is kept so that a refused load can put it back bit for bit."""
    for guard in _BASE_GUARDS:
        if id(tensor) not in guard:
            guard[id(tensor)] = (tensor, tensor.detach().clone())


class BaseChanges:
    """The base tensors changed in place inside :func:`restorable_base_changes`, and their earlier values."""

    def __init__(self, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._saved = saved

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self._saved.values():
                tensor.copy_(value)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._saved


@contextlib.contextmanager
def restorable_base_changes() -> Iterator[BaseChanges]:
    """Keep the earlier value of every base tensor a method announces (:func:`about_to_change_base`) it changes."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    _BASE_GUARDS.append(saved)
    try:
        yield BaseChanges(saved)
    finally:
        _BASE_GUARDS.remove(saved)


class NotMergeableError(RuntimeError):
    """Raised when merge is requested for a method that cannot fold into the base weights."""


class AdapterLayer(nn.Module):
    """Wraps a base layer (never copied) and holds named adapters.

    Subclasses list in ``adapter_attrs`` the ``ModuleDict``/``ParameterDict``
    attributes keyed by adapter name, and implement ``forward`` and, when
    mergeable, ``merge_adapter``/``unmerge_adapter``.
    """

    adapter_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        # Model code sometimes reads `layer.weight` / `layer.in_features` of what it thinks is the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # --- adapters held by this layer -------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attrs:
            names += [n for n in getattr(self, attr) if n not in names]
        return names

    def adapter_state_names(self, adapter_name: str) -> list[str]:
        """State-dict keys (relative to this layer) of one adapter: its parameters and buffers."""
        keys: list[str] = []
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                keys += [f"{attr}.{adapter_name}.{k}" for k in item.state_dict()]
            else:
                keys.append(f"{attr}.{adapter_name}")
        return keys

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge_adapter(adapter_name)
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_active_adapters(self, names: list[str]) -> None:
        known = self.adapter_names()
        self.active_adapters = [n for n in names if n in known]

    # --- merging (mergeable layers override the two *_adapter methods) ---------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        for name in list(self.active_adapters) if adapter_names is None else adapter_names:
            if name not in self.merged_adapters:  # merging twice is a no-op, not a double update
                self.merge_adapter(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.unmerge_adapter(self.merged_adapters.pop())

    def check_merge(self, adapter_name: str) -> None:
        """Raise, changing nothing, if merging ``adapter_name`` would fail (lets a model-wide merge be atomic)."""

    def merge_adapter(self, adapter_name: str) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into its base layer.")

    def unmerge_adapter(self, adapter_name: str) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged.")

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @staticmethod
    def check_finite(weight: torch.Tensor, adapter_name: str, layer: str) -> None:
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"Merging adapter '{adapter_name}' into {layer} produced NaN/Inf weights; the merge was refused and "
                "the base weights are unchanged. Check the adapter for diverged values."
            )


class ModulesToSave(AdapterLayer):
    """Trains a full copy of a small module (e.g. a classification head) per adapter; the original stays frozen.

    Named like peft's ``modules_to_save`` so the saved keys match its file format.
    """

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.base_layer)
        self.modules_to_save[adapter_name].requires_grad_(True)

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """A trained copy has nothing to fold into the original; merging leaves it in use."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


@dataclass(kw_only=True)
class PEFTMethod:
    """Base class of every method; subclasses are dataclasses of their hyperparameters.

    Subclasses set ``peft_type`` (the name written to ``adapter_config.json``), implement
    :meth:`inject_layers`, and override the optional hooks they need.

    A class that assigns ``peft_type`` in its own body becomes the loader of that type for
    :func:`lightning_peft.load_adapter` (:func:`method_for_peft_type`), replacing any earlier one
    (PrefixTuning assigns the type again to replace its shared base). A class that inherits
    ``peft_type`` never registers: a variant saving its parent's format (QLoRA writes ``"LORA"``,
    the gated UniPELT parts) or a user's ``class MyLoRA(LoRA)`` does not take over loading it.

    Args:
        modules_to_save: Modules (same syntax as ``target_modules`` lists) trained in full, e.g. a
            freshly initialised classification head.
    """

    peft_type: ClassVar[str] = ""
    #: Whether the method folds into the base weights (``merge``/``merge_on_fit_end``).
    mergeable: ClassVar[bool] = False
    #: Whether the method rewrites the model's inputs (soft prompts) rather than only its layers.
    modifies_inputs: ClassVar[bool] = False
    #: Whether some trainable parameter may get no gradient in a step (DDP then needs find_unused_parameters).
    may_have_unused_parameters: ClassVar[bool] = False

    modules_to_save: list[str] | None = None

    #: Fields that only initialise a new adapter (e.g. from a tokenizer) and their neutral values. A loaded adapter
    #: replaces that initialisation with its saved tensors, so :meth:`for_loading` resets them: loading a file
    #: never reads a tokenizer (or any code) the file's config names.
    init_only_fields: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("peft_type"):  # assigned here, not inherited (see the class docstring)
            _REGISTRY[cls.peft_type] = cls

    def __post_init__(self) -> None:
        # The method's own checks first (their messages are the most specific); a value of the wrong type that
        # they let through, or trip over, is then named by its annotation.
        try:
            self.validate()
        except (TypeError, AttributeError):
            check_field_types(self)
            raise
        check_field_types(self)

    def validate(self) -> None:
        """Raise ``ValueError`` for bad hyperparameters (called at construction)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    # --- injection ------------------------------------------------------------------------------------------
    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        """Wrap/extend the model's layers with adapter ``adapter_name`` (new parameters trainable)."""
        raise NotImplementedError

    def inject_modules_to_save(self, model: nn.Module, adapter_name: str) -> None:
        if not self.modules_to_save:
            return
        existing = {n for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
        targets = [
            (n, m)
            for n, m in model.named_modules()
            if n
            and any(n == e or n.endswith("." + e) for e in self.modules_to_save)
            and ".modules_to_save." not in n
            and not n.endswith(".base_layer")
        ]
        if not targets:
            find_targets(
                model, self.modules_to_save, supported=(nn.Module,), method=f"{self.name} modules_to_save"
            )
        for name, module in targets:
            wrapper = module if name in existing else ModulesToSave(module)
            wrapper.add_adapter(adapter_name)
            if name not in existing:
                replace_module(model, name, wrapper)

    def extra_state_names(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Full state-dict keys the method owns outside its adapter layers (e.g. trained base biases)."""
        return []

    # --- optional per-step hooks ----------------------------------------------------------------------------
    def on_optimizer_step(self, model: nn.Module, step: int, total_steps: int | None) -> None:
        """Called after each optimizer step, before gradients are zeroed (e.g. AdaLoRA's rank allocation)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the training objective (e.g. an orthogonality regulariser)."""
        return None

    # --- training state outside parameters (checkpointed by PEFTCallback) ------------------------------------
    def training_state(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        """Training state held outside parameters and optimizer (e.g. AdaLoRA's importance EMAs); empty by default.

        :class:`~lightning_peft.PEFTCallback` writes it into its checkpoint entry
        (``checkpoint["lightning_peft"]["training_state"]``) and hands it back to
        :meth:`load_training_state` on resume, so that resuming reproduces an uninterrupted run. Keys are strings
        that must not depend on object identity (use module names, e.g. via ``core.clean_key``); values are
        tensors, ints, floats, bools, strs, or lists/dicts of them, so the checkpoint loads with
        ``torch.load(weights_only=True)``.
        """
        return {}

    def load_training_state(self, model: nn.Module, adapter_name: str, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`training_state` returned, after injection and before training continues.

        ``state`` is ``None`` when the checkpoint holds no training state (written before this hook existed);
        a method whose statistics then restart should warn. No-op by default.
        """

    # --- the Hugging Face peft file format ------------------------------------------------------------------
    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        """The ``adapter_config.json`` content for this adapter."""
        config = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"peft_type": self.peft_type, **_jsonable(config)}

    def to_peft_state_dict(
        self, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors written to ``adapter_model.safetensors``, keyed as in ``model.state_dict()``.

        Unchanged by default; AdaLoRA drops its pruned triplets here, as peft does.
        """
        return state_dict

    def to_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The file's tensors, given them under peft keys; unchanged by default (soft prompts save one output)."""
        return tensors

    def from_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_peft_tensors`, called after injection; may reshape the adapter to what was saved."""
        return tensors

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known}).for_loading()

    def for_loading(self) -> PEFTMethod:
        """This method with :attr:`init_only_fields` reset: what a loader injects before the saved tensors."""
        return dataclasses.replace(self, **self.init_only_fields) if self.init_only_fields else self

    def config_dict(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": _jsonable(asdict(self)),
        }


def method_for_peft_type(peft_type: str) -> type[PEFTMethod]:
    import lightning_peft.methods  # noqa: F401  (imports register every method)

    if peft_type not in _REGISTRY:
        raise ValueError(f"peft_type {peft_type!r} is not supported; supported: {sorted(_REGISTRY)}.")
    return _REGISTRY[peft_type]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return value
