"""Throughput of LoRA training: 2-process DDP vs 1 process, samples per second, on CPU (or GPUs if present).

The same LoRA fit (Llama built from a config, fixed seed, same per-process batch) runs once with 1 process and
once with ``strategy="ddp", devices=2``; each process gets ``OMP_NUM_THREADS`` threads. Throughput counts samples
of all processes over the timed steps (the first ``--warmup`` steps are not timed). The ratio ddp / single is the
scaling; 2.0 would be perfect. On CPU it is bounded by how many cores the machine really has free: two processes
on 2 busy cores share them, so expect well under 2.

Usage: python benchmarks/ddp_throughput.py [--hidden 256] [--layers 4] [--steps 20] [--batch-size 8]
       [--accelerator cpu|gpu] [--threads 1] [--rounds 3]
Each configuration runs as its own process (Lightning's DDP launcher re-executes the script), reported as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import PEFTCallback
from lightning_peft.methods import LoRA

VOCAB = 2048


class CausalLM(pl.LightningModule):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.timed_steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > self.warmup:
            self.timed_steps = trainer.global_step - self.warmup
            self.seconds = time.perf_counter() - self.start


def worker(args: argparse.Namespace) -> None:
    devices = args.devices
    samples = (args.steps + 1) * args.batch_size * devices
    ids = torch.randint(0, VOCAB, (samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=args.batch_size)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[PEFTCallback(LoRA(r=16, target_modules=["q_proj", "v_proj"]), target="model"), timer],
    )  # fmt: skip
    trainer.fit(CausalLM(args.hidden, args.layers), loader)
    if trainer.global_rank == 0:
        rate = timer.timed_steps * args.batch_size * devices / timer.seconds
        print("RESULT " + json.dumps({"devices": devices, "samples_per_s": rate}), flush=True)


def run(args: argparse.Namespace, devices: int) -> float:
    command = [sys.executable, __file__, "--worker", "--devices", str(devices)] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "devices", "rounds")
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(lines[-1].removeprefix("RESULT "))["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    # Rounds alternate the two configurations so that load from other processes hits both alike; medians.
    single, ddp = [], []
    for _ in range(args.rounds):
        single.append(run(args, 1))
        ddp.append(run(args, 2))
    ratios = [d / s for s, d in zip(single, ddp, strict=True)]
    print(json.dumps({
        "accelerator": args.accelerator, "threads_per_process": args.threads, "rounds": args.rounds,
        "single_samples_per_s": round(statistics.median(single), 2),
        "ddp2_samples_per_s": round(statistics.median(ddp), 2),
        "ratio_ddp2_over_single": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
