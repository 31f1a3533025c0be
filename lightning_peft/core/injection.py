"""The Trainer-free API: inject, freeze, collect adapter state, merge, disable, remove.

Everything here works on any ``nn.Module`` through the :class:`AdapterLayer`
protocol and the methods recorded on the model at injection, never on a
specific method type.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from lightning.fabric.wrappers import _FabricModule
from torch import nn

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer, ModulesToSave, NotMergeableError, adapter_layers
from lightning_peft.core.contract import PEFTMethod
from lightning_peft.core.targeting import replace_module

_RECORD_ATTR = "_lightning_peft"
_FAST_PATH_GUARD = "_lightning_peft_fast_path_guard"
# Segments that wrappers (FSDP, activation checkpointing, torch.compile) add to parameter names but not to
# state-dict keys; adapter keys are compared without them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class InjectionRecord:
    """What was injected into a model: methods by adapter name, which is active, original trainability."""

    methods: dict[str, PEFTMethod] = field(default_factory=dict)
    active: str = "default"
    requires_grad: dict[str, bool] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside Fabric's, DDP's/DataParallel's and ``torch.compile``'s wrappers: the one whose
    ``state_dict`` names the tensors. Each wrapper is opened by its own attribute, never by renaming keys."""
    while True:
        if isinstance(model, _FabricModule):
            model = model._original_module
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif is_compiled(model):
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper (its module is in ``model._orig_mod``)."""
    # torch.compile's wrapper class lives in dynamo; if dynamo was never imported, nothing is compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def state_dict_key(model: nn.Module, key: str) -> str:
    """The live ``model.state_dict()`` name of a canonical (wrapper-free) ``key``.

    ``torch.compile`` on a submodule puts ``_orig_mod.`` into its state-dict keys (the other wrappers' state-dict
    hooks strip their segments and add them back on load), so the segment goes back in after each compiled
    submodule on the key's path.
    """
    live: list[str] = []
    module: nn.Module | None = model
    for part in key.split("."):
        while module is not None and is_compiled(module):
            live.append("_orig_mod")
            module = module._orig_mod
        live.append(part)
        child = getattr(module, part, None) if module is not None else None
        module = child if isinstance(child, nn.Module) else None
    return ".".join(live)


def injection_record(model: nn.Module) -> InjectionRecord | None:
    return getattr(unwrap(model), _RECORD_ATTR, None)


def require_record(model: nn.Module) -> InjectionRecord:
    record = injection_record(unwrap(model))
    if record is None:
        raise ValueError("This model has no adapters; call lightning_peft.inject(model, method) first.")
    return record


def clean_key(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def inject(model: nn.Module, method: PEFTMethod, adapter_name: str = "default") -> nn.Module:
    """Add ``method`` to ``model`` in place as adapter ``adapter_name``, and freeze everything else.

    Base weights are wrapped, never copied. A second adapter with another name can be added to the same
    model; :func:`set_adapter` chooses which one is active (and trainable).

    Args:
        model: Any ``nn.Module`` (a transformers model, a LightningModule, a plain network).
        method: The method and its hyperparameters, e.g. ``LoRA(r=8, target_modules=["q_proj", "v_proj"])``.
        adapter_name: Name of this adapter.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: the adapter name is taken, a target matches nothing, or parameters are already sharded.
    """
    if not isinstance(method, PEFTMethod):
        raise TypeError(f"inject expects a PEFTMethod (e.g. LoRA(...)), got {type(method).__name__}.")
    _refuse_data_parallel(model)
    wrapper, model = model, unwrap(model)
    record = injection_record(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name={adapter_name!r}: use a non-empty name without '.' (it becomes a module and state-dict "
            "key segment), e.g. 'default' or 'sql'."
        )
    if record is not None and adapter_name in record.methods:
        raise ValueError(
            f"Adapter '{adapter_name}' is already injected into this model ({record.methods[adapter_name].name}). "
            "Injecting twice would stack a second copy; pass another adapter_name, or call unload(model) first."
        )
    _refuse_sharded(model)
    if record is None:
        record = InjectionRecord(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    wrappers_before = {id(layer) for _, layer in adapter_layers(model)}
    try:
        method.inject_layers(model, adapter_name)
        method.inject_modules_to_save(model, adapter_name)
        guard_fast_paths(model, method.name)
    except Exception:
        # e.g. DoRA or PiSSA refused on a layer found after others were already wrapped: leave no half-adapter.
        discard_adapter(model, adapter_name, wrappers_before)
        raise
    for _, layer in adapter_layers(model):
        # New adapter modules start in train mode; follow the base so an eval()-ed model stays deterministic.
        layer.train(layer.base_layer.training)
    record.methods[adapter_name] = method
    object.__setattr__(model, _RECORD_ATTR, record)
    set_adapter(model, adapter_name)
    prepare_gradient_checkpointing(model)
    return wrapper


def discard_adapter(
    model: nn.Module, adapter_name: str, wrappers_before: set[int], previous_active: str | None = None
) -> None:
    """Take a half-injected or refused adapter out again, leaving the model as it was before it was added.

    Args:
        model: The model.
        adapter_name: The adapter to take out.
        wrappers_before: ``id`` of every adapter layer that existed before the adapter was added; newer wrappers
            are replaced by their base layer.
        previous_active: The adapter to make active again, if there are others.
    """
    for name, layer in reversed(list(adapter_layers(model))):
        if adapter_name in layer.adapter_names():
            layer.delete_adapter(adapter_name)
        if name and id(layer) not in wrappers_before:
            replace_module(model, name, layer.base_layer)
    record = injection_record(model)
    if record is None or adapter_name not in record.methods:
        return
    del record.methods[adapter_name]
    if record.methods:
        set_adapter(
            model, previous_active if previous_active in record.methods else next(iter(record.methods))
        )
    else:
        _restore_requires_grad(model, record)
        object.__delattr__(model, _RECORD_ATTR)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` (its parameters and layers); other adapters stay exactly as they were.

    Layers left holding no adapter are replaced by their base layer. Deleting the active adapter makes the first
    remaining one active; deleting the last adapter restores the base model as :func:`unload` does.

    Args:
        model: A model with injected adapters.
        adapter_name: The adapter to remove.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: ``adapter_name`` is not an adapter of this model (the known names are listed).
    """
    outer, model = model, unwrap(model)
    record = require_record(model)
    if adapter_name not in record.methods:
        raise ValueError(
            f"Cannot delete adapter '{adapter_name}': this model has {sorted(record.methods)}. "
            "Pass one of those names."
        )
    # Wrappers that still hold another adapter stay; discard_adapter unwraps every other one it touches.
    kept = {id(layer) for _, layer in adapter_layers(model) if set(layer.adapter_names()) - {adapter_name}}
    previous_active = record.active if record.active != adapter_name else None
    discard_adapter(model, adapter_name, kept, previous_active)
    return outer


def _restore_requires_grad(model: nn.Module, record: InjectionRecord) -> None:
    for name, param in model.named_parameters():
        # Weights quantized during injection (QLoRA) were floats when recorded; integer tensors cannot require grad.
        if param.is_floating_point():
            param.requires_grad_(record.requires_grad.get(clean_key(name), True))


def guard_fast_paths(model: nn.Module, method: str) -> None:
    """Make every adapter run where PyTorch modules would read their children's weights instead of calling them.

    * ``nn.MultiheadAttention`` always reads ``out_proj.weight`` itself (``F.multi_head_attention_forward``): an
      adapter there would never run, so it is refused.
    * ``nn.TransformerEncoderLayer`` in eval mode takes a fused fast path that reads ``linear1.weight`` etc.; PyTorch
      leaves it whenever a submodule has a forward hook, so each adapter layer inside gets an empty one.

    Raises:
        ValueError: an adapter wraps a submodule of ``nn.MultiheadAttention``.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            wrapped = [
                f"{name}.{n}" for n, child in module.named_children() if isinstance(child, AdapterLayer)
            ]
            if wrapped:
                raise ValueError(
                    f"{method} targets {wrapped}, inside nn.MultiheadAttention {name!r}, which reads out_proj.weight "
                    "directly and never calls out_proj: the adapter would be silently skipped. Exclude it (e.g. "
                    "exclude_modules=['out_proj']) and target the feed-forward layers (linear1, linear2)."
                )
        elif isinstance(module, nn.TransformerEncoderLayer):
            for child in module.modules():
                if isinstance(child, AdapterLayer) and not getattr(child, _FAST_PATH_GUARD, False):
                    child.register_forward_pre_hook(_leave_fused_fast_path)
                    object.__setattr__(child, _FAST_PATH_GUARD, True)


def _leave_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """Does nothing: its presence makes ``nn.TransformerEncoderLayer`` call its submodules (see guard_fast_paths)."""


def _refuse_data_parallel(model: nn.Module) -> None:
    inner = model
    while not isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        if inner is (nxt := unwrap_once(inner)):
            return
        inner = nxt
    raise ValueError(
        f"The model is already wrapped in {type(inner).__name__}: adapters added now are unknown to its gradient "
        "synchronisation and would silently diverge across ranks. Inject first, then wrap (with Fabric: inject, "
        "then fabric.setup; with a Trainer: PEFTCallback does this in configure_model)."
    )


def unwrap_once(model: nn.Module) -> nn.Module:
    if isinstance(model, _FabricModule):
        return model._forward_module
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model._orig_mod if is_compiled(model) else model


def _refuse_sharded(model: nn.Module) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"Parameters are already sharded (DTensor), e.g. {sharded[0]}; adapters built from local shards would "
            "have wrong shapes. Inject before fully_shard/parallelize (PEFTCallback does this in configure_model)."
        )


def prepare_gradient_checkpointing(model: nn.Module) -> None:
    # With reentrant checkpointing and a frozen embedding, no input requires grad and the adapters inside the
    # checkpointed blocks would get no gradient; making the embedding output require grad fixes it (as peft does).
    if not hf.activation_checkpointing(model):
        return
    for module in model.modules():
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()
            return


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter: it alone runs in forward and is trainable."""
    model = unwrap(model)
    record = require_record(model)
    if adapter_name not in record.methods:
        raise ValueError(f"Unknown adapter '{adapter_name}'; this model has {sorted(record.methods)}.")
    record.active = adapter_name
    for _, layer in adapter_layers(model):
        layer.set_active_adapters([adapter_name])
    trainable = set(adapter_state_keys(model, adapter_name, parameters_only=True))
    for name, param in model.named_parameters():
        param.requires_grad_(clean_key(name) in trainable)


def adapter_state_keys(
    model: nn.Module, adapter_name: str | None = None, *, parameters_only: bool = False
) -> list[str]:
    """State-dict keys owned by adapter ``adapter_name`` (all adapters when ``None``), in model order."""
    model = unwrap(model)
    record = require_record(model)
    names = list(record.methods) if adapter_name is None else [adapter_name]
    keys: list[str] = []
    for name in names:
        for prefix, layer in adapter_layers(model):
            keys += [clean_key(f"{prefix}.{k}" if prefix else k) for k in layer.adapter_state_names(name)]
        keys += record.methods[name].extra_state_names(model, name)
    if parameters_only:
        params = {clean_key(n) for n, _ in model.named_parameters()}
        keys = [k for k in keys if k in params]
    return list(dict.fromkeys(keys))


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (no base weights), keyed as in ``model.state_dict()``.

    Args:
        model: A model with injected adapters.
        adapter_name: One adapter, or ``None`` for all of them.
    """
    model = unwrap(model)
    wanted = set(adapter_state_keys(model, adapter_name))
    # Keyed without the segments wrappers inside the model add (a compiled block's ``_orig_mod.``).
    return {clean_key(k): v for k, v in model.state_dict().items() if clean_key(k) in wanted}


def count_parameters(model: nn.Module) -> dict[str, float]:
    """``{"trainable", "total", "trainable_percent"}``; shared (tied) parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(_numel(p) for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


def _numel(param: torch.Tensor) -> int:
    # Packed low-bit weights (e.g. bitsandbytes 4-bit) report how many values they hold; DeepSpeed ZeRO-3
    # partitions hold an empty tensor and the full size in ds_numel.
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return (
        int(torch.Size(shape).numel())
        if shape is not None
        else int(getattr(param, "ds_numel", param.numel()))
    )


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active one) into the base weights; outputs stay the same. Idempotent.

    Raises:
        NotMergeableError: a requested adapter's method cannot be merged.
        ValueError: merging would produce NaN/Inf weights; nothing is changed.
    """
    outer, model = model, unwrap(model)
    record = require_record(model)
    names = adapter_names or [record.active]
    for name in names:
        method = record.methods[name]
        if not method.mergeable:
            raise NotMergeableError(
                f"{method.name} (adapter '{name}') cannot be merged into the base weights: it changes what the model "
                "computes, not only its weights. Keep it unmerged, or save it with save_adapter."
            )
    layers = [(layer, [n for n in names if n in layer.adapter_names()]) for _, layer in adapter_layers(model)]
    # Check every layer before changing any, so a refused merge (e.g. NaN/Inf) leaves the whole model as it was.
    for layer, layer_names in layers:
        for name in layer_names:
            if name not in layer.merged_adapters:
                layer.check_merge(name)
    for layer, layer_names in layers:
        layer.merge(layer_names)
    return outer


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore the base weights and run adapters separately again."""
    outer, model = model, unwrap(model)
    require_record(model)
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return outer


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every adapter is bypassed (merged ones are unmerged first)."""
    outer, model = model, unwrap(model)
    require_record(model)
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield outer
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def unload(model: nn.Module, *, merge_adapters: bool = False) -> nn.Module:
    """Remove every adapter and return the plain base model (in place).

    With ``merge_adapters=True`` the active adapter is merged first and ``modules_to_save`` keep their trained
    copy; otherwise the base model is restored exactly, including parameters' original ``requires_grad``.
    """
    outer, model = model, unwrap(model)
    record = require_record(model)
    if merge_adapters:
        merge(model)
    else:
        unmerge(model)
    for name, layer in reversed(list(adapter_layers(model))):
        keep = layer.base_layer
        if merge_adapters and isinstance(layer, ModulesToSave) and layer.active_adapters:
            keep = layer.modules_to_save[layer.active_adapters[0]]
        if name:
            replace_module(model, name, keep)
    _restore_requires_grad(model, record)
    object.__delattr__(model, _RECORD_ATTR)
    return outer


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return a plain model with no adapter layers."""
    return unload(model, merge_adapters=True)
