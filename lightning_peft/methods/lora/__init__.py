"""The LoRA family: LoRA (with rsLoRA, DoRA, PiSSA/OLoRA-style inits), QLoRA on 4-bit bases, AdaLoRA."""

from lightning_peft.methods.lora.adalora import AdaLoRA
from lightning_peft.methods.lora.lora import LoRA
from lightning_peft.methods.lora.qlora import QLoRA

__all__ = ["AdaLoRA", "LoRA", "QLoRA"]
