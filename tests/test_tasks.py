"""The ready LightningModules on tiny models built from configs (no download): loss masking, generation, options."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from lightning_peft import inject
from lightning_peft.app.datamodules import IGNORE_INDEX, SFTDataModule, encode_example, encode_prompt
from lightning_peft.app.tasks import CausalLMModule, SequenceClassificationModule
from lightning_peft.app.tokenization import BYTE_LEVEL, byte_level_tokenizer
from lightning_peft.core import transformers_compat as hf
from lightning_peft.methods import LoRA

LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
}  # fmt: skip
BERT = {
    "model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 128,
}  # fmt: skip
PAIRS = [("What is 2 plus 2?", "4."), ("Spell 'dog' backwards.", "god")]


def causal_lm(**kwargs) -> CausalLMModule:
    module = CausalLMModule(model_config=LLAMA, tokenizer_name_or_path=BYTE_LEVEL, **kwargs)
    module.configure_model()
    return module


def sft_batch(module: CausalLMModule) -> dict[str, torch.Tensor]:
    data = SFTDataModule(tokenizer_name_or_path=BYTE_LEVEL)
    data.tokenizer = module.tokenizer
    examples = []
    for prompt, response in PAIRS:
        input_ids, labels = encode_example(module.tokenizer, prompt, response)
        examples.append({"input_ids": input_ids, "labels": labels})
    return data.collate(examples)


def test_byte_level_tokenizer_round_trips_utf8():
    tokenizer = byte_level_tokenizer()
    text = "Grüße, 東京! 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        259,
        256,
        257,
        258,
    )


def test_model_from_config_takes_vocabulary_from_the_tokenizer_and_a_fixed_seed():
    first, second = causal_lm(), None
    torch.manual_seed(123)  # the global RNG must not matter: the base is rebuilt identically in every process
    second = causal_lm()
    config = first.model.config
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id) == (259, 258, 257)
    assert all(
        torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True)
    )
    assert not torch.equal(causal_lm(init_seed=1).model.lm_head.weight, first.model.lm_head.weight)


def test_sft_loss_is_the_mean_cross_entropy_over_response_tokens_only():
    module = causal_lm()
    batch = sft_batch(module)
    loss = module(batch).loss
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t+1: (B, T-1, V) against (B, T-1)
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # (B, T-1)
    counted = targets != IGNORE_INDEX
    expected = per_token[counted].mean()
    assert counted.sum().item() == sum(len(r) + 1 for _, r in PAIRS)  # response bytes + EOS, nothing else
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    everything = per_token[batch["attention_mask"][:, 1:].bool()].mean()  # what an unmasked loss would give
    assert abs(everything.item() - loss.item()) > 1e-3


def greedy(module: CausalLMModule, prompt: str, steps: int) -> str:
    """Reference decoding: append the argmax token, one step at a time, stop at EOS."""
    ids = torch.tensor([encode_prompt(module.tokenizer, prompt)])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = module.model(input_ids=ids).logits[0, -1].argmax().item()
            if token == module.tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return module.tokenizer.decode(new, skip_special_tokens=True)


def test_predict_generates_greedily_and_deterministically(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(p for p, _ in PAIRS) + "\n")
    outputs = []
    for _ in range(2):
        module = causal_lm(max_new_tokens=12).eval()
        torch.manual_seed(0)  # the same random (non-zero) LoRA B each time: a stand-in for a trained adapter
        inject(module.model, LoRA(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        data = SFTDataModule(
            predict_file=str(path), tokenizer_name_or_path=BYTE_LEVEL, batch_size=2, max_length=64
        )
        data.setup("predict")
        with torch.no_grad():
            outputs.append(module.predict_step(next(iter(data.predict_dataloader())), 0))
    first, second = outputs
    assert first == second
    assert [row["prompt"] for row in first] == [p for p, _ in PAIRS]
    for row in first:  # batched, left-padded generation equals one-by-one argmax decoding
        assert row["response"] == greedy(module, row["prompt"], steps=12)


def test_gradient_checkpointing_and_dtype_options():
    module = causal_lm(gradient_checkpointing=True)
    assert hf.activation_checkpointing(module.model) and module.model.config.use_cache is False
    inject(module.model, LoRA(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    module.train()
    module(sft_batch(module)).loss.backward()
    grads = [p.grad for n, p in module.model.named_parameters() if "lora_A" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert {p.dtype for p in causal_lm(dtype="bfloat16").model.parameters()} == {torch.bfloat16}


def test_sequence_classification_predicts_label_names_and_tracks_f1():
    module = SequenceClassificationModule(
        model_config=BERT, tokenizer_name_or_path=BYTE_LEVEL, label_names=["negative", "positive"]
    )
    module.configure_model()
    module.eval()
    assert module.model.config.id2label == {0: "negative", 1: "positive"}
    texts = ["good", "bad", "fine"]
    batch = {**module.tokenizer(texts, padding=True, return_tensors="pt"), "text": texts}
    with torch.no_grad():
        rows = module.predict_step(batch, 0)
        best = module(batch).softmax(-1).max(-1)
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in best.indices.tolist()]
    assert [r["probability"] for r in rows] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert module.val_f1.average == "macro" and module.test_f1.num_classes == 2


def test_invalid_module_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"model_name_or_path .* or model_config"):
        CausalLMModule()
    with pytest.raises(ValueError, match=r"either model_name_or_path .* or model_config"):
        CausalLMModule(model_name_or_path="x", model_config=LLAMA)
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        CausalLMModule(model_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="dtype='fp8'"):
        CausalLMModule(model_config=LLAMA, dtype="fp8")
    with pytest.raises(ValueError, match="num_labels=3 but label_names has 2"):
        SequenceClassificationModule(model_config=BERT, num_labels=3, label_names=["a", "b"])
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        CausalLMModule(model_config=LLAMA).configure_model()


@contextlib.contextmanager
def transformers_log() -> Iterator[list[str]]:
    """The messages transformers' loggers emit (they do not propagate to pytest's handlers)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_a_fresh_task_head_is_one_line_not_a_load_report(caplog) -> None:
    module = SequenceClassificationModule(label_names=["negative", "positive"])
    with caplog.at_level(logging.INFO), transformers_log() as messages:
        module.configure_model()
    assert not any("LOAD REPORT" in m or "MISSING" in m for m in messages)
    assert "the task head ['classifier'] is not in the checkpoint and starts from init_seed=0" in caplog.text


def test_a_checkpoint_with_other_findings_keeps_transformers_report(tmp_path, caplog) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from lightning_peft.app.tasks import default_model_path

    config = BertConfig.from_pretrained(default_model_path())
    BertForMaskedLM(config).save_pretrained(
        tmp_path
    )  # holds an MLM head (cls.*): unexpected for a classifier
    module = SequenceClassificationModule(
        model_name_or_path=str(tmp_path), tokenizer_name_or_path=default_model_path(), label_names=["a", "b"]
    )
    with caplog.at_level(logging.INFO), transformers_log() as messages:
        module.configure_model()
    (report,) = [m for m in messages if "LOAD REPORT" in m]
    assert "UNEXPECTED" in report and "cls.predictions.bias" in report and "classifier.weight" in report
    assert "task head" not in caplog.text
