"""The chunked causal-LM loss equals the model's own loss, and gives the same gradients, on a LoRA'd tiny Llama."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.app.tasks import CausalLMModule, check_separable_head, chunked_causal_lm_loss
from lightning_peft.core.injection import inject
from lightning_peft.methods import LoRA
from lightning_peft.testing.models import DECODER, tiny_llama, token_batch


def _module(
    chunk: int | None, target_modules: list[str], modules_to_save: list[str] | None = None
) -> CausalLMModule:
    module = CausalLMModule(model_config={"model_type": "llama", **DECODER}, loss_chunk_size=chunk)
    model = tiny_llama(seed=3)
    inject(
        model, LoRA(r=4, alpha=8, target_modules=target_modules, modules_to_save=modules_to_save), "default"
    )
    torch.manual_seed(5)
    for p in model.parameters():  # LoRA B starts at zero: give every adapter a nonzero effect
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    module.model = model.train()
    return module


def _batch() -> dict[str, torch.Tensor]:
    ids = token_batch(batch=3, length=19, seed=2)  # (3, 19): 18 shifted targets per row
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[1, 12:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(module: CausalLMModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    loss = module.loss(_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("targets", "to_save"),
    [(["q_proj", "v_proj"], None), (["q_proj", "lm_head"], None), (["v_proj"], ["lm_head"])],
    ids=["lora", "lora-on-lm_head", "lm_head-in-modules_to_save"],
)
def test_chunked_loss_equals_plain(targets: list[str], to_save: list[str] | None) -> None:
    plain_loss, plain_grads = _loss_and_grads(_module(None, targets, to_save))
    chunked_loss, chunked_grads = _loss_and_grads(
        _module(7, targets, to_save)
    )  # 7 does not divide 3*18 - kept
    assert abs(plain_loss.item() - chunked_loss.item()) <= 1e-6
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    if to_save or "lm_head" in targets:
        assert any("lm_head" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert (grad - chunked_grads[name]).abs().max().item() <= 1e-5, name


def test_chunked_loss_ignores_every_minus_100() -> None:
    hidden = torch.randn(2, 5, 4)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 1
    head = torch.nn.Linear(4, 6)
    expected = torch.nn.functional.cross_entropy(head(hidden[0, 2]).unsqueeze(0), torch.tensor([1]))
    assert torch.allclose(chunked_causal_lm_loss(hidden, labels, head, 1), expected, atol=1e-7)


def test_soft_capped_logits_are_refused() -> None:
    model = tiny_llama()
    head = model.lm_head
    model.lm_head = torch.nn.Sequential(head)  # logits = head(hidden), still separable

    check_separable_head(model, {"input_ids": token_batch(1, 6)})
    original = model.forward

    def capped(*args, **kwargs):
        output = original(*args, **kwargs)
        output.logits = torch.tanh(output.logits / 2) * 2
        return output

    model.forward = capped
    with pytest.raises(ValueError, match="soft-caps"):
        check_separable_head(model, {"input_ids": token_batch(1, 6)})


def test_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        CausalLMModule(model_config={"model_type": "llama", **DECODER}, loss_chunk_size=0)


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_head_calls_per_chunk_and_equal_gradients(trainable_head: bool) -> None:
    """A frozen head runs once per chunk (its gradient is taken in forward, none recomputed in backward); a
    trainable one runs again in backward under checkpointing. Both give the plain loss and gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(trainable_head)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :4] = -100  # 22 shifted targets, 19 kept: chunks of 5, 5, 5, 4
    loss = chunked_causal_lm_loss(hidden, labels, head, 5)
    loss.backward()
    assert calls == [5, 5, 5, 4] + ([4, 5, 5, 5] if trainable_head else [])  # recomputed last chunk first
    grads = [hidden.grad] + ([head.weight.grad] if trainable_head else [])
    plain_hidden = hidden.detach().clone().requires_grad_(True)
    plain_head = torch.nn.Linear(8, 50, bias=False).requires_grad_(trainable_head)
    plain_head.weight.data.copy_(head.weight.data)
    plain = torch.nn.functional.cross_entropy(
        plain_head(plain_hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    plain.backward()
    assert abs(plain.item() - loss.item()) <= 1e-6
    plain_grads = [plain_hidden.grad] + ([plain_head.weight.grad] if trainable_head else [])
    for ours, theirs in zip(grads, plain_grads, strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-6


def test_no_grad_loss_equals_the_training_one() -> None:
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        evaluated = chunked_causal_lm_loss(hidden, labels, head, 7)
    assert not evaluated.requires_grad
    assert torch.equal(evaluated, chunked_causal_lm_loss(hidden, labels, head, 7).detach())
