"""LoRA in a Lightning Fabric loop: inject, fabric.setup, adapter-only fabric.save, exact resume.

Runs offline in seconds on a tiny Llama built from its config:

    python examples/fabric_loop.py --output-dir fabric_out

It trains 4 steps in one go, then 2 steps, saves, resumes in a fresh Fabric for 2 more, and prints both loss
trajectories (equal) and the tensors in the checkpoint (only the adapter's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.fabric import Fabric
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import inject, save_adapter
from lightning_peft.integrations.fabric import adapter_filter, trainable_parameters
from lightning_peft.methods import LoRA


def build() -> tuple[Fabric, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = inject(LlamaForCausalLM(config), LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    fabric = Fabric(accelerator="cpu", devices=1)  # inject first, then setup: DDP/FSDP then see the adapters
    model, optimizer = fabric.setup(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2))
    return fabric, model, optimizer


def train(
    fabric: Fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list
) -> list[float]:
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(output_dir: Path) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(4)]

    uninterrupted = train(*build(), batches)

    fabric, model, optimizer = build()
    first = train(fabric, model, optimizer, batches[:2])
    checkpoint = output_dir / "checkpoint.pt"
    fabric.save(
        checkpoint,
        {"model": model, "optimizer": optimizer, "step": 2},
        filter={"model": adapter_filter(model)},
    )

    fabric, model, optimizer = build()
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(checkpoint, state, strict=False)  # the frozen base comes from the model itself
    resumed = first + train(fabric, model, optimizer, batches[state["step"] :])
    save_adapter(
        model, output_dir / "adapter"
    )  # the Hugging Face peft layout, from the module Fabric returned

    print(f"uninterrupted losses: {uninterrupted}")
    print(f"resumed losses:       {resumed}")
    print(f"checkpoint model tensors: {sorted(torch.load(checkpoint, weights_only=True)['model'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("fabric_out"))
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    main(args.output_dir)
