"""QLoRA under FSDP: 4-bit codes stored as float32 (``quant_storage``) shard with the float weights.

One 2-process CPU (gloo) script for the training cases; the quant_storage numerics and the refusals run here in one
process, without a process group.
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lightning_peft import PEFTCallback, inject
from lightning_peft.core.quantization import is_quantized_linear, quantize, weight_storage_bytes
from lightning_peft.integrations.distributed import (
    PEFTModelParallelStrategy,
    refuse_mixed_storage,
    refuse_unshardable_quantization,
)
from lightning_peft.methods import LoRA, QLoRA
from tests.distributed.process_group import run_script
from tests.distributed.strategy_resume import CPUFSDPStrategy
from tests.test_callback import CausalLM
from tests.tiny_models import tiny_llama

SCRIPT = Path(__file__).parent / "distributed" / "qlora_fsdp.py"
TARGETS = ["q_proj", "v_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _codes(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if is_quantized_linear(m)]


def test_float32_storage_holds_the_same_bytes_and_gives_bit_equal_outputs():
    models = {}
    for storage in ("uint8", "float32"):
        torch.manual_seed(0)
        models[storage] = tiny_llama()
        inject(
            models[storage],
            QLoRA(r=4, target_modules=TARGETS, quant_storage=storage, init_lora_weights="gaussian"),
        )
    u8, f32 = _codes(models["uint8"]), _codes(models["float32"])
    assert len(u8) == len(f32) == 14  # 7 Linears in each of the 2 blocks
    for a, b in zip(u8, f32, strict=True):
        assert a.dtype == torch.uint8 and b.dtype == torch.float32
        assert a.numel() == 4 * b.numel()  # 4 packed bytes per float32 element
        assert torch.equal(a.data.view(-1), b.data.view(torch.uint8).view(-1))  # the very same bytes
    layers = [[m for m in models[s].modules() if is_quantized_linear(m)] for s in ("uint8", "float32")]
    assert [weight_storage_bytes(m) for m in layers[0]] == [weight_storage_bytes(m) for m in layers[1]]
    ids = _ids()
    out = {s: models[s](input_ids=ids).logits for s in models}
    assert torch.equal(out["uint8"], out["float32"])  # max |diff| 0.0
    out["float32"].square().mean().backward()
    grads = {n: p.grad for n, p in models["float32"].named_parameters() if "lora_" in n}
    assert len(grads) == 8 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B = 0 at init: A's grads are 0


def test_quant_storage_takes_torch_dtypes_and_loftq_keeps_it():
    assert QLoRA(quant_storage=torch.bfloat16).quant_storage == "bfloat16"
    torch.manual_seed(0)
    model = tiny_llama()
    inject(model, QLoRA(r=4, target_modules=TARGETS, quant_storage="float32", init_lora_weights="loftq"))
    assert {w.dtype for w in _codes(model)} == {torch.float32}


def test_bad_or_mismatched_quant_storage_is_refused_before_quantizing():
    with pytest.raises(ValueError, match=r"quant_storage='int4' must be one of \['uint8', 'float32'"):
        QLoRA(quant_storage="int4")
    torch.manual_seed(0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"quant_storage='bfloat16'.*\['float32'\].*quant_storage='float32'"):
        inject(model, QLoRA(r=4, target_modules=TARGETS, quant_storage="bfloat16"))
    assert not any(is_quantized_linear(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A bf16 model kept in bf16 (no upcast) stores its codes as bf16.
    half = tiny_llama().to(torch.bfloat16)
    inject(
        half, QLoRA(r=4, target_modules=TARGETS, quant_storage="bfloat16", prepare_for_kbit_training=False)
    )
    assert {w.dtype for w in _codes(half)} == {torch.bfloat16}


def _fsdp() -> CPUFSDPStrategy:
    return CPUFSDPStrategy(process_group_backend="gloo")


def test_uint8_storage_under_fsdp_is_refused_at_setup_and_allowed_under_fsdp2():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=_fsdp(), logger=False)
    module = CausalLM()
    callback = PEFTCallback(QLoRA(r=4, target_modules=TARGETS), target="model")
    with pytest.raises(
        ValueError, match=r"QLoRA\(quant_storage='uint8'\) under CPUFSDPStrategy.*quant_storage='float32'"
    ):
        callback.setup(trainer, module, "fit")
    assert "configure_model" not in module.__dict__  # refused before any hook was wrapped
    refuse_unshardable_quantization(_fsdp(), QLoRA(quant_storage="float32"))  # shardable: no error
    refuse_unshardable_quantization(_fsdp(), LoRA())  # no quantization: nothing to check
    refuse_unshardable_quantization("ddp", QLoRA())
    fsdp2 = PEFTModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    refuse_unshardable_quantization(
        fsdp2, QLoRA()
    )  # FSDP2 shards parameter by parameter (trained in the script)


def test_a_model_already_quantized_in_uint8_is_refused_under_fsdp_before_injection():
    torch.manual_seed(0)
    model = tiny_llama()
    quantize(model)  # as transformers' BitsAndBytesConfig loads it: uint8 storage
    with pytest.raises(
        ValueError, match=r"14 quantized weights .* stored as torch.uint8.*bnb_4bit_quant_storage"
    ):
        refuse_mixed_storage(_fsdp(), model)
    refuse_mixed_storage("ddp", model)  # DDP keeps whole replicas: any storage works
    shardable = tiny_llama()
    quantize(shardable, quant_storage=torch.float32)
    refuse_mixed_storage(_fsdp(), shardable)
    refuse_mixed_storage(PEFTModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), model)


@pytest.mark.distributed
@pytest.mark.slow
def test_qlora_under_fsdp_shards_the_codes_matches_ddp_and_resumes_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    done = run_script([sys.executable, str(SCRIPT), str(tmp_path)], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {
        (rank, name): torch.load(tmp_path / f"rank{rank}_{name}.pt", weights_only=True)
        for rank in (0, 1) for name in ("ddp", "fsdp", "first", "resumed", "fsdp2")
    }  # fmt: skip
    keys = set(runs[0, "fsdp"]["state"])
    assert len(keys) == 8  # lora_A, lora_B of q_proj, v_proj in 2 layers
    for rank in (0, 1):
        fsdp, ddp = runs[rank, "fsdp"], runs[rank, "ddp"]
        assert len(fsdp["losses"]) == 4
        # FSDP equals DDP on the same QLoRA model: losses and adapters within 1e-6 (measured: max |diff| 0.0)
        assert max(abs(a - b) for a, b in zip(fsdp["losses"], ddp["losses"], strict=True)) <= 1e-6
        for key in keys:
            assert (fsdp["state"][key] - ddp["state"][key]).abs().max().item() <= 1e-6, key
            assert torch.equal(fsdp["state"][key], runs[0, "fsdp"]["state"][key]), (
                key
            )  # identical on both ranks
            assert torch.equal(runs[rank, "resumed"]["state"][key], fsdp["state"][key]), key  # exact resume
        assert runs[rank, "first"]["losses"] + runs[rank, "resumed"]["losses"] == fsdp["losses"]
    assert runs[0, "fsdp"]["losses"] != runs[1, "fsdp"]["losses"]  # each rank trained on its own shard
    # The codes are really sharded: every packed element lives in a frozen flat parameter, each rank holds about
    # half (tiny Llama: 9216 float32 elements = 36864 bytes; measured 4736 + 4480, FSDP pads to whole units).
    packed = [runs[rank, "fsdp"]["packed"] for rank in (0, 1)]
    assert packed[0]["frozen"] == packed[0]["total"] == 9216
    assert packed[0]["local"] + packed[1]["local"] == packed[0]["total"]
    assert all(0.4 < p["local"] / p["total"] < 0.6 for p in packed)
    # FSDP2 (fully_shard, uint8 storage): same losses and adapters as DDP, every code tensor a DTensor, halves.
    for rank in (0, 1):
        fsdp2, ddp = runs[rank, "fsdp2"], runs[rank, "ddp"]
        assert max(abs(a - b) for a, b in zip(fsdp2["losses"], ddp["losses"], strict=True)) <= 1e-6
        for key in keys:
            assert (fsdp2["state"][key] - ddp["state"][key]).abs().max().item() <= 1e-6, key
            assert torch.equal(fsdp2["state"][key], runs[0, "fsdp2"]["state"][key]), key
        assert fsdp2["packed"]["dtensors"] == 14 and fsdp2["packed"]["total"] == 36864  # uint8: bytes
        assert fsdp2["packed"]["local"] == 18432  # measured: each rank holds exactly half
    # The sharded checkpoint holds the adapters only (and the optimizer state), no base weight.
    metadata = FileSystemReader(tmp_path / "ckpt_first" / "last.ckpt").read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in metadata if k.startswith("model.")}
    assert model_keys == keys  # Lightning's "model." entry, then the LightningModule's own key names
