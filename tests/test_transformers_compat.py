"""The transformers seam: one place for the cache argument, caches and attention modules, on every release we claim.

The generation matrix is the check that would have caught transformers 5.24's rename of ``past_key_values`` to
``cache``: for every soft-prompt and prefix method on five decoder families, ``generate()`` (greedy and sampled,
with and without the cache, left-padded batches) matches decoding by full forward passes.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_peft
from lightning_peft import inject
from lightning_peft.core import transformers_compat as hf
from lightning_peft.methods import (
    MAMAdapter,
    PEFTMethod,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    UniPELT,
)
from lightning_peft.testing import checks
from tests.methods.prompt_helpers import greedy_without_cache, pad_id, padded, sequences
from tests.tiny_models import VOCAB, tiny_gemma, tiny_gpt2, tiny_llama, tiny_opt, tiny_phi

N = 4
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "llama": tiny_llama, "gpt2": tiny_gpt2, "gemma": tiny_gemma, "phi": tiny_phi, "opt": tiny_opt,
}  # fmt: skip
# UniPELT/MAM find their LoRA and adapter sites by name: the two families whose names their defaults know.
BLOCK_SITES = {"llama": {}, "gpt2": {}}
METHODS: dict[str, Callable[[str], PEFTMethod]] = {
    "prompt_tuning": lambda family: PromptTuning(num_virtual_tokens=N),
    "p_tuning": lambda family: PTuning(num_virtual_tokens=N, encoder_hidden_size=16),
    "prefix_tuning": lambda family: PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=16),
    "p_tuning_v2": lambda family: PTuningV2(num_virtual_tokens=N),
    "mam_adapter": lambda family: MAMAdapter(prefix_length=N),
    "unipelt": lambda family: UniPELT(prefix_length=N),
}
# UniPELT gates each prefix by the mean over the sequence's tokens: cached generation keeps the prompt's gate (the
# cache holds the gated prefix), while a cache-free pass recomputes it over the generated tokens as well.
SEQUENCE_GATED = {"unipelt"}
CELLS = [
    (method, family)
    for method in METHODS
    for family in FAMILIES
    if method not in ("mam_adapter", "unipelt") or family in BLOCK_SITES
]


def build(method: str, family: str) -> nn.Module:
    model = FAMILIES[family]()
    model.generation_config.eos_token_id = None  # never stops early: lengths can be compared
    model = inject(model, METHODS[method](family))
    checks.randomise(model)  # every part acts (adapters start as the identity)
    return model


# --- the generation matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "family"), CELLS)
def test_generate_matches_cache_free_decoding(method: str, family: str) -> None:
    model = build(method, family)
    if method in SEQUENCE_GATED:
        return assert_sequence_gated_generation(model)
    seqs = sequences((4, 7))
    options = {"max_new_tokens": 5, "pad_token_id": pad_id(model), "return_dict_in_generate": True}
    singles = []
    for seq in seqs:
        ids, mask = seq[None], torch.ones(1, len(seq), dtype=torch.long)
        cached = model.generate(ids, attention_mask=mask, do_sample=False, output_logits=True, **options)
        uncached = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **options)
        new = cached.sequences[0, len(seq) :]
        assert (
            new.tolist() == uncached.sequences[0, len(seq) :].tolist() == greedy_without_cache(model, seq, 5)
        )
        # Each step's logits equal a full forward pass over everything before it (1e-5).
        with torch.no_grad():
            full = model(input_ids=cached.sequences[:, :-1]).logits[0, len(seq) - 1 :]
        torch.testing.assert_close(torch.cat(cached.logits), full, atol=1e-5, rtol=0)
        singles.append(new.tolist())

        # Sampling draws the same tokens with and without the cache (same seed, same distributions).
        samples = []
        for use_cache in (True, False):
            torch.manual_seed(7)
            out = model.generate(
                ids, attention_mask=mask, do_sample=True, top_k=0, use_cache=use_cache, **options
            )
            samples.append(out.sequences[0, len(seq) :].tolist())
        assert samples[0] == samples[1]

    batch = padded(model, seqs, "left", positions=False)
    generated = model.generate(**batch, do_sample=False, **options).sequences[
        :, batch["input_ids"].shape[1] :
    ]
    assert generated.tolist() == singles


def assert_sequence_gated_generation(model: nn.Module) -> None:
    """The first step equals a cache-free pass (same tokens, same gate); a left-padded batch equals its rows."""
    seqs = sequences((4, 7))
    options = {"max_new_tokens": 5, "pad_token_id": pad_id(model), "return_dict_in_generate": True}
    singles = []
    for seq in seqs:
        ids, mask = seq[None], torch.ones(1, len(seq), dtype=torch.long)
        cached = model.generate(ids, attention_mask=mask, do_sample=False, output_logits=True, **options)
        with torch.no_grad():
            first = model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(cached.logits[0][0], first, atol=1e-5, rtol=0)
        singles.append(cached.sequences[0, len(seq) :].tolist())
    batch = padded(model, seqs, "left", positions=False)
    generated = model.generate(**batch, do_sample=False, **options).sequences[
        :, batch["input_ids"].shape[1] :
    ]
    assert generated.tolist() == singles


# --- the seam itself ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_cache_argument_is_the_one_forward_reads(family: str) -> None:
    model = FAMILIES[family]()
    name = hf.cache_argument(model)
    assert name in hf.CACHE_ARGUMENTS and name in inspect.signature(model.forward).parameters
    cache, inputs = hf.new_cache(model.config), {"input_ids": torch.arange(2, 7)[None], "use_cache": True}
    hf.set_call_cache(model, inputs, cache)
    with torch.no_grad():
        out = model(**inputs)
    assert hf.output_cache(out) is cache
    assert [hf.cache_length(cache, i) for i in range(2)] == [5, 5]  # every layer read and extended it
    keys, values = hf.cache_key_values(cache, 1)
    assert keys.shape[-2] == values.shape[-2] == 5


def test_set_call_cache_leaves_exactly_one_spelling() -> None:
    """transformers 5.24 ignores ``past_key_values`` when ``cache`` is passed too: never hand both."""
    model = tiny_llama()
    kwargs = {"past_key_values": "old", "cache": "older", "input_ids": None}
    hf.set_call_cache(model, kwargs, "new")
    assert [k for k in kwargs if k in hf.CACHE_ARGUMENTS] == [hf.cache_argument(model)]
    assert kwargs[hf.cache_argument(model)] == "new"
    assert hf.call_cache({"past_key_values": None, "cache": "c"}) == "c"
    assert hf.call_cache({"past_key_values": "p"}) == "p"


def test_a_custom_module_keeps_its_own_spelling() -> None:
    class OldStyle(nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return past_key_values

    class KwargsOnly(nn.Module):
        def forward(self, **kwargs):
            return kwargs

    assert hf.cache_argument(OldStyle()) == "past_key_values"
    assert hf.module_cache(OldStyle(), (None, "positional"), {}) == "positional"
    assert hf.cache_argument(KwargsOnly()) in hf.CACHE_ARGUMENTS
    assert hf.cache_argument(nn.Linear(2, 2)) is None


@pytest.mark.parametrize(("family", "attention"), [("llama", "LlamaAttention"), ("gpt2", "GPT2Attention"),
                                                   ("opt", "OPTAttention"), ("phi", "PhiAttention")])  # fmt: skip
def test_attention_modules_are_found_by_layer_index(family: str, attention: str) -> None:
    found = hf.attention_modules(FAMILIES[family]())
    assert [type(m).__name__ for m in found] == [attention, attention]
    assert [hf.layer_index(m) for m in found] == [0, 1]


def test_a_release_without_the_cache_contract_is_refused_at_injection_naming_the_version(monkeypatch) -> None:
    monkeypatch.setattr(hf, "VERSION", hf.Version("99.1.0"))
    monkeypatch.setattr(hf, "_probe_cache", lambda: "DynamicCache has no `layers`")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=r"transformers 99\.1\.0, newer than .*: DynamicCache has no `layers`"
    ):
        inject(model, PrefixTuning(num_virtual_tokens=N))
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()  # nothing was injected
    assert type(model.get_input_embeddings()) is nn.Embedding


def test_a_renamed_cache_argument_is_refused_naming_the_version(monkeypatch) -> None:
    class Renamed(nn.Module):
        config = None

        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, 16)

        def get_input_embeddings(self) -> nn.Module:
            return self.tokens

        def forward(self, input_ids=None, attention_mask=None, kv_cache=None, use_cache=None):
            return self.tokens(input_ids)

    monkeypatch.setattr(hf, "VERSION", hf.Version("99.1.0"))
    with pytest.raises(
        RuntimeError, match=r"transformers 99\.1\.0.*Renamed\.forward takes none of \['cache', 'past"
    ):
        inject(Renamed(), PrefixTuning(num_virtual_tokens=N, num_layers=1, num_key_value_heads=2, head_dim=8))


def test_a_newer_release_with_the_same_contract_still_works(monkeypatch) -> None:
    monkeypatch.setattr(hf, "VERSION", hf.Version("99.1.0"))
    model = build("prefix_tuning", "llama")
    seq = sequences((5,))[0]
    out = model.generate(seq[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, 5:].tolist() == greedy_without_cache(model, seq, 4)


def test_no_other_file_reads_transformers_internals() -> None:
    """The seam is the only place that spells the cache argument, the cache classes and layer internals."""
    internal = re.compile(
        r"past_key_values|DynamicCache|EncoderDecoderCache|\.layer_idx\b|"
        r"transformers\.(pytorch_utils|activations|cache_utils|modeling_utils|generation)"
    )
    package = Path(lightning_peft.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "transformers_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if internal.search(line)
    ]
    assert offenders == []
