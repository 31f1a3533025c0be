"""Hot-swapping LoRA adapters (as peft's ``hotswap_adapter``): weights copied into the live parameters, so a
``torch.compile``'d model runs the next adapter without recompiling; refusals leave the model as it was."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lightning_peft import (
    adapter_state_dict,
    hotswap_adapter,
    inject,
    load_adapter,
    merge,
    prepare_model_for_compiled_hotswap,
    save_adapter,
)
from lightning_peft.methods import IA3, LoRA
from tests.tiny_models import MLPConv, tiny_llama, token_batch

IDS = token_batch(2, 8)


def small_llama():
    return tiny_llama(num_hidden_layers=1)


def saved(tmp_path: Path, name: str, seed: int, **lora) -> Path:
    """An adapter with random (non-zero) A and B on a fresh tiny Llama, written to ``tmp_path/name``."""
    model = small_llama()
    torch.manual_seed(seed)
    inject(model, LoRA(init_lora_weights=False, **{"target_modules": ["q_proj", "v_proj"], **lora}))
    return save_adapter(model, tmp_path / name)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def loaded(directory: Path):
    return load_adapter(small_llama(), directory)


@pytest.fixture
def adapters(tmp_path):
    """Three adapters on q_proj, v_proj: rank 4 (alpha 8), rank 2 (alpha 6, rsLoRA) and rank 8 with a per-module
    rank and alpha."""
    return {
        "r4": saved(tmp_path, "r4", 1, r=4, alpha=8),
        "r2": saved(tmp_path, "r2", 2, r=2, alpha=6, use_rslora=True),
        "r8": saved(
            tmp_path, "r8", 3, r=8, alpha=4, rank_pattern={"v_proj": 3}, alpha_pattern={"v_proj": 12}
        ),
    }


def test_a_compiled_model_runs_swapped_adapters_without_recompiling(adapters) -> None:
    model = loaded(adapters["r4"])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert (logits(model) - logits(loaded(adapters["r4"]))).abs().max() <= 1e-6  # padding adds zeros
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    first = logits(compiled)
    frames, ok = backend.frame_count, counters["frames"]["ok"]
    assert frames == 1
    for name in ("r2", "r8", "r4"):
        hotswap_adapter(compiled, adapters[name])
        out = logits(compiled)
        assert (backend.frame_count, counters["frames"]["ok"]) == (frames, ok), f"recompiled for {name}"
        diff = (out - logits(loaded(adapters[name]))).abs().max().item()
        assert diff <= 1e-6, (name, diff)  # measured up to 2.4e-7 (the fresh model runs the fused kernel)
    assert (out - first).abs().max() <= 1e-6  # back to the first adapter


def test_without_preparation_a_smaller_rank_swaps_in_eagerly(adapters) -> None:
    model = loaded(adapters["r4"])
    hotswap_adapter(model, adapters["r2"])
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 4  # the live shape, its last 2 ranks zero
    assert (logits(model) - logits(loaded(adapters["r2"]))).abs().max() <= 1e-6


def test_saving_after_a_swap_writes_an_adapter_with_the_same_outputs(adapters, tmp_path) -> None:
    """The padded adapter is saved as rank 8 with an alpha per module that keeps each module's scale: it loads in
    ours and in peft with the outputs of the swapped-in adapter."""
    model = loaded(adapters["r4"])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, adapters["r8"])
    expected = logits(loaded(adapters["r8"]))
    directory = save_adapter(model, tmp_path / "resaved")
    assert (logits(loaded(directory)) - expected).abs().max() <= 1e-6
    theirs = peft.PeftModel.from_pretrained(small_llama(), directory)
    assert (logits(theirs) - expected).abs().max() <= 1e-5


def test_a_peft_adapter_swaps_in_and_peft_swaps_ours_in(adapters, tmp_path) -> None:
    """Both ways: peft's directory hot-swapped here equals peft's model of it; our directory hot-swapped by peft's
    hotswap_adapter equals our swap."""
    base = small_llama()
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "theirs")
    theirs = peft.PeftModel.from_pretrained(small_llama(), tmp_path / "theirs")
    ours = loaded(adapters["r4"])
    ours_before = logits(ours)
    hotswap_adapter(ours, tmp_path / "theirs")
    diff = (logits(ours) - logits(theirs)).abs().max().item()
    assert diff <= 1e-5, diff  # measured 2.4e-7
    peft_hotswap_adapter(theirs, str(adapters["r4"]), adapter_name="default", torch_device="cpu")
    diff = (logits(theirs) - ours_before).abs().max().item()
    assert diff <= 1e-5, diff


def _snapshot(model):
    layer = model.model.layers[0].self_attn.q_proj
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    return state, float(layer.scaling["default"]), layer.lora_A["default"].weight


def _unchanged(model, snapshot) -> bool:
    state, scaling, A = snapshot
    layer = model.model.layers[0].self_attn.q_proj
    now = adapter_state_dict(model)
    return (
        now.keys() == state.keys()
        and all(torch.equal(now[k], v) for k, v in state.items())
        and float(layer.scaling["default"]) == scaling
        and layer.lora_A["default"].weight is A
    )


def test_refused_swaps_change_nothing(adapters, tmp_path) -> None:
    model = loaded(adapters["r4"])
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    before = _snapshot(model)
    cases = {
        "other modules": (
            saved(tmp_path, "qk", 4, r=4, target_modules=["q_proj", "k_proj"]),
            "targets other modules",
        ),
        "rank above": (adapters["r8"], r"target_rank=<the largest rank>"),
        "dropout": (saved(tmp_path, "drop", 4, r=4, dropout=0.1), r"dropout \(0.1 vs 0.0\)"),
        "DoRA": (saved(tmp_path, "dora", 4, r=4, use_dora=True), "use_dora"),
    }
    for case, (directory, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            hotswap_adapter(model, directory)
        assert _unchanged(model, before), case
    ia3 = small_llama()
    inject(ia3, IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="supports LoRA adapters only"):
        hotswap_adapter(ia3, adapters["r4"])


def test_refused_preparations_change_nothing(adapters) -> None:
    model = loaded(adapters["r8"])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"target_rank=4 is below the rank .*q_proj \(r=8\)"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match=r"before torch\.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"), target_rank=8)
    assert _unchanged(model, before)
    assert not torch.is_tensor(model.model.layers[0].self_attn.q_proj.scaling["default"])
    merge(model)
    with pytest.raises(ValueError, match="is merged into"):
        hotswap_adapter(model, adapters["r4"])


def test_convolution_and_embedding_adapters_pad_and_swap(tmp_path) -> None:
    """Conv1d/Conv2d (A's out channels, B's in channels), Embedding (A's rows, B's columns) and Linear adapters:
    padding keeps the outputs, and a swap equals a fresh load of the new adapter; compiled, without a recompile."""
    targets = ["conv2d", "conv1d", "pointwise", "embed", "fc1"]
    inputs = MLPConv.example_inputs()

    def trained(name: str, seed: int, r: int) -> Path:
        model = MLPConv()
        torch.manual_seed(seed)
        inject(model, LoRA(r=r, alpha=2 * r + 1, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # Embedding's B starts random but A at zero: make both non-zero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        return save_adapter(model, tmp_path / name)

    small, large = trained("r2", 1, 2), trained("r6", 2, 6)

    def outputs(model):
        with torch.no_grad():
            return model(*inputs)

    model = load_adapter(MLPConv(), small)
    before = outputs(model)
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    assert (
        model.embed.lora_embedding_A["default"].shape == (6, 10)
        and model.conv2d.lora_B["default"].in_channels == 6
    )
    assert (outputs(model) - before).abs().max() <= 1e-6
    backend = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    outputs(compiled)
    for directory in (large, small):
        hotswap_adapter(compiled, directory)
        diff = (outputs(compiled) - outputs(load_adapter(MLPConv(), directory))).abs().max().item()
        assert diff <= 1e-6, (directory.name, diff)
    assert backend.frame_count == 1
