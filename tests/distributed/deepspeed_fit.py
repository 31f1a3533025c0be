"""Run by tests/test_deepspeed.py: DeepSpeed ZeRO fits of LoRA on a tiny Llama on CPU, interrupted and resumed.

For every case (``stage2``, ``stage2_offload``, ``stage3``, ``stage3_offload``) three fits as in
strategy_resume.py: ``full`` (2 epochs), ``first`` (1 epoch, writes ``<case>/ckpt/last.ckpt``, a DeepSpeed
checkpoint directory) and ``resumed`` (epoch 2 from it). Each rank writes ``<out>/<case>/rank<r>_<fit>.pt`` with its
losses, the gathered adapter tensors, the step times and its peak RSS. All cases run in one process group (one
start-up for all of them), with ``devices`` processes (1 or 2).
Usage: python tests/distributed/deepspeed_fit.py OUT_DIR DEVICES CASE [CASE ...]   (CASE: a key of CASES, or ddp)
"""

import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_peft import PEFTCallback
from lightning_peft.integrations.deepspeed import PEFTDeepSpeedStrategy
from lightning_peft.methods import LoRA
from tests.distributed.process_group import end_process_group
from tests.test_callback import CausalLM, token_loader
from tests.test_no_silent_loss import StatefulLoader
from tests.tiny_models import VOCAB

# Lightning's default buckets (2e8 elements, 800 MB each in fp32) are allocated and zeroed for a model of 92k
# parameters: ~1 s per step and 2 GB of RSS here. Buckets sized for the model keep a step at milliseconds.
BUCKETS = dict(reduce_bucket_size=1e6, allgather_bucket_size=1e6)
CASES = {
    "stage2": dict(stage=2, **BUCKETS),
    "stage2_offload": dict(stage=2, offload_optimizer=True, **BUCKETS),
    "stage3": dict(stage=3, **BUCKETS),
    "stage3_offload": dict(stage=3, offload_optimizer=True, offload_parameters=True, **BUCKETS),
}


class RecordingStrategy(PEFTDeepSpeedStrategy):
    """Records how many elements the optimizer that reaches DeepSpeed's engine holds (after PEFTCallback)."""

    def _setup_model_and_optimizer(self, model, optimizer, *args, **kwargs):
        if optimizer is not None:
            self.optimizer_numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return super()._setup_model_and_optimizer(model, optimizer, *args, **kwargs)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def gathered_adapter_state(trainer: pl.Trainer, callback: PEFTCallback, module: CausalLM) -> dict:
    keys = callback.adapter_keys(module)
    params = dict(module.named_parameters())
    if isinstance(trainer.strategy, PEFTDeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([params[k] for k in keys]):
            return {k: params[k].detach().clone() for k in keys}
    return {k: params[k].detach().clone() for k in keys}


def fit(out: Path, case: str, devices: int, name: str, max_epochs: int, ckpt_path: str | None = None) -> None:
    pl.seed_everything(0)
    module = CausalLM()
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
    timer = StepTimer()
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    strategy = "ddp" if case == "ddp" else RecordingStrategy(process_group_backend="gloo", **CASES[case])
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, checkpoint, timer],
        default_root_dir=out, deterministic=True,
    )  # fmt: skip
    # 4 batches: 4 (1 process) or 2 per rank per epoch.
    trainer.fit(module, token_loader(batches=4), ckpt_path=ckpt_path)
    result = {
        "losses": module.losses,
        "state": gathered_adapter_state(trainer, callback, module),
        "keys": callback.adapter_keys(module),
        "step_times": timer.times,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "in_optimizer": getattr(trainer.strategy, "optimizer_numel", None),
        "counts": callback.parameter_counts,
    }
    torch.save(result, out / f"rank{trainer.global_rank}_{name}.pt")


def mid_epoch(out: Path, devices: int) -> None:
    """ZeRO-3, a resumable loader, a checkpoint every 2 steps: ``full`` runs 4 steps of one epoch, ``first`` stops after
    2 and ``resumed`` continues from its step checkpoint with batches 2 and 3 (not 0 and 1)."""
    batches = 4 * devices  # 4 steps per rank in the epoch

    def loader() -> StatefulLoader:
        ids = torch.randint(0, VOCAB, (2 * batches, 12), generator=torch.Generator().manual_seed(0))
        return StatefulLoader(torch.utils.data.TensorDataset(ids), batch_size=2)

    for name, max_steps, ckpt in (("full", 4, None), ("first", 2, None), ("resumed", 4, "step")):
        pl.seed_everything(0)
        module = CausalLM()
        callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
        every_2 = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[callback] + ([every_2] if name == "first" else []),
            strategy=PEFTDeepSpeedStrategy(process_group_backend="gloo", **CASES["stage3"]),
            default_root_dir=out, deterministic=True, enable_checkpointing=name == "first",
        )  # fmt: skip
        ckpt_path = str(next((out / "ckpt").glob("*step=2*"))) if ckpt else None
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        result = {"losses": module.losses, "state": gathered_adapter_state(trainer, callback, module)}
        where = out / "full" if name == "full" else out  # the layout load_runs reads
        where.mkdir(parents=True, exist_ok=True)
        torch.save(result, where / f"rank{trainer.global_rank}_{name}.pt")


def main(out: Path, devices: int, cases: list[str]) -> None:
    for case in cases:
        if case == "stage3_mid_epoch":
            mid_epoch(out / case, devices)
            continue
        fit(out / case / "full", case, devices, "full", max_epochs=2)
        fit(out / case, case, devices, "first", max_epochs=1)
        fit(
            out / case,
            case,
            devices,
            "resumed",
            max_epochs=2,
            ckpt_path=str(out / case / "ckpt" / "last.ckpt"),
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
    end_process_group()
