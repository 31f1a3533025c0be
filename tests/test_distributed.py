"""2 CPU processes (gloo) under DDP, FSDP and FSDP2: identical adapters, adapter-only checkpoints, exact resume."""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.process_group import run_script

SCRIPT = Path(__file__).parent / "distributed" / "ddp_fit.py"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    ["lora", "adalora", "ia3", "adapter", "prompt_tuning", "prefix_tuning", "qlora", "p_tuning", "p_tuning_v2",
     "mam_adapter", "unipelt"],
)  # fmt: skip
def test_ddp_two_processes_identical_adapters_one_adapter_only_checkpoint(tmp_path, method):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), str(tmp_path), method]
    done = run_script(command, env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["losses"] != rank1["losses"]  # the ranks trained on different batches...
    assert set(rank0["state"]) == set(rank1["state"]) and rank0["state"]
    for key, value in rank0["state"].items():  # ...yet hold bit-identical adapters
        assert torch.equal(value, rank1["state"][key]), key

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in rank0["state"]}
    for key, value in rank0["state"].items():
        assert torch.equal(checkpoint["state_dict"][f"model.{key}"], value)


RESUME_SCRIPT = Path(__file__).parent / "distributed" / "strategy_resume.py"
FULL_STATE_SEGFAULT = (
    "FSDP full-state optimizer save segfaults on CPU/gloo even without PEFT (rank 0 dies in all_gather); "
    "state_dict_type='full' is left to GPU runs"
)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        "fsdp_sharded",
        pytest.param("fsdp_full", marks=pytest.mark.skip(FULL_STATE_SEGFAULT)),
        "model_parallel",
    ],
)
def test_resume_from_adapter_only_checkpoint_reproduces_the_trajectory_on_every_rank(tmp_path, strategy):
    env = {**os.environ, "PYTHONPATH": str(RESUME_SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "full").mkdir()
    command = [sys.executable, str(RESUME_SCRIPT), str(tmp_path), strategy]
    done = run_script(command, env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = {
        (rank, name): torch.load(tmp_path / ("full" if name == "full" else "") / f"rank{rank}_{name}.pt")
        for rank in (0, 1) for name in ("full", "first", "resumed")
    }  # fmt: skip
    keys = set(runs[0, "full"]["state"])
    assert len(keys) == 8  # lora_A + lora_B of q_proj, v_proj in 2 layers
    for rank in (0, 1):  # on each rank, first half + resumed half == uninterrupted, bit for bit...
        assert len(runs[rank, "full"]["losses"]) == 4
        assert runs[rank, "first"]["losses"] + runs[rank, "resumed"]["losses"] == runs[rank, "full"]["losses"]
        for key in keys:
            assert torch.equal(runs[rank, "resumed"]["state"][key], runs[rank, "full"]["state"][key]), key
            # ...and both ranks hold the same adapters
            assert torch.equal(runs[rank, "full"]["state"][key], runs[0, "full"]["state"][key]), key
    assert runs[0, "full"]["losses"] != runs[1, "full"]["losses"]  # different data shards per rank

    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    if strategy == "ddp":
        assert set(torch.load(checkpoint, weights_only=True)["state_dict"]) == keys
    else:  # a distributed checkpoint (directory): model tensors under "model." (FSDP) or "state_dict." (FSDP2)
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
        prefix = "state_dict." if strategy == "model_parallel" else "model."
        assert {k.removeprefix(prefix) for k in stored if k.startswith(prefix)} == keys
    if strategy == "fsdp_sharded":
        # adapter_auto_wrap_policy: 8 adapter units (one flat param each) hold all trainable params; base frozen
        trainable_units, frozen_units = runs[0, "full"]["units"]
        assert trainable_units == 8 and frozen_units == 3  # 2 decoder layers + the root
        assert runs[0, "full"]["checkpointed"] == 2  # activation checkpointing of both decoder layers


@pytest.mark.slow
@pytest.mark.cuda
def test_fsdp_full_state_dict_on_cuda_checkpoints_only_adapters_and_resumes_exactly(tmp_path):
    """FSDP with ``state_dict_type="full"`` on the CUDA devices there are (one suffices): the checkpoint is one file
    of adapter tensors only, and first half + resumed half reproduce the uninterrupted run bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip(
            "needs a CUDA device (on CPU/gloo the full-state save segfaults: see FULL_STATE_SEGFAULT)"
        )
    env = {**os.environ, "PYTHONPATH": str(RESUME_SCRIPT.parents[2]), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    (tmp_path / "full").mkdir()
    done = run_script(
        [sys.executable, str(RESUME_SCRIPT), str(tmp_path), "fsdp_full_cuda"], env, tmp_path, 300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    load = lambda name: torch.load(tmp_path / ("full" if name == "full" else "") / f"rank0_{name}.pt")  # noqa: E731
    full, first, resumed = load("full"), load("first"), load("resumed")
    keys = set(full["state"])
    assert len(keys) == 8  # lora_A + lora_B of q_proj, v_proj in 2 layers
    assert first["losses"] + resumed["losses"] == full["losses"]
    for key in keys:
        assert torch.equal(resumed["state"][key].cpu(), full["state"][key].cpu()), key
    assert set(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]) == keys


def test_adapter_auto_wrap_policy_wraps_modules_holding_only_trainable_parameters():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_peft import inject
    from lightning_peft.integrations.distributed import adapter_auto_wrap_policy
    from lightning_peft.methods import IA3, LoRA
    from tests.tiny_models import tiny_llama

    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    policy = adapter_auto_wrap_policy({LlamaDecoderLayer})
    wrapped = {name for name, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)}
    projections = ("q_proj", "v_proj")
    adapters = {
        f"model.layers.{i}.self_attn.{p}.lora_{ab}.default"
        for i in (0, 1)
        for p in projections
        for ab in "AB"
    }
    assert wrapped == adapters | {"model.layers.0", "model.layers.1"}
    assert all(policy(m, recurse=True, nonwrapped_numel=0) for m in model.modules())
    # IA3's vectors live in ParameterDicts read by their parent: they must stay in the parent's unit.
    ia3 = inject(tiny_llama(), IA3())
    assert not any(adapter_auto_wrap_policy()(m, False, 0) for m in ia3.modules())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.cuda
def test_deepspeed_checkpoint_excludes_frozen_parameters(tmp_path):
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip(
            "Lightning's stock DeepSpeedStrategy needs a CUDA device (on CPU: tests/test_deepspeed.py)"
        )
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft import PEFTCallback
    from lightning_peft.methods import LoRA
    from tests.test_callback import CausalLM, token_loader

    module = CausalLM()
    callback = PEFTCallback(LoRA(r=4, target_modules=["q_proj", "v_proj"]), target="model")
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True),
        max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "ds.ckpt")
    (model_states,) = (tmp_path / "ds.ckpt").rglob("*model_states.pt")
    stored = torch.load(model_states, weights_only=False)["module"]
    assert {k.removeprefix("module.") for k in stored} == set(callback.adapter_keys(module))
