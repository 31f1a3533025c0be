"""The adapter-layer protocol: :class:`AdapterLayer` wraps one frozen base layer and holds named adapters.

Knowing a layer's ``adapter_attrs`` (its ``ModuleDict``/``ParameterDict`` attributes keyed by adapter name) is enough
to find an adapter's parameters, drop or rename them for the peft file format, and switch adapters; every generic
utility (state dicts, merge, disable, delete) works through it and never on a concrete layer class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype of a new adapter on a base weight: fp32/fp64 bases keep theirs; half-precision (and quantized) bases
    get fp32 adapters, as peft's ``autocast_adapter_dtype``: tiny, and far better optimised."""
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight`` in the ``(out, in)`` orientation of ``nn.Linear`` when it is stored ``(in, out)`` (``fan_in_fan_out``:
    transformers' GPT-2 ``Conv1D``), else unchanged. A transpose is its own inverse, so the same call turns an
    ``(out, in)`` update back into the stored layout."""
    return weight.T if fan_in_fan_out else weight


#: The base layer attributes an adapter wrapper answers for its base layer (``wrapper.weight`` is
#: ``wrapper.base_layer.weight``), with the code that reads them on a wrapped module. Nothing else is forwarded: an
#: unknown name raises ``AttributeError`` naming the wrapper, so a typo or a fast path that would take the base
#: weight instead of calling the adapter surfaces instead of silently reading the base.
FORWARDED_ATTR_READERS: dict[str, str] = {
    # Every wrapped layer kind.
    "weight": "dtype/device checks in model code (T5's wo, ViT's patch projection), get_input_embeddings().weight, "
    "resize_token_embeddings and weight tying",
    "bias": "model code adding or checking a projection's bias; resize of an output head's bias",
    # nn.Linear (and bitsandbytes' Linear4bit/8bitLt).
    "in_features": "model code sizing from a projection; quantizer and resize utilities",
    "out_features": "model code sizing from a projection; resize of the output head",
    # transformers' GPT-2 Conv1D: nf = out_features, nx = in_features.
    "nf": "transformers' Conv1D users (pytorch_utils.prune_conv1d_layer, GPT-2-style models)",
    "nx": "transformers' Conv1D users (pytorch_utils.prune_conv1d_layer)",
    # nn.Embedding and scaled embeddings.
    "num_embeddings": "resize_token_embeddings, models checking the vocabulary size",
    "embedding_dim": "models and utilities sizing from the embedding",
    "padding_idx": "resize_token_embeddings, models masking the padding row",
    "max_norm": "nn.Embedding options read by code re-doing the lookup",
    "norm_type": "nn.Embedding options read by code re-doing the lookup",
    "scale_grad_by_freq": "nn.Embedding options read by code re-doing the lookup",
    "sparse": "nn.Embedding options read by code re-doing the lookup",
    "embed_scale": "scaled embeddings (BART, Gemma 3, ...): code multiplying a lookup by the embedding's scale",
    # nn.Conv1d/2d/3d.
    "in_channels": "convolutional models sizing from a convolution",
    "out_channels": "convolutional models sizing from a convolution",
    "kernel_size": "convolutional models computing output lengths (Whisper, wav2vec2)",
    "stride": "convolutional models computing output lengths (Whisper's conv1.stride, wav2vec2)",
    "padding": "convolutional models computing output lengths",
    "dilation": "convolutional models computing output lengths",
    "groups": "convolutional models (grouped/depthwise checks)",
    "padding_mode": "convolutional models re-doing the convolution",
    "output_padding": "transposed-convolution users",
    "transposed": "convolution users telling transposed convolutions apart",
}
FORWARDED_ATTRS: frozenset[str] = frozenset(FORWARDED_ATTR_READERS)


class NotMergeableError(RuntimeError):
    """Raised when merge is requested for a method that cannot fold into the base weights."""


class AdapterLayer(nn.Module):
    """Wraps a base layer (never copied) and holds named adapters.

    A subclass declares its per-adapter state and implements what differs between methods; the rules every
    adapter layer follows live here, once:

    * ``adapter_attrs``: the ``ModuleDict``/``ParameterDict`` attributes keyed by adapter name (its tensors);
    * ``adapter_settings``: plain ``dict`` attributes keyed by adapter name (rank, scaling, placement, ...);
    * :meth:`add_adapter` adds one adapter (its own arguments) and makes it active;
    * :meth:`adapted_forward` computes the output with the given adapters (the base layer's otherwise);
    * mergeable layers implement :meth:`merge_adapter`/:meth:`unmerge_adapter` (and :meth:`check_merge`);
    * ``supports_mixed_batch`` layers implement :meth:`forward_rows` (:func:`lightning_peft.mixed_batch`).

    :meth:`forward` then handles disabling (merged adapters are unmerged first), mixed batches and adapters already
    merged into the base weight; :meth:`delete_adapter` drops every declared attribute of one adapter.
    """

    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    adapter_settings: ClassVar[tuple[str, ...]] = ()
    supports_mixed_batch: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # One adapter name (or None: the base) per batch row, set only inside lightning_peft.mixed_batch.
        self.row_adapters: list[str | None] | None = None

    def __getattr__(self, name: str) -> Any:
        # Only the declared base-layer attributes (FORWARDED_ATTRS) pass through; anything else is a typo or a read
        # that must name the base explicitly (``layer.base_layer.<name>``), never a silent fall-through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            base = self.base_layer  # raises above when even that is missing (an object being unpickled)
            if name not in FORWARDED_ATTRS:
                raise AttributeError(
                    f"{type(self).__name__} (an adapter wrapper around {type(base).__name__}) has no attribute "
                    f"{name!r}. It forwards only the base layer attributes model code reads "
                    f"(lightning_peft.core.adapter_layer.FORWARDED_ATTRS); read others on its .base_layer."
                ) from None
            try:
                return getattr(base, name)
            except AttributeError:
                raise AttributeError(
                    f"{type(self).__name__} (an adapter wrapper around {type(base).__name__}) has no attribute "
                    f"{name!r}, and neither has its base layer."
                ) from None

    # --- what a layer implements ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` (trainable, initialised) and append it to ``active_adapters``."""
        raise NotImplementedError(f"{type(self).__name__} must implement add_adapter.")

    def adapted_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The output with ``adapter_names`` (active, held here, not merged; never empty) applied."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapted_forward.")

    def forward_rows(self, row_adapters: list[str | None], *args: Any, **kwargs: Any) -> Any:
        """Mixed batch: row ``i`` with adapter ``row_adapters[i]`` (``None``: the base); see ``supports_mixed_batch``."""
        raise NotImplementedError(f"{type(self).__name__} cannot pick an adapter per batch row.")

    def check_rows(self, row_adapters: list[str | None]) -> None:
        """Refuse, with the reason, per-row adapters this layer cannot serve together (checked on entering
        :func:`lightning_peft.mixed_batch`); any combination by default."""

    # --- the forward rules, once --------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            return self.forward_rows(self.row_adapters, *args, **kwargs)
        pending = self.pending_adapters()
        if not pending:  # no adapter here, or every active one is already in the base weight
            return self.base_layer(*args, **kwargs)
        return self.adapted_forward(pending, *args, **kwargs)

    def pending_adapters(self) -> list[str]:
        """Active adapters whose update is not already folded into the base weight."""
        return [a for a in self.active_adapters if a not in self.merged_adapters]

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
        """Remove every declared attribute of one adapter (unmerging it first); other adapters are untouched."""
        if adapter_name in self.merged_adapters:
            self.unmerge_adapter(adapter_name)
            self.merged_adapters.remove(adapter_name)
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        for attr in self.adapter_settings:
            getattr(self, attr).pop(adapter_name, None)
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

    def adapted_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save[adapter_names[0]](*args, **kwargs)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


# --- keys in Hugging Face peft's files ---------------------------------------------------------------------
#: What peft's files put before every module path (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str, adapter_name: str) -> str:
    """Our state-dict key -> the key peft writes (adapter name dropped, modules_to_save folded).

    Only the segment naming the adapter inside an adapter container (``lora_A.<name>``) is dropped, so an
    adapter named like a module path segment (``"0"``, ``"default"``) never removes part of the module path.
    """
    key = key.replace(f".modules_to_save.{adapter_name}.", ".")
    containers = adapter_attrs()
    parts = key.split(".")
    kept = [
        p for i, p in enumerate(parts) if not (p == adapter_name and i > 0 and parts[i - 1] in containers)
    ]
    return PEFT_PREFIX + ".".join(kept)


def adapter_attrs() -> set[str]:
    """Names of every adapter container attribute (``lora_A``, ``lora_magnitude_vector``, ...) of every method."""
    attrs: set[str] = set()
    pending = [AdapterLayer]
    while pending:
        cls = pending.pop()
        attrs.update(cls.adapter_attrs)
        pending += cls.__subclasses__()
    return attrs
