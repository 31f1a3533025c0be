"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

The public API below is imported on first use (PEP 562): ``import lightning_peft`` and the ``lightning-peft``
command's overview do not pay for torch, transformers and Lightning (about 5 s on 2 CPU cores); the first
``lightning_peft.inject`` (or ``from lightning_peft import inject``) imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name and the module defining it. The imports under TYPE_CHECKING name the same modules, so type
# checkers see the API and tests/test_layers.py checks these dependencies like any other import.
_EXPORTS = {
    "adapter_state_dict": "lightning_peft.core.injection",
    "count_parameters": "lightning_peft.core.injection",
    "delete_adapter": "lightning_peft.core.injection",
    "disable_adapters": "lightning_peft.core.injection",
    "inject": "lightning_peft.core.injection",
    "merge": "lightning_peft.core.injection",
    "merge_and_unload": "lightning_peft.core.injection",
    "set_adapter": "lightning_peft.core.injection",
    "unload": "lightning_peft.core.injection",
    "unmerge": "lightning_peft.core.injection",
    "mixed_batch": "lightning_peft.core.mixed_batch",
    "hotswap_adapter": "lightning_peft.formats.hotswap",
    "prepare_model_for_compiled_hotswap": "lightning_peft.formats.hotswap",
    "load_adapter": "lightning_peft.formats.peft_directory",
    "save_adapter": "lightning_peft.formats.peft_directory",
    "PEFTCallback": "lightning_peft.integrations.callback",
    "add_weighted_adapter": "lightning_peft.methods.lora.weighted",
}

if TYPE_CHECKING:
    from lightning_peft.core.injection import (
        adapter_state_dict,
        count_parameters,
        delete_adapter,
        disable_adapters,
        inject,
        merge,
        merge_and_unload,
        set_adapter,
        unload,
        unmerge,
    )
    from lightning_peft.core.mixed_batch import mixed_batch
    from lightning_peft.formats.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from lightning_peft.formats.peft_directory import load_adapter, save_adapter
    from lightning_peft.integrations.callback import PEFTCallback
    from lightning_peft.methods.lora.weighted import add_weighted_adapter

__version__ = "0.1.0"

__all__ = [
    "PEFTCallback",
    "adapter_state_dict",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "hotswap_adapter",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "prepare_model_for_compiled_hotswap",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
]  # the keys of _EXPORTS (tests/test_layers.py)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
