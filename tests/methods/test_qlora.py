"""QLoRA: a really 4-bit base, LoRA-only training, peft-loadable adapters, merge/export, checkpoints and resume.

Everything runs on CPU (bitsandbytes 0.50 quantizes and runs 4-bit and 8-bit layers there); tests that need
CUDA are marked ``cuda`` and skipped without it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import nn

from lightning_peft import (
    PEFTCallback,
    count_parameters,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unload,
)
from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.contract import method_for_peft_type
from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.core.quantization import (
    dequantize,
    export_merged,
    is_quantized_linear,
    prepare_model_for_kbit_training,
    quantize,
    weight_storage_bytes,
)
from lightning_peft.methods import LoRA, NotMergeableError, QLoRA
from lightning_peft.methods.lora.qlora import LoraBnbLinear
from lightning_peft.testing.checks import randomise
from tests.test_callback import CausalLM, make_trainer, token_loader
from tests.tiny_models import MLPConv, tiny_llama, token_batch

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(
    logging.ERROR
)  # "install `kernels` for a faster CPU gemm" on import

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def trained_qlora(steps: int = 3, **kwargs) -> nn.Module:
    """A tiny Llama with QLoRA (r=4, every block Linear) after a few AdamW steps: a non-zero adapter."""
    model = inject(tiny_llama().train(), QLoRA(r=4, alpha=8, **kwargs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


# --- the base is really 4-bit --------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_block_linears_are_4bit_and_nothing_else_is(quant_type: str) -> None:
    original = tiny_llama()
    shapes = {n: m.weight.shape for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    model = inject(tiny_llama(), QLoRA(r=4, quant_type=quant_type))

    quantized = quantized_layers(model)
    assert {n.removesuffix(".base_layer") for n in quantized} == {
        f"model.layers.{i}.{part}.{p}"
        for i in range(2)
        for part, projs in (("self_attn", BLOCK_LINEARS[:4]), ("mlp", BLOCK_LINEARS[4:]))
        for p in projs
    }
    for name, layer in quantized.items():
        weight, state = layer.weight, layer.weight.quant_state
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8, name
        assert state.shape == shapes[name.removesuffix(".base_layer")]  # the logical (out, in) shape
        assert weight.numel() == state.shape.numel() // 2  # two 4-bit codes per byte
        assert (state.quant_type, state.blocksize, state.nested) == (quant_type, 64, True)
        assert not weight.requires_grad
        # codes 0.5 B + one 8-bit scale per 64 weights + one fp32 scale per 256 scales: 0.5159 B/weight
        assert weight_storage_bytes(layer, include_tables=False) / state.shape.numel() <= 0.52
    # Embeddings, norms and the head stay in full precision; the adapters are float32 torch Linears.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    adapters = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert len(adapters) == 28 and all(
        type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in adapters
    )


def test_nf4_is_closer_than_fp4_to_the_full_precision_model() -> None:
    expected = logits(tiny_llama())
    errors = {q: rel_err(logits(inject(tiny_llama(), QLoRA(quant_type=q))), expected) for q in ("nf4", "fp4")}
    # Measured: nf4 0.09, fp4 0.11 (normally distributed weights suit NF4's quantiles).
    assert 0 < errors["nf4"] < errors["fp4"] < 0.2


def test_count_parameters_counts_4bit_weights_by_their_values() -> None:
    full = sum(p.numel() for p in tiny_llama().parameters())
    model = inject(tiny_llama(), QLoRA(r=4))
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count_parameters(model) == {
        "trainable": adapters,
        "total": full + adapters,  # not the packed uint8 count (half as many)
        "trainable_percent": pytest.approx(100 * adapters / (full + adapters)),
    }


def test_double_quant_off_stores_fp32_scales() -> None:
    model = inject(tiny_llama(), QLoRA(r=4, double_quant=False))
    layer = model.model.layers[0].mlp.up_proj.base_layer
    assert layer.weight.quant_state.absmax.dtype == torch.float32
    assert weight_storage_bytes(layer) / layer.weight.quant_state.shape.numel() == 0.5 + 4 / 64 + 16 * 4 / (
        64 * 128
    )


# --- training --------------------------------------------------------------------------------------------------
def test_init_is_a_no_op_on_the_quantized_base_and_eval_matches_train() -> None:
    model = inject(tiny_llama(), QLoRA(r=4))
    with disable_adapters(model):
        base = logits(model)
    assert torch.equal(logits(model), base)
    # bitsandbytes would repack the codes for its CPU kernel at the first no-grad eval forward (bf16 scales);
    # QLoRA keeps the standard layout, so evaluation computes exactly what training computes.
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in quantized_layers(model).values()
    )
    model.train()
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)


def test_only_lora_parameters_train_and_the_loss_decreases() -> None:
    model = inject(tiny_llama().train(), QLoRA(r=4, alpha=8))
    keys = set(adapter_state_keys(model))
    assert keys and all(".lora_" in k for k in keys)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == keys  # packed codes, scales and every float base tensor bit-identical
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    assert hf.set_activation_checkpointing(model, True, use_reentrant=use_reentrant)


def _grads(checkpointing: str) -> tuple[dict[str, torch.Tensor], int]:
    model = tiny_llama().train()
    if checkpointing == "reentrant_after_inject":
        inject(model, QLoRA(r=4, init_lora_weights=False))
        _enable_checkpointing(model, use_reentrant=True)
    elif checkpointing == "qlora_option":
        inject(model, QLoRA(r=4, init_lora_weights=False, gradient_checkpointing=True))
    else:
        if checkpointing != "none":
            _enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        inject(model, QLoRA(r=4, init_lora_weights=False))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize(
    "checkpointing", ["reentrant", "non_reentrant", "reentrant_after_inject", "qlora_option"]
)
def test_gradient_checkpointing_gives_the_adapters_the_same_grads(checkpointing: str) -> None:
    expected, calls = _grads("none")
    assert calls == 1 and len(expected) == 28 and all("lora_" in n for n in expected)
    grads, calls = _grads(checkpointing)
    assert calls == 2  # the block ran again in backward: checkpointing is on
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5)


def test_prepare_upcasts_half_precision_norms_embeddings_and_head() -> None:
    model = inject(tiny_llama().to(torch.bfloat16), QLoRA(r=4, compute_dtype="bfloat16"))
    floats = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.uint8}
    assert set(floats.values()) == {torch.float32}
    assert "model.norm.weight" in floats and "lm_head.weight" in floats
    assert model.model.layers[0].mlp.up_proj.base_layer.compute_dtype == torch.bfloat16
    out = model(input_ids=token_batch()).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --- bases quantized elsewhere ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", [LoRA, QLoRA])
def test_lora_goes_on_a_base_quantized_by_transformers(saved_llama: Path, bits: int, method: type) -> None:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = LlamaForCausalLM.from_pretrained(saved_llama, quantization_config=config, device_map="cpu")
    before = quantized_layers(model)
    if method is LoRA:  # what QLoRA does itself; peft's workflow too
        prepare_model_for_kbit_training(model)
    inject(model, method(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraBnbLinear)}
    assert len(layers) == 4
    assert {id(m) for m in quantized_layers(model).values()} == {
        id(m) for m in before.values()
    }  # not re-quantized
    with disable_adapters(model):
        base = logits(model)
    assert torch.equal(logits(model), base)  # DoRA's magnitude starts at the dequantized weight's norms
    model.train()
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_state_keys(model))  # A, B and DoRA's magnitude of the 4 layers
    assert len(with_grad) == 12


def test_lightning_bitsandbytes_layers_get_float_adapters() -> None:
    from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.float32)
    # configure_model runs inside this context, so PEFTCallback injects while nn.Linear is a 4-bit class.
    with plugin.module_init_context():
        model = tiny_llama()
        inject(model, QLoRA(r=4))
    plugin.convert_module(model)  # strategy.setup: converts nothing once bitsandbytes layers exist
    adapters = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert len(adapters) == 28 and all(type(m) is nn.Linear for m in adapters)
    assert all(
        p.requires_grad and p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n
    )


# --- saving and loading -------------------------------------------------------------------------------------------
def test_adapter_directory_is_plain_lora_without_quantized_tensors(tmp_path: Path) -> None:
    model = trained_qlora()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 28 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    # QLoRA did not take over LoRA's peft_type (test doubles subclassing LoRA elsewhere may, hence no `is LoRA`).
    assert not issubclass(method_for_peft_type("LORA"), QLoRA)

    # Reloaded onto the same 4-bit base (quantization is deterministic): the same model.
    reloaded = load_adapter(quantize_like_qlora(tiny_llama()), tmp_path)
    assert all(isinstance(m, LoraBnbLinear) for n, m in reloaded.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-6, rtol=0)


def quantize_like_qlora(model: nn.Module) -> nn.Module:
    quantize(model)
    return model


def test_peft_loads_the_adapter_on_a_full_precision_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = trained_qlora()
    save_adapter(model, tmp_path)
    # The dequantized base holds the very weights the 4-bit layers compute with, so the outputs match up to
    # float rounding (atol 1e-5 on logits of magnitude ~1). On the original full-precision base they differ by the
    # quantization error (relative error ~0.09 on this random tiny model).
    dequantized_base = dequantize(quantize_like_qlora(tiny_llama()))
    theirs = peft.PeftModel.from_pretrained(dequantized_base, tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)
    full_precision = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert 0.01 < rel_err(logits(full_precision), logits(model)) < 0.2


# --- merge and export ---------------------------------------------------------------------------------------------
def test_merge_on_the_4bit_base_is_refused_and_changes_nothing() -> None:
    model = trained_qlora()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model)
    for action in (merge, merge_and_unload, lambda m: unload(m, merge_adapters=True)):
        with pytest.raises(NotMergeableError, match=r"quantized Linear4bit.*export_merged"):
            action(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), out)


def test_dequantize_then_merge_is_exact() -> None:
    model = trained_qlora(use_dora=True)
    out = logits(model)
    dequantize(model)
    assert quantized_layers(model) == {}
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=0)
    merge(model)
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=0)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraBnbLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), out, atol=1e-5, rtol=0)


def test_export_merged_writes_a_full_precision_model(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = trained_qlora()
    out = logits(model)
    exported = export_merged(model, tmp_path)
    assert len(quantized_layers(model)) == 14 and isinstance(
        model.model.layers[0].self_attn.q_proj, LoraBnbLinear
    )
    assert {type(m) for n, m in exported.named_modules() if n.endswith(BLOCK_LINEARS)} == {nn.Linear}
    assert not any("lora_" in k for k in exported.state_dict())
    torch.testing.assert_close(logits(exported), out, atol=1e-5, rtol=0)

    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(reloaded), out, atol=1e-5, rtol=0)
    assert export_merged(model, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


# --- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "int4"}, "quant_type='int4' must be 'nf4' or 'fp4'"),
        ({"compute_dtype": "float64"}, "compute_dtype='float64' must be one of"),
        ({"init_lora_weights": "pissa"}, "PiSSA cannot rewrite a 4-bit base"),
        ({"r": 0}, "rank must be an integer >= 1"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QLoRA(**kwargs)


def test_bad_selections_leave_the_model_unquantized() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="q_prj"):
        inject(model, QLoRA(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="q_prj"):
        inject(model, QLoRA(quantize_modules=["q_prj"]))
    assert quantized_layers(model) == {}
    with pytest.raises(ValueError, match=r"no nn\.Linear inside repeated blocks"):
        inject(MLPConv(), QLoRA(target_modules=["fc1"]))
    model = inject(MLPConv(), QLoRA(target_modules=["fc1"], quantize_modules=["fc1"]))
    assert set(quantized_layers(model)) == {"fc1.base_layer"}


def test_qlora_beside_a_lora_adapter_quantizes_neither_adapters_nor_wrapped_bases() -> None:
    model = inject(tiny_llama(), LoRA(r=2, target_modules=["q_proj"]))
    inject(model, QLoRA(r=4), adapter_name="qlora")
    quantized = set(quantized_layers(model))
    assert len(quantized) == 12 and not any(".lora_" in n or "q_proj" in n for n in quantized)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert set(q_proj.lora_A) == {"default", "qlora"} and type(q_proj.base_layer) is nn.Linear


def test_paged_adamw_refuses_cpu_parameters() -> None:
    from lightning_peft.app.optim import PagedAdamW

    with pytest.raises(RuntimeError, match=r"needs parameters on a CUDA device; got parameters on \['cpu'\]"):
        PagedAdamW(nn.Linear(4, 4).parameters(), lr=1e-3, optim_bits=8)


# --- with the Trainer -------------------------------------------------------------------------------------------
def _fit(
    tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, dirpath: Path | None = None
) -> CausalLM:
    module = CausalLM(scheduler=True)
    callbacks = [PEFTCallback(QLoRA(r=4, alpha=8), target="model")]
    if dirpath is not None:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0))
    make_trainer(tmp_path, callbacks, max_epochs=max_epochs).fit(
        module, token_loader(batches=2), ckpt_path=ckpt_path
    )
    return module


def test_trainer_checkpoint_holds_only_adapters_and_resumes_exactly(tmp_path: Path) -> None:
    uninterrupted = _fit(tmp_path, max_epochs=3)
    first = _fit(tmp_path, max_epochs=2, dirpath=tmp_path / "ckpt")
    resumed = _fit(tmp_path, max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert len(saved["state_dict"]) == 28
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in saved["state_dict"])
    assert {v.dtype for v in saved["state_dict"].values()} == {torch.float32}  # no packed codes, no scales
    assert saved["lightning_peft"]["method"]["class_path"] == "lightning_peft.methods.QLoRA"
    assert len(saved["optimizer_states"][0]["state"]) == 28

    assert len(uninterrupted.losses) == 6 and uninterrupted.losses[-1] < uninterrupted.losses[0]
    assert first.losses + resumed.losses == uninterrupted.losses  # bit-identical trajectory
    assert isinstance(resumed.model.model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


# --- CUDA only ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_cuda_qlora_trains_with_bf16_compute_and_paged_adamw() -> None:
    from lightning_peft.app.optim import PagedAdamW

    model = inject(tiny_llama().cuda().train(), QLoRA(r=4, compute_dtype="bfloat16"))
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "cuda"
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, optim_bits=8)
    ids = token_batch().cuda()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


@pytest.mark.cuda
@cuda
def test_cuda_bitsandbytes_precision_quantizes_the_base_and_not_the_adapters(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import BitsandbytesPrecision

    class Module(CausalLM):
        def __init__(self) -> None:
            super().__init__(build_in="configure_model")

    module = Module()
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
    trainer = make_trainer(
        tmp_path, [callback], max_steps=4, accelerator="cuda",
        plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16),
    )  # fmt: skip
    trainer.fit(module, token_loader())
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraBnbLinear) and layer.base_layer.weight.dtype == torch.uint8
    assert type(layer.lora_A["default"]) is nn.Linear and layer.lora_A["default"].weight.requires_grad
    assert module.losses[-1] < module.losses[0]


def test_modules_the_model_keeps_in_fp32_stay_full_precision_and_every_adapter_trains() -> None:
    """T5 keeps its feed-forward output `wo` in fp32 (`_keep_in_fp32_modules`): QLoRA does not quantize it."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    model = inject(T5ForConditionalGeneration(config), QLoRA(r=4))
    wo = [n for n, m in model.named_modules() if n.endswith(".wo")]
    assert len(wo) == 4 and all(
        type(model.get_submodule(n).base_layer) is nn.Linear for n in wo
    )  # 2 encoder + 2 decoder
    quantized = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    assert quantized and not any(".wo" in n for n in quantized)
    randomise(model)  # lora_B leaves zero, so every adapter tensor has a gradient path
    ids = token_batch(length=8)
    model(input_ids=ids, labels=ids).loss.backward()
    silent = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert silent == []
    assert sum(p.requires_grad for p in model.parameters()) > 40


def test_a_layer_of_one_quantization_block_stays_in_full_precision() -> None:
    """Qwen2-MoE's shared_expert_gate (hidden -> 1): 4 bits plus a block scale would save nothing there."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, decoder_sparse_step=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    inject(model, QLoRA(r=4, target_modules=["q_proj", "v_proj"]))
    quantized = {n.removesuffix(".base_layer") for n in quantized_layers(model)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n}
    gates = {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
    assert gates <= linears and not gates & quantized
    assert all(model.get_submodule(g).weight.dtype == torch.float32 for g in gates)
    assert {n for n in quantized if "shared_expert." in n} == {
        f"model.layers.{i}.mlp.shared_expert.{p}"
        for i in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
