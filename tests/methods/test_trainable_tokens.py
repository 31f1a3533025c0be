"""TrainableTokens: only chosen rows train, the file holds only them, tied heads follow, resized vocabularies are
recorded, and the directories load both ways with Hugging Face peft (TRAINABLE_TOKENS)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lightning_peft import adapter_state_dict, inject, load_adapter, merge, save_adapter, unmerge
from lightning_peft.core.injection import disable_adapters, merge_and_unload
from lightning_peft.methods import LoRA, TrainableTokens
from lightning_peft.methods.trainable_tokens import TrainableTokensLayer
from lightning_peft.testing import checks
from tests.tiny_models import tiny_gemma, tiny_gpt2, tiny_llama

# Ids that occur in both checks.token_batch() and checks.fit_batch(): each check's batch reaches the trained rows.
TOKENS = [9, 12, 20, 25, 37, 64, 72, 79, 126]
EMBED = "base_model.model.model.embed_tokens.trainable_tokens_delta"
HEAD = "base_model.model.lm_head.trainable_tokens_delta"


def tiny_llama_tied(seed: int = 0) -> nn.Module:
    return tiny_llama(seed, tie_word_embeddings=True)


def _train(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        checks.logits(model).square().mean().backward()
        optimizer.step()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_acceptance_checks(tmp_path: Path) -> None:
    # Untied Llama: the embedding's rows only (init, training, round trip, merge, disable, unload, named adapters,
    # gradient checkpointing, the Lightning callback).
    checks.check_method(lambda: TrainableTokens(token_indices=TOKENS), tmp_path)


@pytest.mark.parametrize("build", [tiny_llama_tied, tiny_gpt2, tiny_gemma], ids=["llama", "gpt2", "gemma"])
def test_tied_head_follows_and_only_chosen_rows_change(build: Callable[[], nn.Module]) -> None:
    base = build()
    weight = base.get_input_embeddings().weight.detach().clone()
    model = inject(build(), TrainableTokens(token_indices=TOKENS))
    head = model.get_output_embeddings()
    assert isinstance(head, TrainableTokensLayer) and head.tied_to is model.get_input_embeddings()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        next(k for k in adapter_state_dict(model) if "lm_head" not in k)
    ]  # one trained tensor, named under the embedding (the head's key is the same tensor)
    with torch.no_grad():  # the recomputed logits equal the base's within rounding (bit-equal embeddings)
        assert _max_diff(checks.logits(model), checks.logits(base)) < 1e-5
    _train(model)
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []
    with torch.no_grad():
        trained = checks.logits(model)
    merged = merge_and_unload(model)
    new = merged.get_input_embeddings().weight
    assert merged.get_output_embeddings().weight is new  # still tied after unloading
    rows = torch.tensor(TOKENS)
    others = torch.ones(len(weight), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(new[others], weight[others])  # every other row bit for bit
    assert (new[rows] != weight[rows]).any(dim=1).all()  # each chosen row moved
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(merged), trained, atol=1e-4, rtol=0)


def test_saved_file_holds_only_the_rows(tmp_path: Path) -> None:
    for name, build, keys in [("untied", tiny_llama, {EMBED}), ("tied", tiny_llama_tied, {EMBED, HEAD})]:
        model = inject(build(), TrainableTokens(token_indices=[5, 9, 127]))
        save_adapter(model, tmp_path / name)
        tensors = load_file(tmp_path / name / "adapter_model.safetensors")
        assert {k: tuple(v.shape) for k, v in tensors.items()} == dict.fromkeys(keys, (3, 64))
        if name == "tied":
            assert torch.equal(tensors[EMBED], tensors[HEAD])
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (config["peft_type"], config["token_indices"], config["target_modules"]) == (
            "TRAINABLE_TOKENS", [5, 9, 127], r"model\.embed_tokens"
        )  # fmt: skip
        assert "num_embeddings" not in config and "lightning_peft" not in config  # peft would warn of them
        with safe_open(tmp_path / name / "adapter_model.safetensors", framework="pt") as file:
            assert json.loads(file.metadata()["lightning_peft"]) == {"num_embeddings": 128}


def test_untied_head_trains_where_targeted(tmp_path: Path) -> None:
    model = inject(
        tiny_llama(), TrainableTokens(token_indices=TOKENS, target_modules=["embed_tokens", "lm_head"])
    )
    layers = dict(checks.adapter_layers(model))
    assert sorted(layers) == ["lm_head", "model.embed_tokens"] and layers["lm_head"].tied_to is None
    _train(model)
    state = adapter_state_dict(model)
    assert not torch.equal(state["model.embed_tokens.trainable_tokens_delta.default"],
                           state["lm_head.trainable_tokens_delta.default"])  # fmt: skip
    with torch.no_grad():
        expected = checks.logits(model)
    save_adapter(model, tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {EMBED, HEAD}
    with torch.no_grad():
        assert torch.equal(checks.logits(load_adapter(tiny_llama(), tmp_path)), expected)


@pytest.mark.parametrize("build", [tiny_llama, tiny_llama_tied], ids=["untied", "tied"])
def test_merge_unmerge_and_disable_are_exact(build: Callable[[], nn.Module]) -> None:
    base = build()
    model = inject(build(), TrainableTokens(token_indices=TOKENS))
    checks.randomise(model)
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    with torch.no_grad():
        unmerged = checks.logits(model)
        with disable_adapters(model):
            assert torch.equal(checks.logits(model), checks.logits(base))
        merge(model)
        merge(model)  # idempotent
        assert torch.equal(weight[TOKENS], model.get_input_embeddings().trainable_tokens_delta["default"])
        torch.testing.assert_close(checks.logits(model), unmerged, atol=1e-4, rtol=0)
        with disable_adapters(model):  # unmerges first
            assert torch.equal(checks.logits(model), checks.logits(base))
        merge(model)
        unmerge(model)
    assert torch.equal(weight, before)  # the rows that were there, bit for bit
    with torch.no_grad():
        assert torch.equal(checks.logits(model), unmerged)


def test_non_finite_rows_are_not_merged() -> None:
    checks.assert_non_finite_merge_is_refused(
        tiny_llama_tied, TrainableTokens(token_indices=[3]), "trainable_tokens_delta"
    )


# --- resized vocabularies -------------------------------------------------------------------------------------
def _resized(seed: int, rows: int = 130) -> nn.Module:
    model = tiny_llama_tied()
    torch.manual_seed(seed)  # the new rows are random: another seed, another base
    model.resize_token_embeddings(rows)
    return model


def test_resized_vocabulary_roundtrip_and_refusal(tmp_path: Path) -> None:
    new_tokens = [128, 129]
    ids = checks.token_batch()
    ids[0, :2] = torch.tensor(new_tokens)
    model = inject(_resized(seed=1), TrainableTokens(token_indices=new_tokens))
    checks.randomise(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path)
    # A fresh base resized with other random rows: the saved rows replace them, so the outputs are the same.
    loaded = load_adapter(_resized(seed=2), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    for wrong in (tiny_llama_tied(), _resized(seed=2, rows=132)):
        with checks.raises(ValueError, r"expects 130 embedding rows, but model\.embed_tokens has 1(28|32).*"
                                      r"resize_token_embeddings\(130\)"):  # fmt: skip
            load_adapter(wrong, tmp_path)
        assert checks.adapter_layers(wrong) == []  # nothing left half-injected
    with checks.raises(ValueError, r"token_indices \[128, 129\] are out of range .* 128 rows"):
        inject(tiny_llama_tied(), TrainableTokens(token_indices=new_tokens))


# --- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token_indices": []}, "non-empty list"),
        ({"token_indices": [3, -1]}, r"non-negative ints; got \[-1\]"),
        ({"token_indices": [3, 5, 3]}, r"repeats \[3\]"),
        ({"token_indices": [3], "num_embeddings": 3}, "out of range for num_embeddings=3"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with checks.raises(ValueError, match):
        TrainableTokens(**kwargs)


def test_bad_targets_are_refused_at_injection() -> None:
    with checks.raises(ValueError, r"different numbers of rows .*'model\.layers\.0\.self_attn\.q_proj': 64"):
        inject(tiny_llama(), TrainableTokens(token_indices=[1], target_modules=["embed_tokens", "layers.0.self_attn.q_proj"]))  # fmt: skip
    with checks.raises(TypeError, "unsupported type"):
        inject(tiny_llama(), TrainableTokens(token_indices=[1], target_modules=["input_layernorm"]))
    with checks.raises(ValueError, "expects 100 embedding rows"):
        inject(tiny_llama(), TrainableTokens(token_indices=[1], num_embeddings=100))
    with checks.raises(ValueError, "lm_head is in modules_to_save but shares its weight"):
        inject(tiny_llama_tied(), TrainableTokens(token_indices=[1], modules_to_save=["lm_head"]))
    # A tied head already wrapped by another adapter could not follow the rows.
    model = inject(tiny_llama_tied(), LoRA(target_modules=["lm_head"]), "lora")
    with checks.raises(ValueError, r"lm_head shares its weight with a target but is already wrapped"):
        inject(model, TrainableTokens(token_indices=[1]))
    assert [type(m).__name__ for _, m in checks.adapter_layers(model)] == ["LoraLinear"]


def test_a_config_without_token_indices_is_refused(tmp_path: Path) -> None:
    save_adapter(inject(tiny_llama(), TrainableTokens(token_indices=[3])), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["token_indices"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with checks.raises(ValueError, "has no 'token_indices'"):
        load_adapter(tiny_llama(), tmp_path)


# --- parity with Hugging Face peft ----------------------------------------------------------------------------
PARITY: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama_untied": (tiny_llama, {}),
    "llama_tied": (tiny_llama_tied, {}),
    "llama_untied_head": (tiny_llama, {"target_modules": ["embed_tokens", "lm_head"]}),
    "gpt2_tied": (tiny_gpt2, {}),
    "gemma_scaled_tied": (tiny_gemma, {}),
}


@pytest.mark.parametrize("case", list(PARITY), ids=list(PARITY))
def test_directories_load_both_ways_with_peft(case: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    build, kwargs = PARITY[case]
    ours = inject(build(), TrainableTokens(token_indices=TOKENS, **kwargs))
    checks.randomise(ours)
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = checks.logits(ours)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
        # No unknown config key, no tying complaint: the directory reads as one peft wrote.
        assert [str(w.message) for w in caught if "/peft/" in w.filename] == []
        assert _max_diff(checks.logits(theirs), expected) < 1e-5  # measured: <= 4e-6 (head logits recomputed)
        theirs.merge_adapter()
        merge(ours)
        assert _max_diff(checks.logits(theirs), checks.logits(ours)) == 0.0  # the same merged weight
    assert torch.equal(theirs.get_input_embeddings().weight, ours.get_input_embeddings().weight)

    reference = peft.get_peft_model(build(), peft.TrainableTokensConfig(token_indices=TOKENS, **kwargs))
    checks.randomise(reference)
    reference.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(build(), tmp_path / "theirs")
    with torch.no_grad():
        assert _max_diff(checks.logits(loaded), checks.logits(reference)) < 1e-5
    assert set(load_file(tmp_path / "theirs" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    )  # the same keys and, below, the same tensors
    for key, value in adapter_state_dict(loaded).items():
        assert torch.equal(value, peft.get_peft_model_state_dict(reference)[_peft_key(key)]), key


def _peft_key(key: str) -> str:
    return "base_model.model." + key.replace(".default", "")


def test_resized_vocabulary_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ids = checks.token_batch()
    ids[0, :2] = torch.tensor([128, 129])
    ours = inject(_resized(seed=1), TrainableTokens(token_indices=[128, 129]))
    checks.randomise(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_resized(seed=2), tmp_path)
    with torch.no_grad():
        assert _max_diff(theirs(input_ids=ids).logits, ours(input_ids=ids).logits) < 1e-5


def test_half_precision_base_gets_fp32_rows_and_finite_outputs() -> None:
    model = inject(tiny_llama_tied().to(torch.bfloat16), TrainableTokens(token_indices=TOKENS))
    rows = model.get_input_embeddings().trainable_tokens_delta["default"]
    assert rows.dtype == torch.float32  # as peft's autocast_adapter_dtype
    assert torch.equal(rows, model.get_input_embeddings().weight[TOKENS].float())
    out = checks.logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad[0].abs().sum() > 0


# --- helpers for LoRA's trainable_token_indices (peft's LoRA file layout) ------------------------------------------
@pytest.mark.parametrize("option", [[3, 7], {"embed_tokens": [3, 7]}], ids=["list", "dict"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_llama_tied], ids=["untied", "tied"])
def test_lora_layout_matches_peft_lora_files(
    build: Callable[[], nn.Module], option: Any, tmp_path: Path
) -> None:
    from lightning_peft.core.adapter_layer import to_peft_key
    from lightning_peft.methods.trainable_tokens import (
        from_lora_layout,
        methods_for_lora_option,
        to_lora_layout,
    )

    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(
        build(), peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=option)
    )
    checks.randomise(reference)
    reference.save_pretrained(tmp_path)
    theirs = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "lora_" not in k}
    (method,) = methods_for_lora_option(option)
    ours = inject(build(), method)
    tensors = {to_peft_key(k, "default"): v for k, v in adapter_state_dict(ours).items()}
    assert {k: v.shape for k, v in to_lora_layout(ours, "default", tensors).items()} == {
        k: v.shape for k, v in theirs.items()
    }
    loaded = from_lora_layout(ours, "default", theirs)
    assert set(loaded) == set(tensors)  # the tied head's key too
    ours.load_state_dict({k.removeprefix("base_model.model.").replace("_delta", "_delta.default"): v
                          for k, v in loaded.items()}, strict=False)  # fmt: skip
    with torch.no_grad():  # LoRA's B zeroed: peft's model is then the base with the token rows alone
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.zero_()
        assert _max_diff(checks.logits(ours), checks.logits(reference)) < 1e-5
    rows = ours.get_input_embeddings().trainable_tokens_delta["default"]
    assert torch.equal(rows, next(iter(theirs.values())))


# --- LoRA's trainable_token_indices: token rows beside a LoRA adapter, in peft's LoRA files -----------------------
@pytest.mark.parametrize(
    ("build", "option"),
    [(tiny_llama, [3, 5, 9]), (tiny_llama_tied, [3, 5, 9]), (tiny_llama, {"embed_tokens": [4, 7]})],
    ids=["untied_list", "tied_list", "dict"],
)
def test_lora_with_trainable_token_indices_trains_the_rows_and_loads_both_ways_with_peft(
    build, option, tmp_path
):
    peft = pytest.importorskip("peft")
    from lightning_peft import load_adapter, save_adapter
    from lightning_peft.core.injection import adapter_state_keys

    method = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=option)
    ours = inject(build(), method)
    rows = option if isinstance(option, list) else option["embed_tokens"]
    trainable = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable["model.embed_tokens.trainable_tokens_delta.default"] == (len(rows), 64)
    assert all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    base_rows = build().model.embed_tokens.weight.detach()
    checks.randomise(ours, scale=0.3)
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == option
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    token_keys = [k for k in saved if "trainable_tokens_delta" in k]
    assert token_keys == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = checks.logits(ours)
        torch.testing.assert_close(checks.logits(theirs), expected, atol=1e-5, rtol=0)
    # peft's own directory (its own random rows) loads here with peft's outputs
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=option
    )
    reference = peft.get_peft_model(build(), config)
    checks.randomise(reference, seed=7, scale=0.3)
    reference.eval().save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(build(), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(loaded), checks.logits(reference), atol=1e-5, rtol=0)
    assert {k for k in adapter_state_keys(loaded) if "trainable_tokens" in k} >= {
        "model.embed_tokens.trainable_tokens_delta.default"
    }
    # merging folds LoRA and the rows into the base weights; the other rows stay the base's
    merged_out = checks.logits(ours)
    from lightning_peft import merge

    merge(ours)
    torch.testing.assert_close(checks.logits(ours), merged_out, atol=1e-5, rtol=0)
    other = [i for i in range(base_rows.shape[0]) if i not in rows]
    weight = ours.model.embed_tokens.base_layer.weight
    assert torch.equal(weight[other], base_rows[other]) and not torch.equal(weight[rows], base_rows[rows])
