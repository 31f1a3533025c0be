"""DeepSpeed ZeRO-2/3, with and without CPU offload, on CPU (gloo) in 1 and 2 processes: adapters identical on every
rank, adapter-only engine checkpoints, exact resume, and export of a ZeRO-3 checkpoint into a peft directory.

One subprocess per process count runs every case (tests/distributed/deepspeed_fit.py); the tests read its files.
No DeepSpeed op is compiled: the optimizer is torch's AdamW, and PEFTDeepSpeedStrategy leaves DeepSpeed's
shared-memory communicator (a g++ build) out on the CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from lightning_peft.integrations.deepspeed import supports_exclude_frozen_parameters
from tests.distributed.process_group import run_script

if not supports_exclude_frozen_parameters():
    pytest.skip(
        "DeepSpeedStrategy(exclude_frozen_parameters=...) needs lightning>=2.6", allow_module_level=True
    )

SCRIPT = Path(__file__).parent / "distributed" / "deepspeed_fit.py"
CASES = ["stage2", "stage2_offload", "stage3", "stage3_offload"]
LORA_TENSORS = 8  # lora_A + lora_B of q_proj, v_proj in 2 layers
ADAPTER_NUMEL = 1792  # the tiny Llama's LoRA r=4 parameters
BASE_NUMEL = 92224 - ADAPTER_NUMEL


@pytest.fixture(scope="module", params=[1, 2], ids=["1process", "2processes"])
def runs(request, tmp_path_factory) -> tuple[Path, int]:
    devices = request.param
    out = tmp_path_factory.mktemp(f"deepspeed{devices}")
    env = {
        **os.environ,
        "PYTHONPATH": str(SCRIPT.parents[2]),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    command = [sys.executable, str(SCRIPT), str(out), str(devices), *CASES, "stage3_mid_epoch"]
    done = run_script(command, env, out, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    # Nothing compiled at run time (DeepSpeed prints "... built successfully" / ninja "Building extension").
    assert "built successfully" not in done.stdout + done.stderr
    assert "Building extension" not in done.stdout + done.stderr
    # PEFTCallback reads DeepSpeed's gradients from the engine's buffers (param.grad is None there).
    assert "got no gradient" not in done.stderr
    return out, devices


def load_runs(out: Path, case: str, devices: int) -> dict:
    return {
        (rank, name): torch.load(out / case / ("full" if name == "full" else "") / f"rank{rank}_{name}.pt")
        for rank in range(devices) for name in ("full", "first", "resumed")
    }  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_zero_trains_only_adapters_and_resumes_exactly_on_every_rank(runs, case):
    out, devices = runs
    result = load_runs(out, case, devices)
    keys = set(result[0, "full"]["state"])
    assert len(keys) == LORA_TENSORS
    for rank in range(devices):
        full, first, resumed = (result[rank, n] for n in ("full", "first", "resumed"))
        # The optimizer that reached DeepSpeed's engine held the adapter only (PEFTCallback restricted it).
        assert full["in_optimizer"] == first["in_optimizer"] == ADAPTER_NUMEL
        # Counted from ZeRO-3's partitions too (their tensors are empty; ds_numel holds the size).
        assert (
            full["counts"]["trainable"] == ADAPTER_NUMEL
            and full["counts"]["total"] == ADAPTER_NUMEL + BASE_NUMEL
        )
        assert len(full["losses"]) == 2 * 4 // devices
        # First epoch + the epoch resumed from the DeepSpeed checkpoint == the uninterrupted run, bit for bit.
        assert first["losses"] + resumed["losses"] == full["losses"]
        for key in keys:
            assert torch.equal(resumed["state"][key], full["state"][key]), key
            assert torch.equal(full["state"][key], result[0, "full"]["state"][key]), key  # same on every rank
    lora_b = [k for k in keys if "lora_B" in k]
    assert all(result[0, "full"]["state"][k].abs().sum() > 0 for k in lora_b)  # B (zero at start) trained
    if devices == 2:
        assert result[0, "full"]["losses"] != result[1, "full"]["losses"]  # each rank on its own shard


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_zero_checkpoint_holds_only_adapter_tensors(runs, case):
    out, devices = runs
    checkpoint = out / case / "ckpt" / "last.ckpt"
    files = sorted(p.relative_to(checkpoint).as_posix() for p in (checkpoint / "checkpoint").iterdir())
    stage3 = case.startswith("stage3")
    if stage3:  # one model-states and one optimizer-states file per rank
        assert files == sorted(
            f"checkpoint/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(devices) for kind in ("model", "optim")
        )  # fmt: skip
    else:
        assert files == sorted(
            ["checkpoint/mp_rank_00_model_states.pt"]
            + [f"checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(devices)]
        )
    adapter_keys = set(torch.load(out / case / "rank0_first.pt")["keys"])
    model_states = torch.load(checkpoint / files[0], weights_only=False)
    assert set(model_states["module"]) == adapter_keys  # no frozen base weight
    assert set(model_states["param_shapes"][0]) == adapter_keys
    assert not model_states["frozen_param_shapes"] and not model_states["frozen_param_fragments"]
    # fp32 adapter + AdamW's two moments: every optimizer file together holds 3 x 1792 floats, not the base's.
    flat = 0
    for path in (checkpoint / "checkpoint").glob("*optim_states.pt"):
        state = torch.load(path, weights_only=False)["optimizer_state_dict"]
        groups = state["fp32_flat_groups"] if stage3 else state["single_partition_of_fp32_groups"]
        flat += sum(t.numel() for t in groups)
    assert ADAPTER_NUMEL <= flat < ADAPTER_NUMEL + 64 * devices  # (partitions are padded)
    size = sum(p.stat().st_size for p in (checkpoint / "checkpoint").iterdir())
    assert size < 4 * BASE_NUMEL  # less than the base weights alone in fp32


@pytest.mark.distributed
@pytest.mark.slow
def test_adapter_exported_from_zero3_checkpoint_loads_in_peft_with_equal_outputs(runs, tmp_path):
    from peft import PeftModel

    from lightning_peft import inject, save_adapter
    from lightning_peft.app.checkpoints import load_adapter_checkpoint
    from lightning_peft.integrations.callback import PEFTCallback
    from lightning_peft.methods import LoRA
    from tests.test_callback import CausalLM
    from tests.tiny_models import tiny_llama, token_batch

    out, _ = runs
    module = CausalLM()
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
    inject(module.model, callback.method)
    # A directory: the per-rank fp32 partitions of the ZeRO-3 (offload) checkpoint, merged on the CPU.
    load_adapter_checkpoint(module, callback, out / "stage3_offload" / "ckpt" / "last.ckpt")
    # last.ckpt was last written at the end of the resumed fit
    trained = torch.load(out / "stage3_offload" / "rank0_resumed.pt")["state"]
    live = dict(module.named_parameters())
    for key, value in trained.items():
        assert torch.equal(live[key], value), key
    save_adapter(module.model, tmp_path / "adapter")
    reference = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    ids = token_batch()
    module.eval()
    with torch.no_grad():
        ours, theirs = module.model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-4  # the adapter changes the outputs


def test_callback_sets_exclude_frozen_parameters_and_refuses_skip():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft.integrations.deepspeed import PEFTDeepSpeedStrategy, prepare_deepspeed

    trainer = pl.Trainer(accelerator="cpu", strategy=DeepSpeedStrategy(stage=2), logger=False)
    assert not trainer.strategy.exclude_frozen_parameters
    prepare_deepspeed(trainer, adapter_only_checkpoints=False, non_finite="raise")
    assert not trainer.strategy.exclude_frozen_parameters  # full checkpoints asked for: left as it is
    prepare_deepspeed(trainer, adapter_only_checkpoints=True, non_finite="raise")
    assert trainer.strategy.exclude_frozen_parameters
    with pytest.raises(ValueError, match=r"non_finite='skip'\) cannot skip a step under DeepSpeed"):
        prepare_deepspeed(trainer, adapter_only_checkpoints=True, non_finite="skip")
    assert PEFTDeepSpeedStrategy(stage=3).exclude_frozen_parameters


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_refuses_a_deepspeed_checkpoint_of_another_adapter(runs, tmp_path):
    from lightning_peft.integrations.deepspeed import require_adapter_tensors

    out, _ = runs
    checkpoint = out / "stage2" / "ckpt" / "last.ckpt"
    keys = torch.load(out / "stage2" / "rank0_first.pt")["keys"]
    require_adapter_tensors(checkpoint, keys)  # its own keys: accepted
    other = [k.replace("v_proj", "k_proj") for k in keys]
    with pytest.raises(KeyError, match="lacks 4 tensors that train"):
        require_adapter_tensors(checkpoint, other)
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed checkpoint"):
        require_adapter_tensors(tmp_path, keys)


@pytest.mark.distributed
@pytest.mark.slow
def test_mid_epoch_resume_with_a_resumable_loader_continues_with_the_next_batches(runs):
    out, devices = runs
    result = load_runs(out, "stage3_mid_epoch", devices)
    for rank in range(devices):
        full, first, resumed = (result[rank, name] for name in ("full", "first", "resumed"))
        assert len(full["losses"]) == 4 and len(first["losses"]) == 2
        assert first["losses"] + resumed["losses"] == full["losses"]  # batches 2 and 3, not 0 and 1 again
        for key, value in full["state"].items():
            assert torch.equal(resumed["state"][key], value), key
