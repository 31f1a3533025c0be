"""Calling Hugging Face ``peft`` as the reference, and telling its own limits apart from ours."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn


def reference_outputs(reference: nn.Module, **inputs: Any) -> Any:
    """``reference(**inputs)`` without gradients; skips where peft itself cannot run the installed transformers.

    peft (0.21) looks for a ``past_key_values`` parameter in the backbone's forward before prefix tuning a
    classifier, and transformers 5.24 renamed it ``cache``: peft refuses the model, so there is nothing to compare
    on that release (the oldest-releases leg of CI still compares).
    """
    try:
        with torch.no_grad():
            return reference(**inputs)
    except ValueError as error:
        if "does not support past key values" not in str(error):
            raise
        import peft
        import transformers

        pytest.skip(
            f"peft {peft.__version__} refuses prefix tuning on {type(reference.base_model).__name__} with "
            f"transformers {transformers.__version__} (it looks for `past_key_values` in the backbone's forward)"
        )
