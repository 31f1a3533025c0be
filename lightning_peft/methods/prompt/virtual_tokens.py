"""The adapter layer of the soft-prompt methods: :class:`VirtualTokens`, and the prefix layout.

Soft prompts change what the model reads, not its weights, so they need no wrapper around any attention or
linear layer. :class:`VirtualTokens` wraps the model's input embedding instead (transparent in forward) and owns
each adapter's *prompt encoder*: any module whose ``forward()`` returns the adapter's ``n`` virtual tokens. Being
an :class:`AdapterLayer`, it gives the soft prompts the same state-dict keys, freezing, ``set_adapter``,
``disable_adapters``, ``unload`` and checkpoints as every other method. What the virtual tokens mean is recorded
per adapter in a :class:`VirtualTokenSpec`:

* ``"prompt"``: ``(n, dim)`` vectors prepended to the input embeddings (Prompt Tuning, P-Tuning);
* ``"prefix"``: ``(n, L * 2 * n_kv_heads * head_dim)``, ``L`` key/value pairs (Prefix Tuning, P-Tuning v2): cache
  layer ``i`` reads pair ``spec.cache_layers[i]`` - pair ``i`` on decoder-only and encoder models; on an
  encoder-decoder, whose decoder self-attention reads the prefix, peft's layout (see :func:`decoder_pairs`).

:mod:`lightning_peft.methods.prompt.hooks` applies them to each call of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer

#: What an adapter's virtual tokens are: input vectors, or per-layer keys and values. Each method declares its kind
#: (``PromptLearningMethod.kind``) and its spec records it.
Kind = Literal["prompt", "prefix"]


@dataclass(frozen=True)
class VirtualTokenSpec:
    """What an adapter's encoder output means: ``n`` prompt vectors, or ``n`` key/value pairs per layer."""

    kind: Kind
    num_virtual_tokens: int
    num_layers: int = 0  # key/value pairs in the flat prefix (peft's num_layers)
    num_kv_heads: int = 0
    head_dim: int = 0
    #: The pair each cache layer reads; empty: layer ``i`` reads pair ``i`` for each of the ``num_layers``.
    layer_pairs: tuple[int, ...] = ()
    #: peft's ``num_transformer_submodules``: 2 for its encoder-decoder prefix layout, else 1.
    num_transformer_submodules: int = 1

    @property
    def width(self) -> int:
        """Width of one row of a flat prefix: ``L * 2 * n_kv_heads * head_dim``."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """For each cache layer the attention reads, the pair of the flat prefix it gets."""
        return self.layer_pairs or tuple(range(self.num_layers))


def decoder_pairs(num_layers: int, decoder_layers: int) -> tuple[int, ...]:
    """The prefix pair each decoder layer of an encoder-decoder reads, as peft lays it out.

    peft (``num_transformer_submodules=2``, its ``SEQ_2_SEQ_LM`` default) repeats the ``L`` pairs of the flat
    prefix, splits the ``2L`` into one (self key, self value, cross key, cross value) group per layer and then drops
    the cross-attention part: decoder layer ``i`` reads pair ``2i mod L`` and pairs ``2i + 1 mod L`` go unread (with
    ``L >= 2``, half the pairs, and layers ``i`` and ``i + L/2`` share one).
    """
    return tuple(2 * i % num_layers for i in range(decoder_layers))


class PromptEmbedding(nn.Module):
    """``n`` trained vectors used as they are: Prompt Tuning, P-Tuning v2, and any encoder frozen for inference."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, width)


class VirtualTokens(AdapterLayer):
    """Wraps the input embedding (unchanged in forward) and holds each adapter's prompt encoder."""

    adapter_attrs = ("prompt_encoder", "prefix_gates")
    adapter_settings = ("specs",)
    supports_mixed_batch = True  # prompt kinds only (check_rows): row i gets adapter i's virtual tokens

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_encoder = nn.ModuleDict()
        # Optional per adapter: one gate per layer on its prefix (UniPELT), applied by that method's attention hooks.
        self.prefix_gates = nn.ModuleDict()
        self.specs: dict[str, VirtualTokenSpec] = {}

    def add_adapter(self, adapter_name: str, encoder: nn.Module, spec: VirtualTokenSpec) -> None:  # type: ignore[override]
        self.prompt_encoder[adapter_name] = encoder
        self.specs[adapter_name] = spec
        self.active_adapters = [*self.active_adapters, adapter_name]

    def adapted_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The embedding itself: the virtual tokens join the inputs in the model's hooks (``prompt.hooks``)."""
        return self.base_layer(*args, **kwargs)

    def forward_rows(self, row_adapters: list[str | None], *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)  # the prompts join the inputs in the hooks, per row

    def check_rows(self, row_adapters: list[str | None]) -> None:
        specs = [self.specs.get(name) if name is not None else None for name in row_adapters]
        if any(spec is None for spec in specs):
            raise ValueError(
                f"mixed_batch rows {row_adapters}: with soft prompts every row must name one of this model's prompt "
                f"adapters {sorted(self.specs)} (a row without virtual tokens would be shorter than the others); "
                "run base-model rows in a separate batch."
            )
        kinds = {(spec.kind, spec.num_virtual_tokens) for spec in specs}
        if len(kinds) > 1 or next(iter(kinds))[0] != "prompt":
            raise ValueError(
                f"mixed_batch rows {row_adapters}: rows need prompt adapters (PromptTuning/PTuning; a prefix is one "
                f"cache for the whole batch) of one length, got (kind, virtual tokens) {sorted(kinds)}."
            )

    def prompt_source(self) -> str | tuple[str, ...] | None:
        """What the next call's virtual tokens come from: one adapter per row in a mixed batch, else the active one."""
        if self.row_adapters is not None and not self.disabled:
            return tuple(self.row_adapters)
        return self.active_adapter()

    def spec(self, source: str | tuple[str, ...]) -> VirtualTokenSpec:
        return self.specs[source[0] if isinstance(source, tuple) else source]

    def active_adapter(self) -> str | None:
        """The adapter whose virtual tokens the next call gets (``None`` when disabled)."""
        if self.disabled:
            return None
        return next((a for a in self.active_adapters if a in self.specs), None)

    def virtual_tokens(self, adapter_name: str) -> torch.Tensor:
        """The encoder's output, ``(n, width)``: what inference needs and what the peft format saves."""
        return self.prompt_encoder[adapter_name]()

    def prompts(self, source: str | tuple[str, ...], batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """``(B, n, d)``: one adapter's prompts for every row, or (a tuple of names) row ``i``'s adapter's."""
        if isinstance(source, tuple):
            if len(source) != batch_size:
                raise ValueError(
                    f"mixed_batch was given {len(source)} adapter names but the call has a batch of {batch_size} "
                    "rows; pass one name per row of the batch."
                )
            tokens = {
                name: self.virtual_tokens(name).to(dtype) for name in dict.fromkeys(source)
            }  # once each
            return torch.stack([tokens[name] for name in source])
        # (n, d) -> (B, n, d); expanded, not copied: every row's gradient reaches the same parameters
        return self.virtual_tokens(source).to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def prefix(
        self, adapter_name: str, batch_size: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each cache layer's ``(key, value)``, ``(B, n_kv_heads, n, head_dim)``."""
        spec = self.specs[adapter_name]
        pairs = prefix_key_values(self.virtual_tokens(adapter_name).to(dtype), spec, batch_size)
        return [pairs[p] for p in spec.cache_layers]

    def freeze_encoder(self, adapter_name: str) -> None:
        """Replace the encoder by its output, a plain (frozen) embedding table: all that inference needs."""
        with torch.no_grad():
            weight = self.virtual_tokens(adapter_name).detach().clone()
        frozen = PromptEmbedding(weight)
        frozen.requires_grad_(False)
        self.prompt_encoder[adapter_name] = frozen


def prefix_key_values(
    flat: torch.Tensor, spec: VirtualTokenSpec, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a flat prefix into per-layer ``(key, value)``, each ``(B, n_kv_heads, n, head_dim)``.

    A row is laid out layer-major, then key/value, then head, then channel: peft's layout, so a saved
    ``prompt_embeddings`` means the same in both libraries.
    """
    n = flat.shape[0]
    # (n, L*2*H*D) -> (n, L*2, H, D) -> (L*2, H, n, D) -> (L*2, B, H, n, D)
    per_layer = flat.view(n, spec.num_layers * 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 0, 3)
    per_layer = per_layer.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
    return [(per_layer[2 * i], per_layer[2 * i + 1]) for i in range(spec.num_layers)]


def flatten_key_values(key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`prefix_key_values` for one sequence: ``L x (1, H, n, D)`` pairs -> ``(n, L*2*H*D)``."""
    stacked = torch.stack([t[0] for kv in key_values for t in kv])  # (L*2, H, n, D)
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)


def virtual_tokens_layer(model: nn.Module) -> tuple[str, VirtualTokens]:
    """The name and the :class:`VirtualTokens` layer of a model with a soft-prompt adapter."""
    for name, module in model.named_modules():
        if isinstance(module, VirtualTokens):
            return name, module
    raise ValueError(f"{type(model).__name__} has no soft-prompt adapter; inject one first.")


def freeze_prompt_encoder(model: nn.Module, adapter_name: str = "default") -> None:
    """Replace an adapter's prompt encoder (P-Tuning's MLP/LSTM, Prefix Tuning's MLP) by its output.

    Inference then needs no encoder; the output is what :func:`~lightning_peft.save_adapter` writes and what loading
    a peft-format directory gives.
    """
    virtual_tokens_layer(model)[1].freeze_encoder(adapter_name)
