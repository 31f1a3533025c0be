"""The core: what every method and integration builds on, and nothing above it.

* :mod:`~lightning_peft.core.contract`: the method contract (:class:`PEFTMethod`, :class:`AdapterLayer`) and the
  registry of peft types;
* :mod:`~lightning_peft.core.injection`: inject, merge, disable, remove, and the adapters' state dict;
* :mod:`~lightning_peft.core.targeting`: which modules a ``target_modules`` entry names, and replacing a child;
* :mod:`~lightning_peft.core.field_types`: hyperparameters checked against their annotations;
* :mod:`~lightning_peft.core.quantization`: base weights in 4/8 bits (bitsandbytes);
* :mod:`~lightning_peft.core.transformers_compat`: the one seam into ``transformers`` internals.

The core imports no method, format, integration or application module (``tests/test_layers.py``).
"""
