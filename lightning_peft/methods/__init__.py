"""PEFT methods: one file per method family, each a :class:`PEFTMethod` subclass."""

from lightning_peft.methods.base import AdapterLayer, ModulesToSave, NotMergeableError, PEFTMethod
from lightning_peft.methods.lora import LoRA

__all__ = ["AdapterLayer", "LoRA", "ModulesToSave", "NotMergeableError", "PEFTMethod"]
