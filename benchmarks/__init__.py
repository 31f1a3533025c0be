"""Benchmarks of lightning-peft: every method on one model, measured in one run (``python -m benchmarks``).

Modules: ``flops`` (the FLOP model of the "ideal" column), ``models`` (base models, batches, method configs),
``measure`` (one function per measurement), ``head_to_head`` (vs Hugging Face peft), ``report`` (Markdown,
JSON, chart), ``method_comparison`` (quickstart-task quality per config, with ``--quality``). Single-purpose
scripts that run on their own: ``lora_kernel_layouts`` (the fused LoRA kernel's matmul layouts),
``qlora_memory`` (4-bit storage and step memory), ``ddp_throughput`` (2-process DDP vs 1 process).
"""
