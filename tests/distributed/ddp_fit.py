"""Run by tests/test_distributed.py: a 2-process DDP fit on CPU (gloo) with PEFTCallback.

Each rank writes its final adapter tensors to ``<out>/rank<r>.pt`` so the test can compare ranks.
Usage: python tests/distributed/ddp_fit.py OUT_DIR METHOD   (METHOD: a key of METHODS)
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_peft import PEFTCallback, adapter_state_dict
from lightning_peft.methods import (
    IA3,
    AdaLoRA,
    Adapter,
    LoRA,
    MAMAdapter,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    QLoRA,
    UniPELT,
)
from tests.distributed.process_group import end_process_group
from tests.test_callback import CausalLM, token_loader

METHODS = {
    "lora": lambda: LoRA(r=4, target_modules=["q_proj", "v_proj"]),
    # AdaLoRA masks by importance computed from each rank's gradients: they must be the all-reduced ones.
    "adalora": lambda: AdaLoRA(target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, tinit=1, tfinal=1),
    "ia3": lambda: IA3(),
    "adapter": lambda: Adapter(style="houlsby"),
    # Soft prompts: the input-rewriting hooks (prompt) and the per-layer cache (prefix) under DDP.
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=4),
    # One NF4-quantized base per rank, LoRA on top.
    "qlora": lambda: QLoRA(r=4, target_modules=["q_proj", "v_proj"]),
    "p_tuning": lambda: PTuning(num_virtual_tokens=4, encoder_hidden_size=16),
    "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=4),
    # Composites: gates and several parts under one adapter name.
    "mam_adapter": lambda: MAMAdapter(prefix_length=4),
    "unipelt": lambda: UniPELT(prefix_length=4),
}


def main(out: Path, method: str) -> None:
    pl.seed_everything(0)
    module = CausalLM(build_in="configure_model")
    callback = PEFTCallback(METHODS[method](), target="model")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
    )  # fmt: skip
    # Each rank sees a different shard of the data: identical adapters afterwards prove gradients were all-reduced.
    trainer.fit(module, token_loader(batches=8))
    state = {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}
    torch.save({"state": state, "losses": module.losses}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_process_group()
