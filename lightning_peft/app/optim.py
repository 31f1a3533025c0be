"""Paged AdamW from bitsandbytes (the QLoRA paper's "paged optimizers"), refusing clearly where it cannot page.

Optimizer state lives in CUDA unified memory and is paged out to CPU RAM when a memory spike (a long batch under
gradient checkpointing) would otherwise run out of GPU memory. That needs CUDA: on CPU bitsandbytes only warns and
silently runs a plain AdamW, so this wrapper raises instead. Importing this module imports bitsandbytes.

In a LightningCLI config (built lazily from the adapter parameters by ``lightning-peft``)::

    optimizer:
      class_path: lightning_peft.app.optim.PagedAdamW
      init_args: {lr: 0.0002, optim_bits: 8}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import bitsandbytes as bnb
import torch


class PagedAdamW(bnb.optim.PagedAdamW):
    """bitsandbytes' paged AdamW with 32-bit or 8-bit (block-wise quantized) state; CUDA parameters only.

    Args:
        params: Parameters or parameter groups, all on a CUDA device.
        lr: Learning rate.
        betas: Adam's moment decay rates.
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay (AdamW).
        optim_bits: 32 (``PagedAdamW32bit``) or 8 (``PagedAdamW8bit``: state in 8 bits for tensors of at least
            ``min_8bit_size`` values, 75% less optimizer memory).
        min_8bit_size: Smaller tensors keep 32-bit state.

    Raises:
        RuntimeError: CUDA is unavailable or a parameter is not on a CUDA device.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: Literal[8, 32] = 32,
        min_8bit_size: int = 4096,
    ) -> None:
        params = list(params)
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        devices = sorted({t.device.type for t in tensors})
        if not torch.cuda.is_available() or devices != ["cuda"]:
            raise RuntimeError(
                f"PagedAdamW pages optimizer state through CUDA unified memory, so it needs parameters on a CUDA "
                f"device; got parameters on {devices} (CUDA available: {torch.cuda.is_available()}). On CPU use "
                "torch.optim.AdamW (the adapters' optimizer state is small)."
            )
        if optim_bits not in (8, 32):
            raise ValueError(f"PagedAdamW optim_bits={optim_bits!r} must be 8 or 32.")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
        )  # fmt: skip
