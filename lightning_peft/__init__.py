"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning."""

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
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
]
