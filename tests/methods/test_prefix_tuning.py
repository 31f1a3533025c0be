"""PrefixTuning and PTuningV2 on every family: the paper's prefix, GQA caches, padding, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import count_parameters, disable_adapters, inject
from lightning_peft.core import transformers_compat as hf
from lightning_peft.methods import PrefixTuning, PromptTuning, PTuningV2
from lightning_peft.methods.prompt.prefix_tuning import PrefixEncoder
from lightning_peft.methods.prompt.virtual_tokens import virtual_tokens_layer
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
    sequences,
    word_tokenizer,
)
from tests.tiny_models import VOCAB, tiny_distilbert_classifier, tiny_llama

METHODS = {"prefix": PrefixTuning, "v2": PTuningV2}


def method(kind: str, **kwargs) -> PrefixTuning | PTuningV2:
    return METHODS[kind](num_virtual_tokens=N, **kwargs)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_reduces_loss_and_changes_only_the_prefix(family, kind):
    assert_trains_only_prompt(build(family, method(kind)), family)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padded_batches_equal_single_sequences(family, kind):
    assert_padding_invariant(build(family, method(kind)), family)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_is_deterministic_and_combines_with_the_cache(family, kind):
    assert_generation_consistent(build(family, method(kind)))


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_and_peft_parity(family, kind, tmp_path):
    model = build(family, method(kind))
    tensors = assert_roundtrip(model, family, tmp_path / "ours")
    heads, head_dim = (2, 16) if family in ("llama", "qwen2") else (4, 16)  # GQA: 2 key/value heads
    assert tensors["prompt_embeddings"].shape == (
        N,
        2 * 2 * heads * head_dim,
    )  # (n, layers * (k, v) * heads * dim)
    assert_peft_parity(model, family, tmp_path / "peft", "prefix")


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loads_a_directory_written_by_peft(family, projection, tmp_path):
    from peft import PrefixTuningConfig

    task_type = "CAUSAL_LM" if family in DECODERS else "SEQ_CLS"
    config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=N, prefix_projection=projection)
    assert_loads_peft_directory(config, family, tmp_path)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trains_through_peft_callback(family, kind, tmp_path):
    callback = fit_with_callback(method(kind), family, tmp_path)
    width = 2 * 2 * (32 if family == "llama" else 64)  # layers * (key, value) * kv_heads * head_dim
    prefix = N * 64 + (64 * 64 + 64) + (64 * width + width) if kind == "prefix" else N * width
    assert callback.parameter_counts["trainable"] == prefix + (3 * 64 + 3 if family == "bert" else 0)


@pytest.mark.parametrize("kind", METHODS)
def test_output_at_init_is_the_model_reading_the_defined_prefix(kind):
    """Li & Liang: P = MLP(E) (P-Tuning v2: P = E), per layer keys and values the real tokens attend to first."""
    model = build("llama", method(kind))
    encoder = virtual_tokens_layer(model)[1].prompt_encoder["default"]
    assert isinstance(encoder, PrefixEncoder)
    with torch.no_grad():
        if kind == "prefix":
            first, tanh, second = encoder.transform
            assert (
                isinstance(tanh, nn.Tanh)
                and first.in_features == 64
                and second.out_features == 2 * 2 * 2 * 16
            )
            flat = second(torch.tanh(first(encoder.embedding.weight)))
        else:
            flat = encoder.embedding.weight
        # (n, layers * 2 * kv_heads * head_dim) -> per layer (1, kv_heads=2, n, head_dim=16): grouped-query caches
        per_layer = flat.view(N, 4, 2, 16).permute(1, 2, 0, 3)
        batch = next_token_task(model, length=5)
        cache = hf.new_cache(model.config)
        for layer in range(2):  # (kv_heads, n, head_dim) -> (B, kv_heads, n, head_dim)
            cache.update(
                per_layer[2 * layer].expand(4, -1, -1, -1),
                per_layer[2 * layer + 1].expand(4, -1, -1, -1),
                layer,
            )
        with disable_adapters(model):
            expected = model(
                **batch, **{hf.cache_argument(model): cache}, attention_mask=torch.ones(4, N + 5)
            ).logits
        out = model(**batch)
    torch.testing.assert_close(out.logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("family", DECODERS)
def test_real_word_init_equals_the_model_reading_those_words_first(family, kind, tmp_path):
    words = ["summarize", "this", "table", "briefly"]  # N words: token ids 2, 3, 4, 5
    tokenizer = word_tokenizer(tmp_path, words)
    model = build(family, method(kind, init_text=" ".join(words), tokenizer_name_or_path=tokenizer))
    seq = sequences((5,))[0][None]
    with torch.no_grad():
        out = model(input_ids=seq).logits
        with disable_adapters(model):
            reference = model(input_ids=torch.cat([torch.arange(2, 2 + N)[None], seq], dim=1)).logits[:, N:]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_generation_cache_holds_the_prefix_once():
    model = build("llama", method("v2"))
    seq = sequences((5,))[0][None]
    out = model.generate(seq, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    # prefix + prompt + the generated tokens that were fed back (the last one is never fed)
    assert hf.output_cache(out).get_seq_length() == N + 5 + 2
    with torch.no_grad():
        uncached = model(input_ids=seq, use_cache=False)
        cached = model(input_ids=seq)  # use_cache defaults to config.use_cache, as for the base model
    assert hf.output_cache(uncached) is None  # the cache made for the prefix is not returned unless asked for
    assert hf.output_cache(cached).get_seq_length() == N + 5
    # a manual decoding step continues from it: the mask and positions account for the prefix
    next_id = cached.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step = model(
            input_ids=next_id,
            **{hf.cache_argument(model): hf.output_cache(cached)},
            attention_mask=torch.ones(1, 6),
        )
        full = model(input_ids=torch.cat([seq, next_id], dim=1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


def test_models_that_ignore_the_cache_are_refused_at_injection():
    model = tiny_distilbert_classifier()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(
        ValueError, match=r"DistilBertForSequenceClassification's attention layers do not read"
    ):
        inject(model, PTuningV2(num_virtual_tokens=N))
    assert [type(m) for m in model.modules()] == modules


@pytest.mark.parametrize("method", [PrefixTuning(num_virtual_tokens=N), PTuningV2(num_virtual_tokens=N)])
def test_prefixes_on_speech_encoder_decoders_are_refused_at_injection(method):
    """T5/BART prefixes work (tests/methods/test_prefix_seq2seq.py); Whisper's encoder takes no token ids."""
    from tests.architecture_matrix import FAMILIES

    model = FAMILIES["Whisper"].build()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(
        ValueError, match=r"on the encoder-decoder WhisperForConditionalGeneration: .*takes no inputs_embeds"
    ):
        inject(model, method)
    assert [type(m) for m in model.modules()] == modules


def test_gradient_checkpointing_is_refused():
    model = tiny_llama()
    assert hf.set_activation_checkpointing(model, True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        inject(model, PrefixTuning(num_virtual_tokens=N))
    model = inject(tiny_llama(), PrefixTuning(num_virtual_tokens=N)).train()
    assert hf.set_activation_checkpointing(
        model, True
    )  # after injection: transformers drops the cache in training
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=sequences((5,))[0][None])


def test_custom_module_without_cache_geometry_gets_a_clear_error():
    class TinyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, 16)

        def get_input_embeddings(self) -> nn.Module:
            return self.tokens

        def forward(self, input_ids=None, attention_mask=None, cache=None):
            return self.tokens(input_ids)

    with pytest.raises(ValueError, match=r"cannot tell \['num_layers', 'num_key_value_heads', 'head_dim'\]"):
        inject(TinyEncoder(), PrefixTuning(num_virtual_tokens=N))

    class NoCache(TinyEncoder):
        def forward(self, input_ids=None, attention_mask=None):
            return self.tokens(input_ids)

    with pytest.raises(ValueError, match=r"does not accept a cache argument \(cache or past_key_values\)"):
        inject(NoCache(), PTuningV2(num_virtual_tokens=N, num_layers=1, num_key_value_heads=1, head_dim=16))


def test_peft_type_and_loading_tell_the_two_apart(tmp_path):
    from lightning_peft import load_adapter, save_adapter

    for kind, cls in METHODS.items():
        model = build("llama", method(kind))
        save_adapter(model, tmp_path / kind)
        loaded = load_adapter(tiny_llama(), tmp_path / kind)
        record = loaded._lightning_peft.methods["default"]
        assert type(record) is cls and record.num_virtual_tokens == N
    assert count_parameters(loaded)["trainable"] == 0


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuning(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="init_text and tokenizer_name_or_path go together"):
        PTuningV2(init_text="summarize")


def test_two_soft_prompt_adapters_switch_with_set_adapter(tmp_path):
    from lightning_peft import load_adapter, save_adapter, set_adapter

    model = build("llama", PromptTuning(num_virtual_tokens=N))
    save_adapter(model, tmp_path / "default")
    inject(model, PTuningV2(num_virtual_tokens=3), adapter_name="b")
    save_adapter(model, tmp_path / "b")
    seq = sequences((5,))[0][None]
    for name, trainable in [("default", N * 64), ("b", 3 * 2 * 2 * 32)]:
        set_adapter(model, name)
        assert count_parameters(model)["trainable"] == trainable
        with torch.no_grad():
            expected = load_adapter(tiny_llama(), tmp_path / name)(input_ids=seq).logits
            torch.testing.assert_close(model(input_ids=seq).logits, expected, atol=0, rtol=0)
