"""Add LoRA to a LightningModule you already have: one callback, no change to the module.

The module below stands for your own code: it builds a model in ``__init__``, computes a loss in
``training_step`` and optimizes ``self.parameters()`` in ``configure_optimizers``. Adding
``PEFTCallback`` to the Trainer is the only change. The callback injects LoRA into ``module.model``
before the optimizer exists, freezes the base weights, removes them from the optimizer, and writes
checkpoints that hold only the adapter. ``save_adapter`` then writes the adapter in the Hugging Face
``peft`` layout, and ``load_adapter`` puts it back on a fresh copy of the base model.

The model is a tiny Llama built from a config and the data are synthetic, so this runs offline in seconds::

    python examples/add_callback_to_existing_trainer.py --output-dir runs/example_adapter
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import PEFTCallback, count_parameters, load_adapter, save_adapter
from lightning_peft.methods import LoRA

VOCAB = 64
SEQUENCE_LENGTH = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights: the "pretrained" base model of this example."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQUENCE_LENGTH,
    )
    return LlamaForCausalLM(config)


def counting_sequences(count: int, seed: int = 0) -> torch.Tensor:
    """Sequences that count up by a fixed step, e.g. ``5 8 11 14 ...`` (mod VOCAB): next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=g)
    step = torch.randint(1, 4, (count, 1), generator=g)
    return (start + step * torch.arange(SEQUENCE_LENGTH)) % VOCAB  # (count, SEQUENCE_LENGTH)


class CausalLMModule(L.LightningModule):
    """An ordinary LightningModule, as a user would already have it: nothing PEFT-specific."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_llama()

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(output_dir: Path, max_steps: int = 30) -> Path:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(counting_sequences(256)), batch_size=16, shuffle=True)
    module = CausalLMModule()
    probe = counting_sequences(4, seed=1)

    lora = LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        default_root_dir=output_dir / "trainer",
        callbacks=[PEFTCallback(lora, target="model")],  # the one addition to an existing setup
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torch.no_grad():
        loss_before = module.model(input_ids=probe, labels=probe).loss.item()
    trainer.fit(module, data)
    module.eval()
    with torch.no_grad():
        loss_after = module.model(input_ids=probe, labels=probe).loss.item()
        trained_logits = module.model(input_ids=probe).logits
    counts = count_parameters(module.model)
    print(
        f"trained {counts['trainable']:,} of {counts['total']:,} parameters ({counts['trainable_percent']:.2f}%)"
    )
    print(f"loss on held-out sequences: {loss_before:.3f} before, {loss_after:.3f} after")

    checkpoint_path = Path(trainer.checkpoint_callback.best_model_path)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    lora_keys = [k for k in state if ".lora_" in k]
    print(
        f"checkpoint {checkpoint_path.name} holds {len(state)} tensors, {len(lora_keys)} of them LoRA weights"
    )

    adapter_dir = save_adapter(module.model, output_dir / "adapter")
    print(f"adapter saved to {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")

    # Later, elsewhere: the same base model plus the adapter directory gives the trained model back.
    restored = load_adapter(tiny_llama().eval(), adapter_dir)
    with torch.no_grad():
        difference = (restored(input_ids=probe).logits - trained_logits).abs().max().item()
    print(f"reloaded adapter: max |logits difference| = {difference:.2e}")
    if difference > 1e-4:
        raise RuntimeError(f"The reloaded adapter gives other outputs (max difference {difference}).")
    return adapter_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/example_adapter"))
    parser.add_argument("--max-steps", type=int, default=30)
    arguments = parser.parse_args()
    main(arguments.output_dir, arguments.max_steps)
