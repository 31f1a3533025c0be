"""Benchmarks of lightning-peft: every method on one model, measured in one run (``python -m benchmarks``).

Modules: ``flops`` (the FLOP model of the "ideal" column), ``models`` (base models, batches, method configs),
``measure`` (one function per measurement), ``head_to_head`` (vs Hugging Face peft), ``report`` (Markdown,
JSON, chart), ``method_comparison`` (quickstart-task quality per config, with ``--quality``). Single-purpose
scripts that run on their own: ``lora_kernel_layouts`` (the fused LoRA kernel's matmul layouts),
``qlora_memory`` (4-bit storage and step memory), ``ddp_throughput`` (2-process DDP vs 1 process).
"""

import logging


def _drop_optional_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes says on import, once per process, that the optional ``kernels`` package (a faster CPU 4-bit
    matmul) is absent; every benchmark imports it through peft or QLoRA, and the numbers do not depend on it
    (both sides of each ratio run the same bitsandbytes path). Other bitsandbytes warnings stay."""
    return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_optional_kernel_notice)
