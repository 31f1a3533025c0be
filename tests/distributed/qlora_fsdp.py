"""Run by tests/test_qlora_fsdp.py: QLoRA (float32 quant_storage) on a tiny Llama, 2 CPU processes (gloo).

Fits: ``ddp`` (4 steps), ``fsdp`` (2 epochs of 2 steps), ``first`` (1 epoch, sharded checkpoint) and ``resumed``
(epoch 2 from it), FSDP with decoder layers as units; ``fsdp2`` (FSDP2, default uint8 storage, 2 epochs). Each rank writes ``<out>/rank<r>_<fit>.pt``: losses, the
gathered adapter tensors and, under FSDP, the packed 4-bit elements its shards hold against the whole model's.
Usage: python tests/distributed/qlora_fsdp.py OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_peft import PEFTCallback
from lightning_peft.core.quantization import is_quantized_linear, weight_storage_bytes
from lightning_peft.integrations.distributed import PEFTModelParallelStrategy
from lightning_peft.methods import QLoRA
from tests.distributed.process_group import end_process_group
from tests.distributed.strategy_resume import CPUFSDPStrategy, gathered_adapter_state
from tests.test_callback import CausalLM, token_loader


def fsdp() -> CPUFSDPStrategy:
    return CPUFSDPStrategy(
        state_dict_type="sharded", process_group_backend="gloo", auto_wrap_policy={LlamaDecoderLayer}
    )


def packed_elements(trainer: pl.Trainer, module: CausalLM) -> dict:
    """Packed-code elements: this rank's shards of the frozen flat parameters, and the whole model's."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    layers = [m for m in module.model.modules() if is_quantized_linear(m)]
    total = sum(
        m.weight.quant_state.shape.numel() // 2 // 4 for m in layers
    )  # two codes a byte, 4 bytes a float
    local = frozen = 0
    for unit in (m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)):
        handle = unit._handle
        if handle is None or handle.flat_param.requires_grad:
            continue
        flat = handle.flat_param
        info = flat._shard_param_infos
        for param_info, shape, fqn in zip(info, flat._shapes, flat._fqns, strict=True):
            owner = unit.module.get_submodule(fqn.rsplit(".", 1)[0]) if "." in fqn else unit.module
            if fqn.endswith("weight") and is_quantized_linear(owner):
                frozen += shape.numel()
                local += param_info.numel_in_shard if param_info.in_shard else 0
    code_bytes = sum(weight_storage_bytes(m, include_tables=False) - m.weight.numel() * 4 for m in layers)
    return {"local": local, "frozen": frozen, "total": total, "unsharded_state_bytes": code_bytes}


def fsdp2_packed_elements(module: CausalLM) -> dict:
    from torch.distributed.tensor import DTensor

    weights = [m.weight for m in module.model.modules() if is_quantized_linear(m)]
    local = sum(w.to_local().numel() if isinstance(w, DTensor) else w.numel() for w in weights)
    dtensors = sum(isinstance(w, DTensor) for w in weights)
    return {"local": local, "total": sum(w.numel() for w in weights), "dtensors": dtensors}


def fit(
    out: Path, name: str, strategy, max_epochs: int, ckpt_path: str | None = None, storage: str = "float32"
):
    pl.seed_everything(0)
    module = CausalLM(build_in="configure_model")
    method = QLoRA(r=4, target_modules=["q_proj", "v_proj"], quant_storage=storage)
    callback = PEFTCallback(method, target="model")
    checkpoint = ModelCheckpoint(dirpath=out / f"ckpt_{name}", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, checkpoint],
        default_root_dir=out, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, token_loader(batches=4), ckpt_path=ckpt_path)
    result = {"losses": module.losses, "state": gathered_adapter_state(trainer, callback, module)}
    if isinstance(strategy, CPUFSDPStrategy):
        result["packed"] = packed_elements(trainer, module)
    elif isinstance(strategy, PEFTModelParallelStrategy):
        result["packed"] = fsdp2_packed_elements(module)
    torch.save(result, out / f"rank{trainer.global_rank}_{name}.pt")


def main(out: Path) -> None:
    fit(out, "ddp", "ddp", max_epochs=2)
    fit(out, "fsdp", fsdp(), max_epochs=2)
    fit(out, "first", fsdp(), max_epochs=1)
    fit(out, "resumed", fsdp(), max_epochs=2, ckpt_path=str(out / "ckpt_first" / "last.ckpt"))
    # FSDP2 shards each parameter on its own: the default uint8 storage works there.
    fsdp2 = PEFTModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, layer_classes={LlamaDecoderLayer}
    )
    fit(out, "fsdp2", fsdp2, max_epochs=2, storage="uint8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process_group()
