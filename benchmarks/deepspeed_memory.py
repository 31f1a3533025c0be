"""Peak process memory, step time and checkpoint size of LoRA under DDP and DeepSpeed ZeRO-2/3 (+ offload) on CPU.

A Llama of ~88M parameters built from a config (no download), LoRA r=8 on q_proj/v_proj, 2 processes (gloo), 6
steps of 2 x 128 tokens per process, one checkpoint at the end. Every case is a fresh pair of processes; each rank
reports its peak RSS (``ru_maxrss``), its RSS after training, the median step time and the checkpoint's bytes.

    DS_ACCELERATOR=cpu python -m benchmarks.deepspeed_memory [CASE ...]     # prints one JSON line per case
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "ddp": None,
    "zero2": dict(stage=2),
    "zero2_offload": dict(stage=2, offload_optimizer=True),
    "zero3": dict(stage=3),
    "zero3_offload": dict(stage=3, offload_optimizer=True, offload_parameters=True),
    # The same run with full checkpoints (adapter_only_checkpoints=False): what excluding frozen weights saves.
    "zero3_full_checkpoint": dict(stage=3),
}
BUCKETS = dict(reduce_bucket_size=5e6, allgather_bucket_size=5e6)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def worker(case: str, out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft import PEFTCallback
    from lightning_peft.integrations.deepspeed import PEFTDeepSpeedStrategy
    from lightning_peft.methods import LoRA

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:
            if self.model is None:
                torch.manual_seed(0)
                config = LlamaConfig(
                    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
                )  # fmt: skip
                self.model = LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Timer(Callback):
        times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self.start)

    settings = dict(CASES[case] or {})
    full = case.endswith("full_checkpoint")
    strategy = "ddp" if CASES[case] is None else PEFTDeepSpeedStrategy(
        process_group_backend="gloo", exclude_frozen_parameters=not full, **BUCKETS, **settings
    )  # fmt: skip
    timer = Timer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
        callbacks=[PEFTCallback(LoRA(r=8, target_modules=["q_proj", "v_proj"]), target="model",
                                adapter_only_checkpoints=not full), timer],
    )  # fmt: skip
    ids = torch.randint(0, 32000, (24, 128), generator=torch.Generator().manual_seed(0))
    module = Module()
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=2))
    after = rss_kb()
    path = out / "ckpt"
    trainer.save_checkpoint(path)
    trainer.strategy.barrier()
    size = (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".pt", ".ckpt"))
        if path.is_dir()
        else path.stat().st_size
    )
    result = {
        "case": case, "rank": trainer.global_rank,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "rss_after_fit_mb": after // 1024,
        "median_step_ms": round(1000 * statistics.median(timer.times[1:]), 1), "checkpoint_bytes": size,
    }  # fmt: skip
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(cases: list[str]) -> None:
    import tempfile

    for case in cases or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.deepspeed_memory", "--worker", case, tmp],
                env=env, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if done.returncode != 0:
                print(json.dumps({"case": case, "error": done.stderr[-2000:]}))
                continue
            for rank in (0, 1):
                print((Path(tmp) / f"rank{rank}.json").read_text(), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main(sys.argv[1:])
