"""Padding-free SFT: ``SFTDataModule(packing=True)`` rows and their use in ``CausalLMModule``.

What is checked, on tiny Llama and GPT-2 models (random weights, the byte-level tokenizer, no download):

* the row layout (greedy, in order, ``position_ids`` restarting at 0, first label of every example -100, padding
  as one more segment, no ``attention_mask``) exactly, on a hand-built example, and on the data module's files;
* the loss of a packed batch equals the loss of the same examples padded (both the mean over every kept token of
  the batch), and so do the LoRA adapter's gradients, within 1e-6, with sdpa and eager attention;
* no attention crosses an example boundary: changing example 1's tokens leaves example 2's logits unchanged, exactly;
* the refusals: soft-prompt methods at fit start, families that cannot isolate packed examples (OPT leaks, BLOOM's
  forward takes no position_ids), an attention_mask beside restarting positions;
* a short Trainer fit with packing: ``val_loss`` is the token-weighted mean over the validation split, and
  ``predict`` (generation with the cache) gives the same responses as without packing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from lightning_peft import PEFTCallback, inject
from lightning_peft.app.datamodules import (
    IGNORE_INDEX,
    SFTDataModule,
    collate_packed,
    encode_example,
    pack_examples,
)
from lightning_peft.app.tasks import CausalLMModule, check_packing_isolation
from lightning_peft.app.tokenization import BYTE_LEVEL
from lightning_peft.methods import LoRA, PrefixTuning, PromptTuning
from tests.tiny_models import VOCAB, seeded, tiny_gpt2, tiny_llama, tiny_opt

LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
}  # fmt: skip
GPT2 = {
    "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
}  # fmt: skip
OPT = {
    "model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 128, "word_embed_proj_dim": 32,
}  # fmt: skip
PAIRS = [
    ("What is 2 plus 2?", "4."),
    ("Spell 'dog' backwards.", "god"),
    ("Name a colour.", "Blue, the colour of a clear sky."),
    ("Say hi.", "Hi!"),
    ("List three fruits.", "Apple, pear, plum."),
    ("Capital of France?", "Paris."),
]


def causal_lm(config: dict, attn: str = "sdpa", **kwargs) -> CausalLMModule:
    module = CausalLMModule(model_config=config, tokenizer_name_or_path=BYTE_LEVEL, max_length=128, **kwargs)
    module.configure_model()
    module.model.set_attn_implementation(attn)
    return module


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def encoded(module: CausalLMModule, tmp_path: Path, max_length: int = 128) -> list[dict]:
    """The data module's (unpacked) examples of PAIRS: BOS + prompt + response + EOS, labels -100 on the prompt."""
    path = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    data = SFTDataModule(path, val_file=path, tokenizer_name_or_path=BYTE_LEVEL)  # train: the whole file
    data.tokenizer, data.max_length = module.tokenizer, max_length
    return data.examples(*reversed(data.records("train")), "train")


def test_rows_position_ids_and_labels_on_a_hand_built_example() -> None:
    def example(start: int, n: int, prompt: int) -> dict:
        ids = list(range(start, start + n))
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}

    # lengths 3, 4 | 5, 2 | 8 with max_length 8: greedy, in order, an example never split
    examples = [example(10, 3, 1), example(20, 4, 0), example(30, 5, 2), example(40, 2, 1), example(50, 8, 3)]
    rows = pack_examples(examples, max_length=8)
    M = IGNORE_INDEX
    assert rows == [
        {"input_ids": [10, 11, 12, 20, 21, 22, 23], "position_ids": [0, 1, 2, 0, 1, 2, 3],
         "labels": [M, 11, 12, M, 21, 22, 23], "num_examples": 2},
        {"input_ids": [30, 31, 32, 33, 34, 40, 41], "position_ids": [0, 1, 2, 3, 4, 0, 1],
         "labels": [M, M, 32, 33, 34, M, 41], "num_examples": 2},
        {"input_ids": list(range(50, 58)), "position_ids": list(range(8)),
         "labels": [M, M, M, 53, 54, 55, 56, 57], "num_examples": 1},
    ]  # fmt: skip
    batch = collate_packed(rows[1:], pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels", "num_examples", "num_loss_tokens"}
    assert "attention_mask" not in batch  # so transformers reads the boundaries from position_ids
    assert batch["input_ids"].tolist() == [[30, 31, 32, 33, 34, 40, 41, 0], list(range(50, 58))]
    # the padding is a segment of its own: its positions restart at 0 too
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0], list(range(8))]
    assert batch["labels"].tolist() == [[M, M, 32, 33, 34, M, 41, M], [M, M, M, 53, 54, 55, 56, 57]]
    assert (batch["num_examples"], batch["num_loss_tokens"]) == (3, 4 + 5)
    with pytest.raises(ValueError, match="9 tokens does not fit in a packed row of max_length=8"):
        pack_examples([example(0, 9, 1)], max_length=8)


def test_data_module_packs_its_splits_and_never_predict(tmp_path: Path) -> None:
    # The unpacked rules hold: a pair longer than a row is truncated, one whose prompt fills it is dropped.
    pairs = [*PAIRS, ("Repeat ab.", "ab" * 40), ("x" * 70, "y")]
    train = write_pairs(tmp_path / "train.jsonl", pairs)
    kwargs = {
        "val_file": train,
        "tokenizer_name_or_path": BYTE_LEVEL,
        "max_length": 64,
        "use_chat_template": False,
    }
    packed, plain = SFTDataModule(train, packing=True, **kwargs), SFTDataModule(train, **kwargs)
    for data in (packed, plain):
        with pytest.warns(UserWarning, match=r"1 pairs \(lines \[8\]"):
            data.setup("fit")
        data.setup("predict")
    examples, rows = plain.datasets["train"], packed.datasets["train"]
    full, _ = encode_example(plain.tokenizer, "Repeat ab.", "ab" * 40, use_chat_template=False)
    assert len(full) == 1 + 10 + 80 + 1 and examples[-1]["input_ids"] == full[:64]
    assert all(len(row["input_ids"]) <= 64 for row in rows)
    assert sum(row["num_examples"] for row in rows) == len(examples) == 7
    # The rows hold the unpacked examples, in order, whole: split them where the positions restart.
    unpacked = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in itertools.pairwise(starts):
            assert row["position_ids"][a:b] == list(range(b - a))
            unpacked.append({"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]})
    assert [u["input_ids"] for u in unpacked] == [e["input_ids"] for e in examples]
    assert [u["labels"] for u in unpacked] == [[IGNORE_INDEX, *e["labels"][1:]] for e in examples]
    # Greedy: no row could also have taken the next row's first example.
    assert all(len(a["input_ids"]) + len(b["input_ids"]) > 64 for a, b in itertools.pairwise(rows))
    batch = next(iter(packed.val_dataloader()))
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    # predict batches are the same prompts, left-padded with a mask, as without packing
    ours, theirs = next(iter(packed.predict_dataloader())), next(iter(plain.predict_dataloader()))
    assert ours["prompt"] == theirs["prompt"]
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def lora_with_nonzero_b(module: CausalLMModule) -> None:
    inject(module.model, LoRA(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient: make both count
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def loss_and_grads(module: CausalLMModule, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    loss = module.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "config,chunk", [(LLAMA, None), (LLAMA, 16), (GPT2, None)], ids=["llama", "llama-chunked-loss", "gpt2"]
)
def test_packed_loss_and_adapter_gradients_equal_padded(config, chunk, attn, tmp_path: Path) -> None:
    module = causal_lm(config, attn, loss_chunk_size=chunk)
    lora_with_nonzero_b(module)
    module.model.eval()  # no dropout: the two runs must see the same network
    examples = encoded(module, tmp_path)
    data = SFTDataModule(tokenizer_name_or_path=BYTE_LEVEL)
    data.tokenizer = module.tokenizer
    padded = data.collate(examples)  # (6, longest) with an attention_mask
    rows = pack_examples(examples, max_length=64)
    assert [len(row["input_ids"]) for row in rows] == [48, 60, 64]  # 2 examples each; two rows get padding
    packed = collate_packed(rows, data._pad_id())
    assert module.loss_weight(packed) == (padded["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    padded_loss, padded_grads = loss_and_grads(module, padded)
    packed_loss, packed_grads = loss_and_grads(module, packed)
    grad_diff = max((packed_grads[n] - g).abs().max().item() for n, g in padded_grads.items())
    print(f"\n{config['model_type']} {attn} chunk={chunk}: |loss diff| {abs(packed_loss - padded_loss):.2e}, "
          f"max |grad diff| {grad_diff:.2e} over {len(padded_grads)} LoRA tensors")  # fmt: skip
    assert len(padded_grads) == 2 * 2 * (7 if config is LLAMA else 4)  # A and B of every Linear, 2 layers
    assert all(g.abs().max() > 0 for g in padded_grads.values())
    assert abs(packed_loss - padded_loss) <= 1e-6
    assert grad_diff <= 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_attention_never_crosses_examples(config, attn) -> None:
    module = causal_lm(config, attn)
    assert module.model.config.use_cache  # the module turns the cache off for packed rows, or they would leak
    g = torch.Generator().manual_seed(0)
    first, changed, second = (torch.randint(0, 256, (5,), generator=g).tolist() for _ in range(3))
    assert first != changed

    def logits_of_second(one: list[int]) -> torch.Tensor:
        row = {"input_ids": one + second, "labels": one + second, "position_ids": [*range(5), *range(5)],
               "num_examples": 2}  # fmt: skip
        with torch.no_grad():
            return module(collate_packed([row], pad_id=0)).logits[0, 5:]  # (5, vocab)

    assert torch.equal(logits_of_second(first), logits_of_second(changed))
    with torch.no_grad():
        alone = module.model(input_ids=torch.tensor([second])).logits[0]
    assert (logits_of_second(first) - alone).abs().max() <= 1e-5  # positions restart: as if it stood alone


def fit_trainer(tmp_path: Path, method, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[PEFTCallback(method, target="model")],
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "method",
    [PromptTuning(num_virtual_tokens=4), PrefixTuning(num_virtual_tokens=4)],
    ids=["prompt-tuning", "prefix-tuning"],
)
def test_soft_prompts_are_refused_at_fit_start(method, tmp_path: Path) -> None:
    module = CausalLMModule(model_config=LLAMA, tokenizer_name_or_path=BYTE_LEVEL, max_length=128)
    data = SFTDataModule(packing=True, batch_size=2)
    trainer = fit_trainer(tmp_path, method, max_steps=1)
    with pytest.raises(ValueError, match=rf"'default' \({method.name}\) adds virtual tokens.*packing: false"):
        trainer.fit(module, data)
    assert trainer.global_step == 0


def test_families_that_cannot_isolate_are_refused() -> None:
    for model in (tiny_llama(), tiny_gpt2()):
        check_packing_isolation(model)  # the families the tests above train packed
    # OPT takes position_ids, but its mask ignores them: the example before leaks in
    with pytest.raises(ValueError, match=r"OPTForCausalLM .*lets packed examples attend to each other"):
        check_packing_isolation(tiny_opt())
    bloom = seeded(BloomForCausalLM, BloomConfig, 0, vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    with pytest.raises(ValueError, match=r"BloomForCausalLM.forward takes no position_ids"):
        check_packing_isolation(bloom)


def test_a_leaking_family_is_refused_at_fit_start_before_any_step(tmp_path: Path) -> None:
    module = CausalLMModule(model_config=OPT, tokenizer_name_or_path=BYTE_LEVEL, max_length=128)
    trainer = fit_trainer(tmp_path, LoRA(r=4, target_modules=["q_proj", "v_proj"]), max_steps=1)
    with pytest.raises(ValueError, match=r"OPTForCausalLM .*packing: false"):
        trainer.fit(module, SFTDataModule(packing=True, batch_size=2))
    assert trainer.global_step == 0


def test_an_attention_mask_beside_restarting_positions_is_refused() -> None:
    module = causal_lm(LLAMA)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}  # fmt: skip
    with pytest.raises(ValueError, match="Drop attention_mask from packed batches"):
        module(batch)
    # left padding with its own positions is no packing: it runs
    batch["attention_mask"], batch["position_ids"] = (
        torch.tensor([[0, 0, 1, 1, 1, 1]]),
        torch.tensor([[1, 1, 0, 1, 2, 3]]),
    )
    assert torch.isfinite(module(batch).loss)


def test_fit_with_packing_logs_the_token_mean_and_predict_is_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(model_config=LLAMA, tokenizer_name_or_path=BYTE_LEVEL, max_length=128, lr=0.01)
    data = SFTDataModule(packing=True, batch_size=2)
    trainer = fit_trainer(
        tmp_path, LoRA(r=4, target_modules="all-linear"), max_steps=3, num_sanity_val_steps=0
    )
    trainer.fit(module, data)
    assert trainer.global_step == 3 and module._packing_checked
    rows = data.datasets["validation"]
    assert [row["num_examples"] for row in rows] == [2, 2, 1]  # two batches of different token counts
    (metrics,) = trainer.validate(module, data, verbose=False)
    # The epoch's val_loss is the mean over every kept token of the split: one padded batch of all of them.
    plain = SFTDataModule(batch_size=64)
    plain.trainer, plain.tokenizer, plain.max_length = trainer, module.tokenizer, 128
    everything = plain.collate(plain.examples(*reversed(plain.records("validation")), "validation"))
    module.eval()
    with torch.no_grad():
        expected = module.loss(everything).item()
    print(f"\npacked val_loss {metrics['val_loss']:.6f}, token mean of the split padded {expected:.6f}")
    assert metrics["val_loss"] == pytest.approx(expected, abs=1e-5)
    # predict (generate() with the cache) never sees packed batches: the same responses as without packing
    kwargs = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    ours = pl.Trainer(**kwargs).predict(module, SFTDataModule(packing=True, batch_size=2))
    theirs = pl.Trainer(**kwargs).predict(module, SFTDataModule(batch_size=2))
    assert ours == theirs and sum(map(len, ours)) == everything["input_ids"].shape[0]
