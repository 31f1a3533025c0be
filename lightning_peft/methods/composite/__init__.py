"""Methods made of other methods: a union of methods (MAM Adapter) and gated unions (UniPELT)."""

from lightning_peft.methods.composite.compose import ComposedMethod, MethodUnion
from lightning_peft.methods.composite.mam_adapter import MAMAdapter
from lightning_peft.methods.composite.unipelt import UniPELT

__all__ = ["ComposedMethod", "MAMAdapter", "MethodUnion", "UniPELT"]
