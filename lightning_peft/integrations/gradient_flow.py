"""Adapters inside reentrant activation checkpoints get their gradients, in any module.

``torch.utils.checkpoint(fn, *inputs, use_reentrant=True)`` records a graph only
when one of ``inputs`` requires grad. Below frozen layers nothing does (token
ids, a frozen embedding's output, a batch of images), so every adapter inside
the checkpointed block silently gets no gradient. transformers fixes its own
models with ``enable_input_require_grads`` when its checkpointing is switched on;
a user's module that calls ``torch.utils.checkpoint`` itself gets no such fix.

:class:`InputGradientProbe` handles any module without knowing how it
checkpoints: for the first step it makes the model's frozen inputs require grad
(outputs of frozen embeddings; floating-point tensors passed to the model) and
then looks in that step's autograd graph for a reentrant checkpoint node. Found,
the hooks stay (as transformers' do); not found, they are removed, so models
that do not checkpoint pay nothing after the first step. Parameter gradients
are the same either way; only input gradients are added.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_REENTRANT_NODE = "CheckpointFunctionBackward"


def _require_grad(tensor: Any) -> Any:
    frozen = isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.requires_grad
    return tensor.detach().requires_grad_(True) if frozen and torch.is_grad_enabled() else tensor


def _embedding_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return _require_grad(output)


def _input_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_require_grad(a) for a in args)


def uses_reentrant_checkpointing(loss: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``loss`` holds a reentrant checkpoint."""
    if loss.grad_fn is None:
        return False
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == _REENTRANT_NODE:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return False


class InputGradientProbe:
    """Make ``model``'s frozen inputs require grad until :meth:`decide` sees the first loss."""

    def __init__(self, model: nn.Module) -> None:
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(_input_pre_hook)]
        for module in model.modules():
            if isinstance(module, nn.Embedding) and not module.weight.requires_grad:
                self._handles.append(module.register_forward_hook(_embedding_output_hook))
        self.decided = False
        self.kept = False

    def decide(self, loss: torch.Tensor) -> bool:
        """Keep the hooks if ``loss`` came through a reentrant checkpoint, else remove them; returns which."""
        if not self.decided:
            self.decided = True
            self.kept = uses_reentrant_checkpointing(loss)
            if not self.kept:
                self.remove()
        return self.kept

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
