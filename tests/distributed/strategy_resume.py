"""Run by tests/test_distributed.py: 2-process CPU (gloo) fits with PEFTCallback, interrupted and resumed (a
``*_cuda`` strategy: one process per CUDA device instead).

Three fits of LoRA on a tiny Llama, each rank on its own shard of the data:
``full`` (2 epochs), ``first`` (1 epoch, writes ``ckpt/last.ckpt``) and ``resumed`` (epoch 2 from that checkpoint).
Each rank writes ``<out>/rank<r>_<fit>.pt`` with its losses and the gathered (unsharded) adapter tensors.
Usage: python tests/distributed/strategy_resume.py OUT_DIR STRATEGY   (STRATEGY: a key of STRATEGIES)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_peft import PEFTCallback
from lightning_peft.integrations.distributed import (
    PEFTFSDPStrategy,
    PEFTModelParallelStrategy,
    gathered_state_dict,
)
from lightning_peft.methods import LoRA
from tests.distributed.process_group import end_process_group
from tests.test_callback import CausalLM, token_loader


class CPUFSDPStrategy(PEFTFSDPStrategy):
    """Test-only: FSDP on CPU/gloo (Lightning refuses ``strategy="fsdp"`` without a GPU)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )  # fmt: skip
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


STRATEGIES = {
    "ddp": lambda: "ddp",
    # Decoder layers as units too, and activation checkpointing around them (adapters sit inside).
    "fsdp_sharded": lambda: CPUFSDPStrategy(
        state_dict_type="sharded",
        process_group_backend="gloo",
        auto_wrap_policy={LlamaDecoderLayer},
        activation_checkpointing_policy={LlamaDecoderLayer},
    ),
    "fsdp_full": lambda: CPUFSDPStrategy(state_dict_type="full", process_group_backend="gloo"),
    # Every CUDA device of the machine (one is enough): the full state dict the CPU/gloo run cannot save.
    "fsdp_full_cuda": lambda: PEFTFSDPStrategy(state_dict_type="full"),
    "model_parallel": lambda: PEFTModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, layer_classes={LlamaDecoderLayer}
    ),
}


def gathered_adapter_state(trainer: pl.Trainer, callback: PEFTCallback, module: CausalLM) -> dict:
    keys = set(callback.adapter_keys(module))
    if isinstance(trainer.strategy, PEFTFSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, config):
            state = trainer.strategy.model.state_dict()
    else:  # DDP: plain tensors; ModelParallel (FSDP2): DTensors, gathered on every rank
        state = gathered_state_dict(module.state_dict())
    return {k: v.detach().clone() for k, v in state.items() if k in keys}


def fit(out: Path, strategy: str, name: str, max_epochs: int, ckpt_path: str | None = None) -> None:
    pl.seed_everything(0)
    module = CausalLM(build_in="configure_model")
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    cuda = strategy.endswith("_cuda")
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=torch.cuda.device_count() if cuda else 2,
        strategy=STRATEGIES[strategy](), max_epochs=max_epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, checkpoint],
        default_root_dir=out, deterministic=True,
    )  # fmt: skip
    # 4 batches: 2 per rank per epoch, each rank on its own shard.
    trainer.fit(module, token_loader(batches=4), ckpt_path=ckpt_path)
    result = {"losses": module.losses, "state": gathered_adapter_state(trainer, callback, module)}
    if isinstance(trainer.strategy, PEFTFSDPStrategy):
        # flat parameters of all FSDP units: [trainable, frozen]
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        flat = [p for m in units for p in m.params]
        result["units"] = [sum(p.requires_grad for p in flat), sum(not p.requires_grad for p in flat)]
        result["checkpointed"] = sum(
            "CheckpointWrapper" in type(m).__name__ for m in trainer.strategy.model.modules()
        )
    torch.save(result, out / f"rank{trainer.global_rank}_{name}.pt")


def main(out: Path, strategy: str) -> None:
    fit(out / "full", strategy, "full", max_epochs=2)
    fit(out, strategy, "first", max_epochs=1)
    fit(out, strategy, "resumed", max_epochs=2, ckpt_path=str(out / "ckpt" / "last.ckpt"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_process_group()
