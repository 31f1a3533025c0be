"""Shared checks for the soft-prompt method tests: more tiny families, padded batches, generation, training."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFTCallback, adapter_state_dict, inject, load_adapter, save_adapter
from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.formats.peft_directory import WEIGHTS_NAME
from lightning_peft.methods import PEFTMethod
from lightning_peft.methods.prompt.virtual_tokens import virtual_tokens_layer
from tests.peft_reference import reference_outputs
from tests.tiny_models import (
    VOCAB,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    tiny_roberta_classifier,
)

# Encoders use initializer_range=0.2 (transformers' default is 0.02): with tiny random weights at 0.02, attention is
# nearly uniform, so the first position - the first virtual token under prompt methods, which BERT's pooler reads -
# hardly depends on the input and no few-step training can classify. Pretrained models do not have this problem.
ENCODER_INIT = 0.2


DECODERS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "bert": partial(tiny_bert_classifier, initializer_range=ENCODER_INIT),
    "roberta": partial(tiny_roberta_classifier, initializer_range=ENCODER_INIT),
}
FAMILIES = {**DECODERS, **ENCODERS}
N = 4  # virtual tokens in most tests


def build(family: str, method: PEFTMethod | None = None) -> nn.Module:
    model = FAMILIES[family]()
    if family in DECODERS:
        model.generation_config.eos_token_id = None  # generation never stops early: lengths can be compared
    if method is not None and family in ENCODERS:
        method.modules_to_save = ["classifier"]
    return model if method is None else inject(model, method)


def pad_id(model: nn.Module) -> int:
    return model.config.pad_token_id or 0


def position_origin(model: nn.Module) -> int:
    """First position id of a sequence: RoBERTa counts from padding_idx + 1."""
    return pad_id(model) + 1 if model.config.model_type == "roberta" else 0


def sequences(lengths: tuple[int, ...] = (5, 8), seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]  # 0/1 are pad ids


def padded(model: nn.Module, seqs: list[torch.Tensor], side: str, positions: bool) -> dict[str, torch.Tensor]:
    """A padded batch; with ``positions``, position_ids counted over real tokens only (as generate does)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id(model))
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = seq, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if positions:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0) + position_origin(model)
    return batch


def assert_padding_invariant(model: nn.Module, family: str) -> None:
    """Left- and right-padded batches give each sequence's unpadded outputs (logits, last hidden state), 1e-5.

    Encoders' classification logits are compared right-padded only: BERT's pooler reads position 0, which left
    padding makes a pad token, for the base model too.
    """
    seqs = sequences()
    with torch.no_grad():
        singles = [model(input_ids=s[None], output_hidden_states=True) for s in seqs]
        for side in ("left", "right"):
            batch = padded(model, seqs, side, positions=side == "left")
            out = model(**batch, output_hidden_states=True)
            for row, single in enumerate(singles):
                real = batch["attention_mask"][row].bool()
                if family in DECODERS:
                    torch.testing.assert_close(out.logits[row, real], single.logits[0], atol=1e-5, rtol=0)
                elif side == "right":  # sequence classification: one row of logits per sequence
                    torch.testing.assert_close(out.logits[row], single.logits[0], atol=1e-5, rtol=0)
                hidden = out.hidden_states[-1][row, real]
                torch.testing.assert_close(hidden, single.hidden_states[-1][0], atol=1e-5, rtol=0)


def greedy_without_cache(model: nn.Module, seq: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by full forward passes: no cache, so it checks how generate() combines the caches."""
    ids = seq[None]
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(seq) :].tolist()


def assert_generation_consistent(model: nn.Module, steps: int = 5) -> None:
    """Greedy generate(): deterministic, equal to cache-free decoding, and a left-padded batch equals singles."""
    seqs = sequences((4, 7))
    options = {"max_new_tokens": steps, "do_sample": False, "pad_token_id": pad_id(model)}
    singles = [
        model.generate(s[None], attention_mask=torch.ones(1, len(s)), **options)[0, len(s) :] for s in seqs
    ]
    for seq, single in zip(seqs, singles, strict=True):
        assert single.tolist() == greedy_without_cache(model, seq, steps)
        again = model.generate(seq[None], attention_mask=torch.ones(1, len(seq)), **options)[0, len(seq) :]
        assert torch.equal(again, single)
    batch = padded(model, seqs, "left", positions=False)
    generated = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    assert generated.tolist() == [s.tolist() for s in singles]


def next_token_task(model: nn.Module, batch: int = 4, length: int = 3) -> dict[str, torch.Tensor]:
    """Decoders: every sequence must end in token 7, which only the prompt can teach a frozen model."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    ids[:, -1] = 7
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 7
    return {"input_ids": ids, "labels": labels}


def classification_task(model: nn.Module, batch: int = 6) -> dict[str, torch.Tensor]:
    """Encoders: fit fixed labels of right-padded sequences (classifier in modules_to_save plus the prompt)."""
    seqs = sequences((5, 7, 4, 6, 7, 3), seed=5)
    inputs = padded(model, seqs, "right", positions=False)
    return {**inputs, "labels": torch.tensor([0, 1, 2, 0, 1, 2])[:batch]}


def task(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    return classification_task(model) if family in ENCODERS else next_token_task(model)


def learning_rate(model: nn.Module) -> float:
    return 0.01 if model.config.model_type in ("bert", "roberta") else 0.3


def train_and_check_gradients(
    model: nn.Module, batch: dict, steps: int = 12, lr: float | None = None
) -> list[float]:
    """Adam steps; after every backward each trainable parameter has a non-zero gradient and no base one has any."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr or learning_rate(model))
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
            else:
                assert param.grad is None, name
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains_only_prompt(model: nn.Module, family: str, drop: float = 0.92) -> list[float]:
    """Loss falls by the factor ``drop``; exactly the adapter's tensors change, every base tensor is untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_keys = set(adapter_state_keys(model, parameters_only=True))
    assert adapter_keys == {n for n, p in model.named_parameters() if p.requires_grad}
    losses = train_and_check_gradients(model, task(model, family))
    assert losses[-1] < drop * losses[0], losses
    for key, value in model.state_dict().items():
        if key in adapter_keys:
            assert not torch.equal(value, before[key]), f"{key} did not train"
        else:
            assert torch.equal(value, before[key]), f"{key} changed"
    return losses


def assert_roundtrip(model: nn.Module, family: str, directory: Path) -> dict[str, torch.Tensor]:
    """save -> load gives the same outputs (1e-6); the file holds the encoder's output and the head only."""
    batch = task(model, family)
    save_adapter(model, directory)
    tensors = load_file(directory / WEIGHTS_NAME)
    expected_keys = {"prompt_embeddings"} | (
        {"base_model.classifier.dense.weight", "base_model.classifier.dense.bias",
         "base_model.classifier.out_proj.weight", "base_model.classifier.out_proj.bias"}
        if family == "roberta" else
        {"base_model.classifier.weight", "base_model.classifier.bias"} if family == "bert" else set()
    )  # fmt: skip
    assert set(tensors) == expected_keys
    with torch.no_grad():
        output = virtual_tokens_layer(model)[1].virtual_tokens("default")
    assert torch.equal(tensors["prompt_embeddings"], output)
    loaded = load_adapter(FAMILIES[family](), directory)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
    return tensors


def assert_peft_parity(model: nn.Module, family: str, directory: Path, kind: str) -> None:
    """Our directory loads in peft.PeftModel and gives the same logits (ours drop the virtual positions) and loss."""
    from peft import PeftModel

    save_adapter(model, directory)
    reference = PeftModel.from_pretrained(FAMILIES[family](), directory).eval()
    batch = task(model, family)
    theirs = reference_outputs(reference, **batch)
    with torch.no_grad():
        ours = model(**batch)
    logits = theirs.logits[:, N:] if kind == "prompt" and family in DECODERS else theirs.logits
    torch.testing.assert_close(ours.logits, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=0)


def assert_loads_peft_directory(peft_config: Any, family: str, directory: Path) -> None:
    """A directory written by peft itself loads with load_adapter and gives peft's outputs."""
    from peft import get_peft_model

    torch.manual_seed(4)
    reference = get_peft_model(FAMILIES[family](), peft_config).eval()
    reference.save_pretrained(directory)
    ours = load_adapter(FAMILIES[family](), directory)
    batch = task(ours, family)
    theirs = reference_outputs(reference, **batch)
    with torch.no_grad():
        mine = ours(**batch)
    n = peft_config.num_virtual_tokens
    prompt_kind = peft_config.peft_type.value in ("PROMPT_TUNING", "P_TUNING")
    expected = theirs.logits[:, n:] if prompt_kind and family in DECODERS else theirs.logits
    torch.testing.assert_close(mine.logits, expected, atol=1e-6, rtol=0)


# --- training through the Lightning callback -----------------------------------------------------------------
class TaskModule(pl.LightningModule):
    """A user's module around a tiny model; the batch is a dict from the dataloader."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.model = FAMILIES[family]()
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "labels") if len(batch) == 3 else ("input_ids", "labels")
        loss = self.model(**dict(zip(keys, batch, strict=True))).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=learning_rate(self.model))


class _Snapshot(pl.Callback):
    """The model's state once injected (PEFTCallback injects inside fit), to compare against after training."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def fit_with_callback(method: PEFTMethod, family: str, tmp_path: Path, steps: int = 6) -> PEFTCallback:
    """Train through PEFTCallback: the loss falls, exactly the adapter's tensors change, and they alone train."""
    module = TaskModule(family)
    if family in ENCODERS:
        method.modules_to_save = ["classifier"]
    batch = task(module.model, family)
    data = DataLoader(TensorDataset(*batch.values()), batch_size=len(batch["labels"]), shuffle=False)
    callback, snapshot = PEFTCallback(method, target="model"), _Snapshot()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[callback, snapshot],
    )  # fmt: skip
    trainer.fit(module, data)
    trained = adapter_state_dict(module.model)
    assert set(trained) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert callback.parameter_counts["trainable"] == sum(v.numel() for v in trained.values())
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, snapshot.state[key]) != (key in trained), key
    assert module.losses[-1] < 0.95 * module.losses[0], module.losses
    return callback


def word_tokenizer(directory: Path, words: list[str]) -> str:
    """A whitespace word-level tokenizer saved to ``directory`` (offline stand-in for a hub tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)
