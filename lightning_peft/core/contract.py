"""The method contract: :class:`PEFTMethod`, the registry of peft types, and base changes a load can undo.

A method is a typed, validated config (a dataclass, so LightningCLI/jsonargparse can build it from YAML) that knows
how to inject itself into a model. Everything generic - freezing, collecting adapter state, merging, disabling,
saving - is driven by this contract and the :class:`~lightning_peft.core.adapter_layer.AdapterLayer` protocol, so
the callback and the functional API never branch on the method type. Its hooks have no-op defaults for what only
some methods need (per-step work after the optimizer step, extra loss terms, input rewriting), plus the peft
``adapter_config.json`` mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from lightning_peft.core.adapter_layer import ModulesToSave
from lightning_peft.core.field_types import check_field_types
from lightning_peft.core.targeting import find_targets, replace_module

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


@dataclass(kw_only=True)
class PEFTMethod:
    """Base class of every method; subclasses are dataclasses of their hyperparameters.

    Subclasses set ``peft_type`` (the name written to ``adapter_config.json``), implement
    :meth:`inject_layers`, and override the optional hooks they need. :func:`register_method` makes a class the
    loader of its ``peft_type`` for :func:`lightning_peft.load_adapter`; a variant that saves its parent's format
    (QLoRA writes ``"LORA"``, the gated UniPELT parts) or a user's ``class MyLoRA(LoRA)`` is simply not registered.

    Args:
        modules_to_save: Modules (same syntax as ``target_modules`` lists) trained in full, e.g. a
            freshly initialised classification head.
    """

    peft_type: ClassVar[str] = ""
    #: Whether the method folds into the base weights (``merge``/``merge_on_fit_end``).
    mergeable: ClassVar[bool] = False
    #: Whether the method rewrites the model's inputs (soft prompts) rather than only its layers.
    modifies_inputs: ClassVar[bool] = False
    #: Whether a method that rewrites inputs can rewrite each batch row for its own adapter (``mixed_batch``).
    rewrites_inputs_per_row: ClassVar[bool] = False
    #: Whether some trainable parameter may get no gradient in a step (DDP then needs find_unused_parameters).
    may_have_unused_parameters: ClassVar[bool] = False
    #: Whether the method can be a part of a :class:`~lightning_peft.methods.MethodUnion` (MAM, UniPELT).
    composable: ClassVar[bool] = True
    not_composable_because: ClassVar[str] = ""

    modules_to_save: list[str] | None = None

    #: Fields that only initialise a new adapter (e.g. from a tokenizer) and their neutral values. A loaded adapter
    #: replaces that initialisation with its saved tensors, so :meth:`for_loading` resets them: loading a file
    #: never reads a tokenizer (or any code) the file's config names.
    init_only_fields: ClassVar[dict[str, Any]] = {}

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
    def on_optimizer_step(
        self, model: nn.Module, adapter_name: str, step: int, total_steps: int | None
    ) -> None:
        """Called after each optimizer step, before gradients are zeroed (e.g. AdaLoRA's rank allocation).

        ``step`` is the number of optimizer steps done; ``total_steps`` the run's total when known.
        """

    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        """An extra loss term of adapter ``adapter_name`` added to the objective (e.g. an orthogonality regulariser)."""
        return None

    # --- optional data-driven initialisation (EVA) ----------------------------------------------------------
    def needs_training_data(self) -> bool:
        """Whether :meth:`initialize_from_data` must see training batches before training starts; PEFTCallback then
        runs it at fit start (not on resume) over the train loader."""
        return False

    def initialize_from_data(
        self, model: nn.Module, adapter_name: str, batches: Any, broadcast: Callable[[Any], Any] | None = None
    ) -> None:
        """Initialise adapter ``adapter_name`` from ``batches`` (e.g. EVA); ``broadcast`` makes all processes agree."""

    def fit_to_checkpoint(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Before a checkpoint's tensors (``state``, keyed relative to ``model``) load: reshape the adapter to them
        where its shapes came from data (EVA's ranks). No-op by default."""

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
        return {"peft_type": self.peft_type, **jsonable(config)}

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
        """``{"class_path", "init_args"}`` as in a LightningCLI config; see :func:`class_path`."""
        return {"class_path": class_path(type(self)), "init_args": jsonable(asdict(self))}


_M = TypeVar("_M", bound=type["PEFTMethod"])
_PUBLIC_PACKAGE = "lightning_peft.methods"


def register_method(cls: _M) -> _M:
    """Class decorator: ``cls`` becomes the loader of its ``peft_type`` (replacing any earlier one).

    :func:`lightning_peft.load_adapter` reads a directory's ``peft_type`` and builds the registered class from its
    config (:meth:`PEFTMethod.from_peft_config`).

    Raises:
        TypeError: ``cls`` is no :class:`PEFTMethod` or has no ``peft_type``.
    """
    if not (isinstance(cls, type) and issubclass(cls, PEFTMethod)) or not cls.peft_type:
        raise TypeError(f"register_method needs a PEFTMethod subclass with a peft_type, got {cls!r}.")
    _REGISTRY[cls.peft_type] = cls
    return cls


def class_path(cls: type[PEFTMethod]) -> str:
    """The ``class_path`` a config names ``cls`` by: ``lightning_peft.methods.<Name>`` for the built-in methods
    (the path users write, whichever file defines the class), else the defining module's path."""
    public = sys.modules.get(_PUBLIC_PACKAGE)  # imported by then whenever a built-in method exists
    if cls.__module__.startswith(_PUBLIC_PACKAGE + ".") and getattr(public, cls.__qualname__, None) is cls:
        return f"{_PUBLIC_PACKAGE}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def method_class(path: str) -> type[PEFTMethod] | None:
    """The defined method class a ``class_path`` names, or ``None``; nothing is imported.

    A built-in method is also found by the module path of an earlier release (``lightning_peft.methods.lora.LoRA``
    before the LoRA family became a package), so checkpoints and configs written then still resolve.
    """
    classes = _subclasses(PEFTMethod)
    for cls in classes:
        if path in (class_path(cls), f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    if path.startswith(_PUBLIC_PACKAGE + "."):
        name = path.rpartition(".")[2]
        builtin = [c for c in classes if class_path(c) == f"{_PUBLIC_PACKAGE}.{name}"]
        if len(builtin) == 1:
            return builtin[0]
    return None


def known_class_paths() -> list[str]:
    return sorted({class_path(c) for c in _subclasses(PEFTMethod)})


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def method_for_peft_type(peft_type: str) -> type[PEFTMethod]:
    """The registered loader of ``peft_type`` (:func:`register_method`).

    Raises:
        ValueError: no method registered that type; the registered ones are listed.
    """
    if peft_type not in _REGISTRY:
        raise ValueError(f"peft_type {peft_type!r} is not supported; supported: {sorted(_REGISTRY)}.")
    return _REGISTRY[peft_type]


def jsonable(value: Any) -> Any:
    """``value`` with its tuples and sets (at any depth in dicts and lists) turned into lists, as JSON holds them."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    return value
