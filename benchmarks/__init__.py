"""Benchmarks of lightning-peft: every method on one model, measured in one run (``python -m benchmarks``).

Modules: ``flops`` (the FLOP model of the "ideal" column), ``models`` (base models, batches, method configs),
``measure`` (one function per measurement), ``head_to_head`` (vs Hugging Face peft), ``report`` (Markdown,
JSON, chart). The older single-purpose scripts (``lora_vs_peft.py``, ``method_comparison.py``,
``qlora_memory.py``) still run on their own.
"""
