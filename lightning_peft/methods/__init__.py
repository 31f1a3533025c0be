"""PEFT methods: one file per method family, each a :class:`PEFTMethod` subclass."""

from lightning_peft.methods.adalora import AdaLoRA
from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.base import AdapterLayer, ModulesToSave, NotMergeableError, PEFTMethod
from lightning_peft.methods.bitfit import BitFit
from lightning_peft.methods.compose import ComposedMethod, MethodUnion
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.mam_adapter import MAMAdapter
from lightning_peft.methods.p_tuning import PTuning
from lightning_peft.methods.prefix_tuning import PrefixTuning, PTuningV2
from lightning_peft.methods.prompt_tuning import PromptTuning
from lightning_peft.methods.qlora import QLoRA
from lightning_peft.methods.unipelt import UniPELT

__all__ = [
    "IA3",
    "AdaLoRA",
    "Adapter",
    "AdapterLayer",
    "BitFit",
    "ComposedMethod",
    "LoRA",
    "MAMAdapter",
    "MethodUnion",
    "ModulesToSave",
    "NotMergeableError",
    "PEFTMethod",
    "PTuning",
    "PTuningV2",
    "PrefixTuning",
    "PromptTuning",
    "QLoRA",
    "UniPELT",
]
