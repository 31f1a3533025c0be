"""Lightning Fabric: adapter-only ``fabric.save`` and exact resume.

The Fabric flow is the Trainer's in three lines: inject before ``fabric.setup`` (so DDP/FSDP see the adapters),
save through Fabric's ``filter=`` so the file holds only the adapter, and load non-strictly::

    model = inject(model, LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-3))
    ...
    state = {"model": model, "optimizer": optimizer, "step": step}
    fabric.save(path, state, filter={"model": adapter_filter(model)})
    ...
    remainder = fabric.load(path, state, strict=False)   # the base weights come from the model itself

``save_adapter``/``adapter_state_dict`` take the module ``fabric.setup`` returns as they take the plain one. A model
that calls ``torch.utils.checkpoint(..., use_reentrant=True)`` over frozen inputs needs the probe the Trainer
callback runs: ``probe = InputGradientProbe(model)`` before the loop, ``probe.decide(loss)`` before the first
``fabric.backward(loss)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from lightning_peft.core.injection import adapter_state_keys, clean_key, unwrap
from lightning_peft.integrations.gradient_flow import InputGradientProbe

__all__ = ["InputGradientProbe", "adapter_filter", "trainable_parameters"]


def adapter_filter(model: nn.Module, adapter_name: str | None = None) -> Callable[[str, Any], bool]:
    """A ``fabric.save(..., filter={"model": ...})`` predicate keeping the adapter's tensors and anything else
    that trains (e.g. a head beside the adapted backbone).

    Raises:
        ValueError: the model holds no adapter (nothing would be saved).
    """
    inner = unwrap(model)
    keys = set(adapter_state_keys(inner, adapter_name))
    keys |= {clean_key(n) for n, p in inner.named_parameters() if p.requires_grad}
    if not keys:
        raise ValueError("adapter_filter: the model holds no adapter tensors; inject a method first.")
    return lambda key, value: clean_key(key) in keys


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters an optimizer should hold after injection (the frozen base is left out)."""
    return (p for p in model.parameters() if p.requires_grad)
