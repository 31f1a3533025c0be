"""PTuning (MLP and LSTM prompt encoders) on every family: training, padding, generation, save/load, peft parity."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import count_parameters, disable_adapters, load_adapter, save_adapter
from lightning_peft.methods import PTuning
from lightning_peft.methods.prompt.p_tuning import PromptEncoder
from lightning_peft.methods.prompt.virtual_tokens import (
    PromptEmbedding,
    freeze_prompt_encoder,
    virtual_tokens_layer,
)
from tests.methods.prompt_helpers import (
    DECODERS,
    FAMILIES,
    N,
    assert_generation_consistent,
    assert_loads_peft_directory,
    assert_padding_invariant,
    assert_peft_parity,
    assert_roundtrip,
    assert_trains_only_prompt,
    build,
    fit_with_callback,
    next_token_task,
)
from tests.tiny_models import tiny_llama

ENCODER_TYPES = ["MLP", "LSTM"]


def method(encoder: str = "MLP", **kwargs) -> PTuning:
    return PTuning(
        num_virtual_tokens=N, encoder_reparameterization_type=encoder, encoder_hidden_size=32, **kwargs
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_training_reduces_loss_and_changes_only_the_encoder(family):
    assert_trains_only_prompt(build(family, method()), family)


def test_lstm_encoder_trains_every_parameter():
    model = build("llama", method("LSTM"))
    assert isinstance(virtual_tokens_layer(model)[1].prompt_encoder["default"].lstm_head, torch.nn.LSTM)
    assert_trains_only_prompt(model, "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padded_batches_equal_single_sequences(family):
    assert_padding_invariant(build(family, method()), family)


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_is_deterministic_and_combines_with_the_cache(family):
    assert_generation_consistent(build(family, method("LSTM" if family == "llama" else "MLP")))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_and_peft_parity(family, tmp_path):
    model = build(family, method())
    assert_roundtrip(model, family, tmp_path / "ours")
    assert_peft_parity(model, family, tmp_path / "peft", "prompt")


def test_lstm_roundtrip_and_peft_parity(tmp_path):
    model = build("llama", method("LSTM"))
    assert_roundtrip(model, "llama", tmp_path / "ours")
    assert_peft_parity(model, "llama", tmp_path / "peft", "prompt")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loads_a_directory_written_by_peft(family, tmp_path):
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(
        task_type="CAUSAL_LM" if family in DECODERS else "SEQ_CLS",
        num_virtual_tokens=N,
        encoder_hidden_size=32,
    )
    assert_loads_peft_directory(config, family, tmp_path)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trains_through_peft_callback(family, tmp_path):
    callback = fit_with_callback(method(), family, tmp_path)
    # embedding (n x 64) + Linear(64, 32) + Linear(32, 32) + Linear(32, 64), and the classifier copy for BERT
    encoder = N * 64 + (64 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64)
    assert callback.parameter_counts["trainable"] == encoder + (3 * 64 + 3 if family == "bert" else 0)


def test_encoder_numerics_follow_the_paper():
    model = build("llama", method())
    encoder = virtual_tokens_layer(model)[1].prompt_encoder["default"]
    assert isinstance(encoder, PromptEncoder)
    first, _, second, _, third = encoder.mlp_head
    embeddings = encoder.embedding.weight
    expected = third(torch.relu(second(torch.relu(first(embeddings)))))  # Linear-ReLU-Linear-ReLU-Linear
    torch.testing.assert_close(encoder(), expected, atol=0, rtol=0)
    batch = next_token_task(model, length=5)
    with torch.no_grad():
        out = model(**batch)
        with disable_adapters(model):
            embeds = model.get_input_embeddings()(batch["input_ids"])
            embeds = torch.cat([expected.detach().expand(len(embeds), -1, -1), embeds], dim=1)
            reference = model(inputs_embeds=embeds)
    torch.testing.assert_close(out.logits, reference.logits[:, N:], atol=0, rtol=0)


def test_encoder_freezes_into_its_output_for_inference(tmp_path):
    model = build("llama", method("LSTM"))
    batch = next_token_task(model, length=5)
    with torch.no_grad():
        before = model(**batch).logits
    freeze_prompt_encoder(model)
    encoder = virtual_tokens_layer(model)[1].prompt_encoder["default"]
    assert isinstance(encoder, PromptEmbedding) and count_parameters(model)["trainable"] == 0
    assert encoder.embedding.weight.shape == (N, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)

    # What a saved directory loads as: the plain output, trainable on request (P-Tuning's encoder is not saved)
    save_adapter(model, tmp_path)
    resumed = load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert count_parameters(resumed)["trainable"] == N * 64
    with torch.no_grad():
        torch.testing.assert_close(resumed(**batch).logits, before, atol=0, rtol=0)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="use 'MLP' or 'LSTM'"):
        PTuning(encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        PTuning(encoder_dropout=1.5)
