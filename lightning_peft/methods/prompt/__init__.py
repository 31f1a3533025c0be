"""Soft prompts and prefixes: Prompt Tuning, P-Tuning, Prefix Tuning and P-Tuning v2."""

from lightning_peft.methods.prompt.p_tuning import PTuning
from lightning_peft.methods.prompt.prefix_tuning import PrefixTuning, PTuningV2
from lightning_peft.methods.prompt.prompt_tuning import PromptTuning

__all__ = ["PTuning", "PTuningV2", "PrefixTuning", "PromptTuning"]
