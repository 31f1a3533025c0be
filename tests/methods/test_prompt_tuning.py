"""PromptTuning on every family: training, padding, generation, save/load, peft parity, contract errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft import disable_adapters, inject, unload
from lightning_peft.core import transformers_compat as hf
from lightning_peft.methods import PromptTuning
from lightning_peft.methods.prompt.virtual_tokens import VirtualTokens, virtual_tokens_layer
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
from tests.tiny_models import VOCAB, tiny_bert_classifier, tiny_llama


def method(**kwargs) -> PromptTuning:
    return PromptTuning(num_virtual_tokens=N, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_reduces_loss_and_changes_only_the_prompt(family):
    model = build(family, method())
    assert_trains_only_prompt(model, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padded_batches_equal_single_sequences(family):
    assert_padding_invariant(build(family, method()), family)


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_is_deterministic_and_combines_with_the_cache(family):
    assert_generation_consistent(build(family, method()))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip_and_peft_parity(family, tmp_path):
    model = build(family, method())
    tensors = assert_roundtrip(model, family, tmp_path / "ours")
    assert tensors["prompt_embeddings"].shape == (N, 64)
    assert_peft_parity(model, family, tmp_path / "peft", "prompt")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loads_a_directory_written_by_peft(family, tmp_path):
    from peft import PromptTuningConfig

    task_type = "CAUSAL_LM" if family in DECODERS else "SEQ_CLS"
    assert_loads_peft_directory(
        PromptTuningConfig(task_type=task_type, num_virtual_tokens=N), family, tmp_path
    )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trains_through_peft_callback(family, tmp_path):
    callback = fit_with_callback(PromptTuning(num_virtual_tokens=N), family, tmp_path)
    head = 3 * 64 + 3 if family == "bert" else 0  # the classifier copy in modules_to_save
    assert callback.parameter_counts["trainable"] == N * 64 + head


def test_output_is_the_base_model_on_prompt_then_input_without_the_virtual_positions():
    model = build("llama", method())
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    batch = next_token_task(model, length=6)
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        prompts = virtual_tokens_layer(model)[1].virtual_tokens("default")  # (n, d)
        with disable_adapters(model):
            embeds = torch.cat([prompts.expand(len(ids), -1, -1), model.get_input_embeddings()(ids)], dim=1)
            labels = torch.cat([torch.full((len(ids), N), -100), batch["labels"]], dim=1)
            reference = model(inputs_embeds=embeds, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (4, 6, VOCAB)  # the virtual positions are dropped: outputs line up with inputs
    torch.testing.assert_close(out.logits, reference.logits[:, N:], atol=0, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=0, rtol=0)  # labels padded with -100
    assert all(h.shape == (4, 6, 64) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], reference.hidden_states[-1][:, N:], atol=0, rtol=0)
    # attention weights: queries are the real tokens, keys keep the virtual ones
    assert all(a.shape == (4, 4, 6, N + 6) for a in out.attentions)


def test_token_type_ids_get_zeros_for_the_virtual_tokens():
    model = build("bert", method())
    ids = torch.stack(sequences((6, 6)))
    token_types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=token_types)
        prompts = virtual_tokens_layer(model)[1].virtual_tokens("default")
        with disable_adapters(model):
            embeds = torch.cat([prompts.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
            types = torch.cat([torch.zeros(2, N, dtype=torch.long), token_types], dim=1)
            reference = model(inputs_embeds=embeds, token_type_ids=types)
    torch.testing.assert_close(out.logits, reference.logits, atol=0, rtol=0)


def test_init_from_sampled_vocabulary_and_from_text(tmp_path):
    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    inject(model, PromptTuning(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    prompts = virtual_tokens_layer(model)[1].virtual_tokens("default").detach()
    assert all((row == table).all(dim=1).any() for row in prompts)  # every virtual token is a real token

    tokenizer = word_tokenizer(tmp_path, ["classify", "the", "sentiment", "of", "this", "review"])
    text = PromptTuning(
        num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the sentiment",
        tokenizer_name_or_path=tokenizer,
    )  # fmt: skip
    model = inject(tiny_llama(), text)
    prompts = virtual_tokens_layer(model)[1].virtual_tokens("default").detach()
    torch.testing.assert_close(prompts, table[[2, 3, 4, 2, 3]], atol=0, rtol=0)  # 3 tokens repeated to 5


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="num_virtual_tokens=0"):
        PromptTuning(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuning(prompt_tuning_init="TEXT")


def test_disable_and_unload_give_the_base_model_back():
    ids = sequences((6,))[0][None]
    base = tiny_bert_classifier()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = inject(tiny_bert_classifier(), method())
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, expected)
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
        unload(model)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    assert not any(isinstance(m, VirtualTokens) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    assert not model._forward_pre_hooks and not model._forward_hooks  # the hooks removed themselves


def test_a_cache_from_elsewhere_is_refused():
    model = build("llama", method())
    ids = sequences((5,))[0][None]
    with torch.no_grad(), disable_adapters(model):
        foreign = hf.output_cache(model(input_ids=ids, use_cache=True))
    with pytest.raises(ValueError, match="not produced with this soft-prompt adapter"):
        model(input_ids=ids[:, -1:], **{hf.cache_argument(model): foreign})


class TinyLM(nn.Module):
    """A custom model following the documented contract."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def get_input_embeddings(self) -> nn.Module:
        return self.tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, 16)
        weights = torch.ones(h.shape[:2]) if attention_mask is None else attention_mask.float()
        pooled = (torch.tanh(self.mix(h)) * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return self.head(pooled)  # (B, 3): not token-level, kept as it is


def test_custom_module_following_the_contract_works():
    model = inject(TinyLM(), method())
    ids = sequences((5,))[0][None]
    with torch.no_grad():
        out = model(ids)  # positional input_ids are rewritten too
        prompts = virtual_tokens_layer(model)[1].virtual_tokens("default")
        with disable_adapters(model):
            expected = model(inputs_embeds=torch.cat([prompts[None], model.tokens(ids)], dim=1))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_custom_module_missing_the_contract_gets_a_clear_error():
    class NoEmbeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, 16)

    with pytest.raises(ValueError, match=r"get_input_embeddings\(\)"):
        inject(NoEmbeddings(), method())

    class IdsOnly(NoEmbeddings):
        def get_input_embeddings(self) -> nn.Module:
            return self.tokens

        def forward(self, input_ids):
            return self.tokens(input_ids)

    with pytest.raises(ValueError, match=r"does not accept \['inputs_embeds'\]"):
        inject(IdsOnly(), method())


# --- encoder-decoders: prompts before the encoder's input (the prompt-tuning paper's T5 setting, as peft) ----------
ENC_DEC = ("T5", "BART")


def _enc_dec_batch() -> dict[str, torch.Tensor]:
    from tests.architecture_matrix import FAMILIES

    batch = FAMILIES["T5"].inputs()
    batch["attention_mask"][1, :2] = 0  # a left-padded row: the prompts stay visible, the padding does not
    return batch


def _generate(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
            do_sample=False, num_beams=1,
        )  # fmt: skip


@pytest.mark.parametrize("family", ENC_DEC)
@pytest.mark.parametrize("num_transformer_submodules", [1, 2])
def test_encoder_decoder_prompts_match_peft_in_forward_loss_and_generate(
    family, num_transformer_submodules, tmp_path
):
    """Both ways: our directory in peft, and peft's (its SEQ_2_SEQ_LM default stores 2n rows, the decoder's unused)."""
    peft = pytest.importorskip("peft")
    from lightning_peft import load_adapter, save_adapter
    from lightning_peft.testing.checks import randomise
    from tests.architecture_matrix import FAMILIES

    build, batch = FAMILIES[family].build, _enc_dec_batch()
    labels = batch["decoder_input_ids"].clone()
    if num_transformer_submodules == 1:
        ours = inject(build(), PromptTuning(num_virtual_tokens=4))
        randomise(ours, scale=0.5)
        save_adapter(ours, tmp_path)
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    else:
        config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
        theirs = peft.get_peft_model(build(), config)
        randomise(theirs, scale=0.5)
        assert theirs.prompt_encoder["default"].embedding.weight.shape[0] == 8  # 2n rows
        theirs.save_pretrained(tmp_path)
        theirs.eval()
        ours = load_adapter(build(), tmp_path)
    ours.eval()
    with torch.no_grad():
        got, expected = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)  # decoder positions: no cut
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
    assert got.encoder_last_hidden_state.shape[1] == 4 + batch["input_ids"].shape[1]
    assert torch.equal(_generate(ours, batch), _generate(theirs, batch))
    with torch.no_grad(), disable_adapters(ours):
        assert not torch.allclose(ours(**batch).logits, got.logits, atol=1e-3)  # the prompts act


@pytest.mark.parametrize("family", ENC_DEC)
def test_encoder_decoder_generate_equals_cache_free_greedy_decoding(family):
    from lightning_peft.testing.checks import randomise
    from tests.architecture_matrix import FAMILIES

    model = inject(FAMILIES[family].build(), PromptTuning(num_virtual_tokens=4)).eval()
    randomise(model, scale=0.5)
    batch = _enc_dec_batch()
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = (
        None  # BART forces EOS at max_length; the loop below does not
    )
    generated = _generate(model, batch)
    start = generated[:, :1]
    tokens = start
    with torch.no_grad():
        for _ in range(4):  # the whole decoder input every step, through the hooked top-level call
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=tokens
            )
            tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_speech_encoder_decoders_are_refused_with_the_reason():
    from tests.architecture_matrix import FAMILIES

    model = FAMILIES["Whisper"].build()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"encoder WhisperEncoder takes no inputs_embeds .*audio features"):
        inject(model, PromptTuning(num_virtual_tokens=4))
    assert [type(m) for m in model.modules()] == modules


# --- mixed-task batches: row i with its own prompt adapter (prompt tuning's mixed-task inference) ------------------
def _two_prompt_adapters(build):
    from lightning_peft.methods import PTuning
    from lightning_peft.testing.checks import randomise

    model = inject(build(), PromptTuning(num_virtual_tokens=4), adapter_name="sql")
    inject(model, PTuning(num_virtual_tokens=4, encoder_hidden_size=16), adapter_name="chat")
    randomise(model, scale=0.5)
    return model.eval()


@pytest.mark.parametrize("family", ["Llama", "T5"])
def test_mixed_batch_gives_each_row_its_own_prompts_in_forward_and_generate(family):
    from lightning_peft import mixed_batch, set_adapter
    from tests.architecture_matrix import FAMILIES

    model = _two_prompt_adapters(FAMILIES[family].build)
    model.generation_config.eos_token_id = None
    batch = _enc_dec_batch() if family == "T5" else FAMILIES[family].inputs()
    batch = {k: torch.cat([v, v[:1]]) for k, v in batch.items()}  # 3 rows
    batch["attention_mask"][2, :2] = 0  # a left-padded row
    rows = ["chat", "sql", "sql"]
    with torch.no_grad(), mixed_batch(model, rows):
        mixed = model(**batch).logits
        generated = _generate(model, batch)
    for i, name in enumerate(rows):
        set_adapter(model, name)
        alone = {k: v[i : i + 1] for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(mixed[i : i + 1], model(**alone).logits, atol=1e-5, rtol=0)
            assert torch.equal(generated[i : i + 1], _generate(model, alone))
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the two adapters differ


def test_mixed_batch_refuses_rows_the_prompts_cannot_serve():
    from lightning_peft import mixed_batch
    from lightning_peft.methods import PrefixTuning

    model = _two_prompt_adapters(tiny_llama)
    inject(model, PromptTuning(num_virtual_tokens=6), adapter_name="long")
    with (
        pytest.raises(ValueError, match="every row must name one of this model's prompt adapters"),
        mixed_batch(model, ["sql", None]),
    ):
        pass
    with (
        pytest.raises(
            ValueError,
            match=r"of one length, got \(kind, virtual tokens\) \[\('prompt', 4\), \('prompt', 6\)\]",
        ),
        mixed_batch(model, ["sql", "long"]),
    ):
        pass
    inject(model, PrefixTuning(num_virtual_tokens=4), adapter_name="prefix")
    with (
        pytest.raises(ValueError, match="rewrites the model's inputs and cannot vary per row"),
        mixed_batch(model, ["sql", "prefix"]),
    ):
        pass


@pytest.mark.parametrize("family", ENC_DEC)
def test_encoder_decoder_beam_search_and_sampling_match_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    from lightning_peft import save_adapter
    from lightning_peft.testing.checks import randomise
    from tests.architecture_matrix import FAMILIES

    build, batch = FAMILIES[family].build, _enc_dec_batch()
    ours = inject(build(), PromptTuning(num_virtual_tokens=4))
    randomise(ours, scale=0.5)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    ours.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 4}
    for settings in ({"num_beams": 3, "do_sample": False}, {"do_sample": True, "top_k": 20}):
        outputs = []
        for model in (ours, theirs):
            torch.manual_seed(5)
            with torch.no_grad():
                outputs.append(model.generate(**inputs, **settings))
        assert torch.equal(outputs[0], outputs[1]), settings


# --- the call record: each call's rewrite travels with the call (nesting, threads, a replaced kwargs dict) -------
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_calls_in_threads_and_nested_calls_each_see_their_own_record(kind):
    import threading

    from lightning_peft.methods import PTuningV2

    model = build("llama", method() if kind == "prompt" else PTuningV2(num_virtual_tokens=N))
    seqs = sequences((5, 8, 3, 6))
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits for s in seqs]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(seqs))

    def run(i: int) -> None:
        barrier.wait()  # start together: the calls overlap
        with torch.no_grad():
            for _ in range(3):
                results[i] = model(input_ids=seqs[i][None]).logits

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(alone):  # each thread's output has its own length and values (exact)
        assert torch.equal(results[i], expected)

    # A call of the model inside another call of it (a hook on a layer): both are rewritten, both outputs correct.
    inner: list[torch.Tensor] = []

    def call_inside(*_: object) -> None:
        if not inner:
            inner.append(torch.empty(0))  # once: the inner call runs this hook too
            inner[0] = model(input_ids=seqs[2][None]).logits

    handle = model.model.layers[0].register_forward_hook(call_inside)
    try:
        with torch.no_grad():
            outer = model(input_ids=seqs[1][None]).logits
    finally:
        handle.remove()
    assert torch.equal(outer, alone[1]) and torch.equal(inner[0], alone[2])


def test_a_pre_hook_that_replaces_the_keyword_arguments_is_refused():
    model = build("llama", method())
    model.register_forward_pre_hook(lambda m, args, kwargs: (args, dict(kwargs)), with_kwargs=True)
    with pytest.raises(RuntimeError, match=r"replaced the call.s keyword arguments.*prepend=True"):
        model(input_ids=sequences((5,))[0][None])


def test_gradient_checkpointing_recomputation_gives_the_same_loss_and_gradients():
    """Recomputation re-runs the decoder layers, not the hooked host: the prompts are added once per call."""
    results = []
    for checkpointed in (False, True):
        model = build("llama", method()).train()
        if checkpointed:
            assert hf.set_activation_checkpointing(model, True, use_reentrant=False)
        loss = model(**next_token_task(model)).loss
        loss.backward()
        (param,) = [p for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), param.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=0)
    assert results[0][1].abs().sum() > 0
