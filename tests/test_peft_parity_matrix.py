"""Every method Hugging Face peft also has, on Llama, GPT-2 and BERT, both directions through adapter directories.

ours -> peft: our ``save_adapter`` directory loads with ``peft.PeftModel.from_pretrained`` and gives our outputs.
peft -> ours: peft's ``save_pretrained`` directory loads with ``load_adapter`` and gives peft's outputs.
Adapter weights are randomised first so that a dropped or misplaced tensor changes the output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import inject, load_adapter, save_adapter
from lightning_peft.methods import IA3, AdaLoRA, LoRA, PrefixTuning, PromptTuning, PTuning
from tests.peft_reference import reference_outputs
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

N = 4  # virtual tokens

FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, dict[str, list[str]]]] = {
    # family: (builder, peft task type, targets per method kind)
    "llama": (tiny_llama, "CAUSAL_LM", {"attn": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"], "ff": ["down_proj"]}),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", {"attn": ["c_attn"], "ia3": ["c_attn", "mlp.c_proj"], "ff": ["mlp.c_proj"]}),
    "bert": (tiny_bert_classifier, "SEQ_CLS", {"attn": ["query", "value"], "ia3": ["key", "value", "output.dense"], "ff": ["output.dense"]}),
}  # fmt: skip


def pair(method: str, family: str) -> tuple[object, object]:
    """(our method, the equivalent peft config)."""
    _, task, targets = FAMILIES[family]
    head = ["classifier"] if family == "bert" else None
    if method == "lora":
        return (
            LoRA(r=4, alpha=8, target_modules=targets["attn"], use_rslora=True, modules_to_save=head),
            peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=targets["attn"], use_rslora=True, modules_to_save=head
            ),
        )
    if method == "dora":
        return (
            LoRA(r=4, alpha=8, target_modules=targets["attn"], use_dora=True, modules_to_save=head),
            peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=targets["attn"], use_dora=True, modules_to_save=head
            ),
        )
    if method == "adalora":
        kwargs = dict(init_r=6, target_r=4, target_modules=targets["attn"], total_step=10)
        return (
            AdaLoRA(alpha=8, modules_to_save=head, **kwargs),
            peft.AdaLoraConfig(lora_alpha=8, modules_to_save=head, task_type=task, **kwargs),
        )
    if method == "ia3":
        return (
            IA3(target_modules=targets["ia3"], feedforward_modules=targets["ff"], modules_to_save=head),
            peft.IA3Config(
                target_modules=targets["ia3"], feedforward_modules=targets["ff"], modules_to_save=head
            ),
        )
    if method == "prompt_tuning":
        return (
            PromptTuning(num_virtual_tokens=N, modules_to_save=head),
            peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N),
        )
    if method == "p_tuning":
        return (
            PTuning(num_virtual_tokens=N, encoder_hidden_size=32, modules_to_save=head),
            peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=32),
        )
    if method == "prefix_tuning":
        return (
            PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=32, modules_to_save=head),
            peft.PrefixTuningConfig(
                task_type=task, num_virtual_tokens=N, encoder_hidden_size=32, prefix_projection=True
            ),
        )
    raise AssertionError(method)


PROMPT_METHODS = {"prompt_tuning", "p_tuning", "prefix_tuning"}
METHODS = ["lora", "dora", "adalora", "ia3", *sorted(PROMPT_METHODS)]


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def outputs(model: nn.Module, family: str, method: str, from_peft: bool) -> torch.Tensor:
    ids = token_batch(batch=2, length=9)
    logits = reference_outputs(model, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if from_peft and method in PROMPT_METHODS - {"prefix_tuning"} and family != "bert":
        logits = logits[:, N:]  # peft keeps the virtual positions in token-level outputs; ours drop them
    return logits


def base(family: str) -> nn.Module:
    model = FAMILIES[family][0]()
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_ours_loads_in_peft(method: str, family: str, tmp_path: Path) -> None:
    ours_method, _ = pair(method, family)
    ours = inject(base(family), ours_method)
    randomise(ours, seed=1)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(family), tmp_path).eval()
    torch.testing.assert_close(
        outputs(theirs, family, method, True), outputs(ours.eval(), family, method, False), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_peft_directory_loads_in_ours(method: str, family: str, tmp_path: Path) -> None:
    _, peft_config = pair(method, family)
    theirs = peft.get_peft_model(base(family), peft_config)
    randomise(theirs, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base(family), tmp_path).eval()
    torch.testing.assert_close(
        outputs(ours, family, method, False), outputs(theirs.eval(), family, method, True), atol=1e-5, rtol=0
    )
