"""Seq2SeqLMModule + Seq2SeqDataModule on tiny encoder-decoders built from configs (T5, BART; no download):
labels and padding, the loss against one computed by hand, training, adapter-only checkpoints, resume, predict."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import PEFTCallback, count_parameters, save_adapter
from lightning_peft.app.datamodules import IGNORE_INDEX, Seq2SeqDataModule, encode_seq2seq_example
from lightning_peft.app.generate import generate
from lightning_peft.app.prediction_writer import PredictionWriter
from lightning_peft.app.tasks import Seq2SeqLMModule
from lightning_peft.app.tokenization import BYTE_LEVEL
from lightning_peft.methods import LoRA, PromptTuning

# dropout 0: trajectories (uninterrupted vs resumed) are then comparable step by step.
T5 = {
    "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
    "num_heads": 4, "dropout_rate": 0.0,
}  # fmt: skip
BART = {
    "model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
    "dropout": 0.0,
}  # fmt: skip
PAIRS = [("What is 2 plus 2?", "4."), ("Spell 'dog' backwards.", "god"), ("Name a colour.", "Blue is one.")]
LORA_QV = ["q", "v"]
# T5 with one encoder and one decoder block: q and v of the encoder's self-attention, of the decoder's
# self-attention and of its cross-attention.
T5_QV = [
    f"{block}.{attention}.{name}"
    for block, attention in [
        ("encoder.block.0.layer.0", "SelfAttention"),
        ("decoder.block.0.layer.0", "SelfAttention"),
        ("decoder.block.0.layer.1", "EncDecAttention"),
    ]
    for name in LORA_QV
]


def seq2seq(config: dict = T5, **kwargs) -> Seq2SeqLMModule:
    return Seq2SeqLMModule(
        model_config=config, tokenizer_name_or_path=BYTE_LEVEL, max_length=64, max_new_tokens=8, **kwargs
    )


def built(config: dict = T5) -> Seq2SeqLMModule:
    module = seq2seq(config)
    module.configure_model()
    return module.eval()


def pairs_file(directory: Path) -> Path:
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return path


def data(directory: Path, **kwargs) -> Seq2SeqDataModule:
    path = str(pairs_file(directory))
    return Seq2SeqDataModule(train_file=path, val_file=path, batch_size=len(PAIRS), **kwargs)


def fixed_batch(module: Seq2SeqLMModule) -> dict[str, torch.Tensor]:
    datamodule = Seq2SeqDataModule(tokenizer_name_or_path=BYTE_LEVEL)
    datamodule.tokenizer = module.tokenizer
    examples = []
    for prompt, response in PAIRS:
        input_ids, labels = encode_seq2seq_example(module.tokenizer, prompt, response, max_length=64)
        examples.append({"input_ids": input_ids, "labels": labels})
    return datamodule.collate(examples)


def eval_loss(module: Seq2SeqLMModule, batch: dict[str, torch.Tensor]) -> float:
    module.eval()
    with torch.no_grad():
        return module.loss(batch).item()


def trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks, num_sanity_val_steps=0, **{"enable_checkpointing": False, **kwargs},
    )  # fmt: skip


def greedy(module: Seq2SeqLMModule, prompt: str, steps: int) -> str:
    """Reference decoding without generate() or a cache: one prompt at a time, the decoder rerun on every step."""
    tokenizer = module.tokenizer
    input_ids = torch.tensor([encode_seq2seq_example(tokenizer, prompt, None, max_length=64)[0]])
    decoder_ids = torch.tensor([[module.model.config.decoder_start_token_id]])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = module.model(input_ids=input_ids, decoder_input_ids=decoder_ids).logits  # (1, t, V)
            token = logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            decoder_ids = torch.cat([decoder_ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def predictions(module: Seq2SeqLMModule, root: Path, callbacks: list, **kwargs) -> list[dict[str, str]]:
    prompts = root / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p, _ in PAIRS))
    out = root / "predictions.jsonl"
    datamodule = Seq2SeqDataModule(predict_file=str(prompts), batch_size=len(PAIRS))
    trainer(root, [*callbacks, PredictionWriter(str(out))]).predict(
        module, datamodule, return_predictions=False, **kwargs
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("config", [T5, BART], ids=["t5", "bart"])
def test_labels_are_the_response_ids_padded_with_minus_100_and_the_loss_is_the_models(config):
    module = built(config)
    tokenizer = module.tokenizer
    batch = fixed_batch(module)
    labels = batch["labels"]  # (B, L)
    for row, (prompt, response) in enumerate(PAIRS):
        target = [*response.encode(), tokenizer.eos_token_id]  # byte-level: one id per byte, then EOS
        assert labels[row, : len(target)].tolist() == target
        assert (labels[row, len(target) :] == IGNORE_INDEX).all()
        source = list(prompt.encode())  # the prompt alone is the encoder's input (no chat template)
        assert batch["input_ids"][row, : len(source)].tolist() == source
        assert (batch["input_ids"][row, len(source) :] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(source) + [0] * (
            batch["input_ids"].shape[1] - len(source)
        )
    assert (labels == IGNORE_INDEX).sum().item() > 0  # responses of different lengths: some padding

    loss = module.loss(batch)
    # By hand: the decoder reads the labels shifted right behind the start token (pad, as in T5).
    start = module.model.config.decoder_start_token_id
    assert start == tokenizer.pad_token_id == 258
    shifted = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, tokenizer.pad_token_id)
    decoder_input_ids = torch.cat([torch.full((labels.shape[0], 1), start), shifted], dim=1)  # (B, L)
    with torch.no_grad():
        logits = module.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
        ).logits  # (B, L, V)
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, L)
    counted = labels != IGNORE_INDEX
    assert counted.sum().item() == sum(len(r) + 1 for _, r in PAIRS)  # response bytes + EOS, nothing else
    assert loss.item() == pytest.approx(per_token[counted].mean().item(), rel=1e-5)
    assert abs(per_token.mean().item() - loss.item()) > 1e-3  # what counting the padding would give


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LoRA on T5's q and v: 8 epochs of one fixed batch uninterrupted, and 4 + a resume to 8 from the checkpoint."""
    root = tmp_path_factory.mktemp("seq2seq_lora")

    def fit(epochs: int, ckpt_path: str | None = None, checkpoint_dir: Path | None = None) -> Seq2SeqLMModule:
        L.seed_everything(0)
        module = seq2seq(lr=1e-2)
        callbacks = [PEFTCallback(LoRA(r=4, target_modules=LORA_QV), target="model")]
        if checkpoint_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0))
        run = trainer(root, callbacks, max_epochs=epochs, enable_checkpointing=checkpoint_dir is not None)
        run.fit(module, data(root), ckpt_path=ckpt_path)
        module.fit_steps = run.global_step
        module.val_loss = run.callback_metrics["val_loss"].item()
        return module

    uninterrupted = fit(8)
    first_half = fit(4, checkpoint_dir=root / "ckpt")
    resumed = fit(8, ckpt_path=str(root / "ckpt" / "last.ckpt"))
    return {"root": root, "uninterrupted": uninterrupted, "first_half": first_half, "resumed": resumed}


def test_a_short_fit_lowers_the_loss_on_its_batch(lora_runs):
    trained = lora_runs["uninterrupted"]
    batch = fixed_batch(trained)
    before = eval_loss(built(), batch)  # the same base (init_seed), no adapter: LoRA's B starts at zero
    after = eval_loss(trained, batch)
    assert trained.fit_steps == 8
    assert before > 5.0  # about ln(259) = 5.56: random weights
    print(f"LoRA fit: loss {before:.4f} -> {after:.4f}")
    assert after < before - 1.0, (before, after)
    assert trained.val_loss == pytest.approx(after, rel=1e-5)  # validation: the same pairs, the same loss


def test_the_adapter_only_checkpoint_holds_only_lora_tensors_and_resumes(lora_runs):
    checkpoint = torch.load(lora_runs["root"] / "ckpt" / "last.ckpt", weights_only=True)
    expected = {f"model.{name}.lora_{ab}.default.weight" for name in T5_QV for ab in "AB"}
    assert set(checkpoint["state_dict"]) == expected
    assert (
        count_parameters(lora_runs["first_half"])["trainable"] == 6 * 2 * 4 * 32
    )  # 6 layers, A and B, r=4, 32 wide

    resumed, uninterrupted = lora_runs["resumed"], lora_runs["uninterrupted"]
    assert (lora_runs["first_half"].fit_steps, resumed.fit_steps) == (4, 8)
    for key, value in uninterrupted.model.state_dict().items():  # adapters 4 + 4 steps == 8 steps
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_predict_writes_prompt_and_response_rows_equal_to_greedy_decoding(lora_runs, tmp_path):
    trained = lora_runs["uninterrupted"]
    rows = predictions(trained, tmp_path, [])
    assert [list(row) for row in rows] == [["prompt", "response"]] * len(PAIRS)
    assert [row["prompt"] for row in rows] == [p for p, _ in PAIRS]
    # Batched, right-padded generate() equals one prompt at a time, cache-free argmax decoding.
    assert [row["response"] for row in rows] == [greedy(trained, p, steps=8) for p, _ in PAIRS]
    # A fresh module (same base from init_seed) with the adapter-only checkpoint predicts the same.
    fresh_rows = predictions(
        seq2seq(), tmp_path, [PEFTCallback(LoRA(r=4, target_modules=LORA_QV), target="model")],
        ckpt_path=str(lora_runs["root"] / "ckpt" / "last.ckpt"),
    )  # fmt: skip
    first_half = predictions(lora_runs["first_half"], tmp_path, [])
    assert fresh_rows == first_half


def test_prompt_tuning_trains_the_encoder_prompts_and_predicts(tmp_path):
    L.seed_everything(0)
    module = seq2seq(lr=1.0)
    prompt_tuning = PEFTCallback(PromptTuning(num_virtual_tokens=8), target="model")
    trainer(tmp_path, [prompt_tuning], max_epochs=16).fit(module, data(tmp_path))
    assert count_parameters(module)["trainable"] == 8 * 32  # the 8 virtual tokens, 32 wide each
    batch = fixed_batch(module)
    before, after = eval_loss(built(), batch), eval_loss(module, batch)
    print(f"PromptTuning fit: loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.5, (before, after)
    rows = predictions(module, tmp_path, [])
    assert [row["prompt"] for row in rows] == [p for p, _ in PAIRS]
    # generate() runs the encoder by itself; the prompts are prepended there too.
    assert [row["response"] for row in rows] == [greedy(module, p, steps=8) for p, _ in PAIRS]

    # Exported, the trained prompts load in peft on the same base and give the same loss and generate().
    peft = pytest.importorskip("peft")
    save_adapter(module.model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(built().model, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = theirs(**batch).loss
    assert module.loss(batch).item() == pytest.approx(expected.item(), abs=1e-6)
    prompts = {k: batch[k] for k in ("input_ids", "attention_mask")}
    options = {"max_new_tokens": 8, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        assert torch.equal(module.model.generate(**prompts, **options), theirs.generate(**prompts, **options))


def test_bart_trains_and_predicts(tmp_path):
    module = seq2seq(BART, lr=1e-2)
    trainer(
        tmp_path, [PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")], max_steps=2
    ).fit(module, data(tmp_path))
    # BartConfig's forced_eos_token_id=2 is byte 2 here: the module maps it to the tokenizer's EOS.
    assert module.model.generation_config.forced_eos_token_id == module.tokenizer.eos_token_id == 257
    rows = predictions(module, tmp_path, [])
    # generate() forces EOS as the 8th (last) token, which decodes to nothing: 7 greedy tokens.
    assert [row["response"] for row in rows] == [greedy(module, p, steps=7) for p, _ in PAIRS]


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"Seq2SeqLMModule needs model_name_or_path .* or model_config"):
        Seq2SeqLMModule()
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Seq2SeqLMModule(model_config=T5, max_new_tokens=0)
    llama = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(
        ValueError, match=r"model_type='llama' is not one\. For a decoder-only model use CausalLMModule"
    ):
        Seq2SeqLMModule(model_config=llama, tokenizer_name_or_path=BYTE_LEVEL).configure_model()


def test_the_generate_command_answers_as_greedy_decoding_on_the_seq2seq_config(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "seq2seq_tiny_t5.yaml"
    prompts = [p for p, _ in PAIRS[:2]]
    answers = generate(
        config, None, prompts, max_new_tokens=6, overrides=["--trainer.default_root_dir", str(tmp_path)]
    )
    # ckpt_path=None: the freshly injected LoRA (B = 0), i.e. the base T5 the config builds from init_seed.
    model_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    base = Seq2SeqLMModule(**model_args)
    base.configure_model()
    assert answers == [greedy(base.eval(), p, steps=6) for p in prompts]
