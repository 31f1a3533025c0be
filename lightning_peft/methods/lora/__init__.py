"""The LoRA family: LoRA (with rsLoRA, DoRA, PiSSA and OLoRA inits), QLoRA on 4-bit bases, AdaLoRA, and the
LoRA+ / LoRA-FA optimizers."""

from lightning_peft.methods.lora.adalora import AdaLoRA
from lightning_peft.methods.lora.lora import LoRA
from lightning_peft.methods.lora.optimizers import LoRAFAAdamW, LoRAPlusAdamW, loraplus_param_groups
from lightning_peft.methods.lora.qlora import QLoRA

__all__ = ["AdaLoRA", "LoRA", "LoRAFAAdamW", "LoRAPlusAdamW", "QLoRA", "loraplus_param_groups"]
