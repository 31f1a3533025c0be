"""Per-row adapters in one batch: row ``i`` runs with adapter ``adapter_names[i]``.

As Hugging Face ``peft``'s ``adapter_names=[...]`` in forward, but a context manager, so any model's ``forward``
(and ``generate``) works without a new keyword argument. Works through the layer protocol: a layer declares
``supports_mixed_batch`` and implements ``forward_rows``; no layer class is named here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.core.injection import require_record


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch runs with adapter ``adapter_names[i]`` (``None``: the base model).

    Rows are grouped by adapter, so each adapter runs once per layer on its own rows; each row's output equals a
    single-adapter run of that row. Outside the block the layers run exactly as before (the active adapter only).

    Example::

        with lightning_peft.mixed_batch(model, ["sql", "chat", None]):
            logits = model(input_ids).logits  # input_ids has 3 rows

    Args:
        model: A model with LoRA-family, IA3 or prompt-tuning/P-tuning adapters (prompts: every row names one,
            all of the same length; each row then gets its own virtual tokens, also in ``generate()``).
        adapter_names: One adapter name or ``None`` per batch row.

    Raises:
        ValueError: a name is unknown, an adapter is merged into the base weights, or an adapter (or the active
            one) lives in a layer that cannot pick an adapter per row (prompt methods, bottleneck adapters,
            ``modules_to_save``, AdaLoRA).
    """
    record = require_record(model)
    rows = list(adapter_names)
    named = {n for n in rows if n is not None}
    unknown = sorted(named - set(record.methods))
    if unknown:
        raise ValueError(f"mixed_batch: unknown adapters {unknown}; this model has {sorted(record.methods)}.")
    layers = list(adapter_layers(model))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"mixed_batch: adapters are merged into the base weights (e.g. {merged[0]}), so every row would get them; "
            "call lightning_peft.unmerge(model) first."
        )
    for adapter in sorted(named | {record.active}):
        method = record.methods[adapter]
        if method.modifies_inputs and not method.rewrites_inputs_per_row:
            raise ValueError(
                f"mixed_batch: adapter '{adapter}' ({method.name}) rewrites the model's inputs and cannot vary per row; "
                "mixed batches support the LoRA family, IA3 and prompt tuning / P-tuning."
            )
    for name, layer in layers:
        involved = set(layer.adapter_names()) & (named | set(layer.active_adapters))
        if involved and not layer.disabled and not layer.supports_mixed_batch:
            raise ValueError(
                f"mixed_batch: {name} ({type(layer).__name__}) holds adapters {sorted(involved)} but cannot pick an "
                "adapter per row; mixed batches support the LoRA family, IA3 and prompt tuning / P-tuning layers."
            )
        if involved and not layer.disabled:
            layer.check_rows(rows)
    capable = [layer for _, layer in layers if layer.supports_mixed_batch]
    for layer in capable:
        layer.row_adapters = rows
    try:
        yield model
    finally:
        for layer in capable:
            layer.row_adapters = None
