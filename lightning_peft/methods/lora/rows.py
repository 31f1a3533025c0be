"""Mixed batches for layers whose adapters add an update to the base output (the LoRA family).

:func:`lightning_peft.mixed_batch` gives each batch row its own adapter. For a layer computing
``base(x) + update_a(x)`` that is: the base output for every row once, then, per adapter named in the batch, its
update on its own rows only (``index_select``) added back into those rows (``index_add``), so each row equals a
single-adapter run of it. :class:`PerRowUpdates` declares the capability and implements it for any such layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lightning_peft.core.adapter_layer import AdapterLayer


class PerRowUpdates(AdapterLayer):
    """An adapter layer whose output is ``base(x)`` plus one update per adapter (:meth:`adapter_update`)."""

    supports_mixed_batch: ClassVar[bool] = True

    def holds(self, adapter_name: str) -> bool:
        """Whether this layer has adapter ``adapter_name`` (rows of others stay base here)."""
        raise NotImplementedError(f"{type(self).__name__} must implement holds.")

    def adapter_update(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What adapter ``adapter_name`` adds to ``base_result`` for input ``x``."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapter_update.")

    def forward_rows(
        self, rows: list[str | None], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Mixed batch: each row gets the update of its own adapter in ``rows``; ``None`` rows stay base."""
        result = self.base_layer(x, *args, **kwargs)
        if x.shape[0] != len(rows):
            raise ValueError(
                f"mixed_batch was given {len(rows)} adapter names but {type(self.base_layer).__name__} got a batch of "
                f"{x.shape[0]} rows; pass one name (or None) per row of the batch."
            )
        for name in dict.fromkeys(rows):
            if name is None or not self.holds(name):  # no such adapter here: those rows stay base
                continue
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=result.device)
            sub_x = x.index_select(0, index)  # (rows of this adapter, ...)
            update = self.adapter_update(name, sub_x, result.index_select(0, index))
            result = result.index_add(0, index, update.to(result.dtype))
        return result
