"""PEFT methods: one file per method family, each a :class:`PEFTMethod` subclass."""

from lightning_peft.core.adapter_layer import AdapterLayer, ModulesToSave, NotMergeableError
from lightning_peft.core.contract import PEFTMethod
from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.bitfit import BitFit
from lightning_peft.methods.composite.compose import ComposedMethod, MethodUnion
from lightning_peft.methods.composite.mam_adapter import MAMAdapter
from lightning_peft.methods.composite.unipelt import UniPELT
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora.adalora import AdaLoRA
from lightning_peft.methods.lora.lora import LoRA
from lightning_peft.methods.lora.qlora import QLoRA
from lightning_peft.methods.prompt.p_tuning import PTuning
from lightning_peft.methods.prompt.prefix_tuning import PrefixTuning, PTuningV2
from lightning_peft.methods.prompt.prompt_tuning import PromptTuning
from lightning_peft.methods.trainable_tokens import TrainableTokens

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
    "TrainableTokens",
    "UniPELT",
]
