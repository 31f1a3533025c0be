"""AdaLoRA: acceptance checks, the budget trajectory through PEFTCallback, rank patterns, parity with peft."""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import (
    PEFTCallback,
    adapter_state_dict,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
)
from lightning_peft.core.adapter_layer import to_peft_key
from lightning_peft.methods import AdaLoRA, LoRA
from lightning_peft.methods.lora import adalora as adalora_module
from lightning_peft.methods.lora.adalora import SVDLayer
from lightning_peft.testing import checks
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {}),
    "bert": (tiny_bert_classifier, {"modules_to_save": ["classifier"]}),
}
case_param = pytest.mark.parametrize("case", list(CASES), ids=list(CASES))


def build_and_method(case: str, **extra: Any) -> tuple[Callable[[], nn.Module], AdaLoRA]:
    build, kwargs = CASES[case]
    return build, AdaLoRA(**kwargs, **extra)


def svd_layers(model: nn.Module) -> dict[str, SVDLayer]:
    return {n: m for n, m in checks.adapter_layers(model) if isinstance(m, SVDLayer)}


def expected_budget(step: int, total: int, tinit: int, tfinal: int, init_bgt: int, target_bgt: int) -> int:
    """The paper's cubic schedule, in exact fractions (independent of the implementation's integer form)."""
    if step <= tinit:
        return init_bgt
    progress = min(Fraction(step - tinit, total - tfinal - tinit), Fraction(1))
    return target_bgt + int((init_bgt - target_bgt) * (1 - progress) ** 3)


def test_layers_hold_the_svd_triplets_initialised_as_in_the_paper() -> None:
    model = inject(tiny_llama(), AdaLoRA())  # defaults: q_proj, v_proj; init_r=12, alpha=8
    layers = svd_layers(model)
    assert sorted(layers) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    v = layers["model.layers.0.self_attn.v_proj"]
    A, E, B = v.lora_A["default"], v.lora_E["default"], v.lora_B["default"]
    assert (A.shape, E.shape, B.shape) == ((12, 64), (12, 1), (32, 12))
    assert torch.count_nonzero(E) == 0
    for factor in (A, B):
        assert abs(factor.mean().item()) < 0.005 and 0.015 < factor.std().item() < 0.025  # N(0, 0.02)
    checks.randomise(model)
    x = torch.randn(3, 64)
    expected = v.base_layer(x) + (x @ (A * E).T @ B.T) * (8 / (12 + 1e-5))
    torch.testing.assert_close(v(x), expected, atol=1e-6, rtol=0)


def test_orthogonal_regulariser_is_the_mean_frobenius_distance_of_the_active_adapter() -> None:
    method = AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.3)
    model = inject(tiny_llama(), method)
    checks.randomise(model)
    norms = []
    for layer in svd_layers(model).values():
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        norms += [
            torch.sqrt(((A @ A.T - torch.eye(4)) ** 2).sum()),
            torch.sqrt(((B.T @ B - torch.eye(4)) ** 2).sum()),
        ]
    torch.testing.assert_close(method.extra_loss(model, "default"), 0.3 * torch.stack(norms).mean())
    inject(model, LoRA(target_modules=["k_proj"]), adapter_name="other")  # another method active: no term
    assert method.extra_loss(model, "default") is None
    set_adapter(model, "default")
    assert method.extra_loss(model, "default") is not None
    assert (
        AdaLoRA(orth_reg_weight=0).extra_loss(inject(tiny_llama(), AdaLoRA(orth_reg_weight=0)), "default")
        is None
    )


# --- METHODS.md acceptance checks ---------------------------------------------------------------------------
@case_param
def test_init_is_a_no_op(case: str) -> None:
    checks.assert_init_is_identity(*build_and_method(case))


@case_param
def test_training_changes_only_adapter_parameters(case: str) -> None:
    changed = checks.assert_trains_only_its_parameters(*build_and_method(case))
    assert {k.rsplit(".", 2)[-2] for k in changed if ".lora_" in k} == {"lora_A", "lora_B", "lora_E"}


@case_param
def test_save_load_roundtrip(case: str, tmp_path: Path) -> None:
    checks.assert_roundtrip(*build_and_method(case, total_step=100), tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    )  # nothing pruned


@pytest.mark.parametrize("case", ["llama", "bert", "gpt2_conv1d"])
def test_merge_is_exact_and_unmerge_restores(case: str) -> None:
    build, kwargs = CASES.get(case, (tiny_gpt2, {"target_modules": ["c_attn"]}))
    # E = 0 at init; randomise() then gives every triplet a moderate weight (peft's random init, all N(0, 1),
    # makes updates 100x the base weights, and only rounding would be compared).
    checks.assert_merge_matches(build, AdaLoRA(**kwargs), scale=0.3)


def test_non_finite_merge_is_refused() -> None:
    checks.assert_non_finite_merge_is_refused(tiny_llama, AdaLoRA(), poison="lora_B")


@case_param
def test_disable_gives_the_base_output(case: str) -> None:
    checks.assert_disable_gives_base(*build_and_method(case), mergeable=True)


@case_param
def test_unload_restores_the_base_model_exactly(case: str) -> None:
    checks.assert_unload_restores_base(*build_and_method(case))


def test_two_named_adapters_in_one_model(tmp_path: Path) -> None:
    checks.assert_named_adapters_switch(tiny_llama, lambda: AdaLoRA(init_r=4, target_r=2), tmp_path)


def test_gradient_checkpointing_gives_grads_to_the_same_parameters() -> None:
    checks.assert_checkpointing_gives_same_grads(tiny_llama, lambda: AdaLoRA(init_r=4, target_r=2))


@case_param
def test_trains_through_the_callback_and_the_loss_goes_down(case: str) -> None:
    module = checks.assert_trains_through_callback(*build_and_method(case, init_r=6, target_r=4), lr=5e-2)
    # total_step came from the Trainer (8 steps): the final allocation left target_r per layer on average
    kept = sum(
        int(torch.count_nonzero(layer.lora_E["default"])) for layer in svd_layers(module.model).values()
    )
    assert kept == 4 * len(svd_layers(module.model))


# --- the budget schedule through PEFTCallback ---------------------------------------------------------------
class RecordE(pl.Callback):
    """After PEFTCallback's per-step work: every layer's singular values."""

    def __init__(self) -> None:
        self.E: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.E.append(
            {n: m.lora_E["default"].detach().view(-1).clone() for n, m in svd_layers(pl_module.model).items()}
        )


def test_active_singular_values_follow_the_budget_and_masked_triplets_stay_masked(
    monkeypatch, tmp_path
) -> None:
    logged: list[str] = []
    monkeypatch.setattr(adalora_module, "rank_zero_info", logged.append)
    steps, tinit, tfinal = 12, 2, 3
    method = AdaLoRA(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal)  # total_step from the Trainer
    recorder = RecordE()
    module = checks.fit(tiny_llama, method, steps=steps, lr=2e-2, callbacks=[recorder])

    init_bgt, target_bgt = 4 * 6, 4 * 2  # q_proj and v_proj in 2 layers
    budgets = [expected_budget(s, steps, tinit, tfinal, init_bgt, target_bgt) for s in range(1, steps + 1)]
    assert budgets == [24, 24, 18, 13, 10, 9, 8, 8, 8, 8, 8, 8]  # cubic: fast at first
    active = [sum(int(torch.count_nonzero(E)) for E in record.values()) for record in recorder.E]
    assert active == budgets  # step by step
    final = recorder.E[steps - tfinal - 1]  # the allocation at total_step - tfinal is final
    for record in recorder.E[steps - tfinal :]:
        for name, E in record.items():
            assert torch.equal(E == 0, final[name] == 0), name  # masked triplets stay masked (E exactly 0)
            assert torch.count_nonzero(E[final[name] != 0]) == int(torch.count_nonzero(final[name]))

    ranks = {name: int(torch.count_nonzero(E)) for name, E in final.items()}
    assert sum(ranks.values()) == target_bgt and method.ranks(module.model) == ranks
    assert logged == [f"lightning-peft: AdaLoRA 'default' final ranks (8 triplets): {ranks}"]
    _assert_rank_pattern_saved_and_restored(module.model, ranks, tmp_path)


def _assert_rank_pattern_saved_and_restored(model: nn.Module, ranks: dict[str, int], tmp_path: Path) -> None:
    with torch.no_grad():
        expected = checks.logits(model)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["total_step"] == 12
    pattern = config["rank_pattern"]
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} == ranks
    for name, kept in pattern.items():
        layer = svd_layers(model)[name.removesuffix(".lora_E")]
        assert kept == (layer.lora_E["default"].view(-1) != 0).tolist()
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for name, rank in ranks.items():  # the masked triplets are not in the file
        assert tensors[f"base_model.model.{name}.lora_A"].shape == (rank, 64)
        assert tensors[f"base_model.model.{name}.lora_E"].shape == (rank, 1)
        assert tensors[f"base_model.model.{name}.lora_B"].shape[1] == rank

    loaded = load_adapter(tiny_llama(), tmp_path / "ours")
    assert {n: m.lora_E["default"].shape[0] for n, m in svd_layers(loaded).items()} == ranks
    assert {m.ranknum["default"] for m in svd_layers(loaded).values()} == {
        6.0
    }  # the scale stays alpha / init_r
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(loaded), expected, atol=1e-6, rtol=0)
    save_adapter(loaded, tmp_path / "again")  # the pattern survives a second save
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(theirs), expected, atol=1e-6, rtol=0)


# --- resuming from an adapter-only checkpoint mid-allocation ------------------------------------------------
RESUME_STEPS, RESUME_AT, BATCHES = 15, 5, 5  # 3 epochs of 5 batches; the checkpoint after epoch 1 (step 5)
RESUME_CONFIG = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2, "total_step": RESUME_STEPS}


class RecordTrainingState(pl.Callback):
    """After PEFTCallback's per-step work: the method's training state, copied."""

    def __init__(self, method: AdaLoRA) -> None:
        self.method = method
        self.states: list[dict[str, Any]] = []

    def snapshot(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        state = self.method.training_state(pl_module.model, "default")
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restored = self.snapshot(pl_module)  # after a checkpoint restore, before the first step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.states.append(self.snapshot(pl_module))


def _fit_adalora(
    tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, dirpath: Path | None = None
) -> tuple[checks.TinyTask, RecordTrainingState]:
    method = AdaLoRA(target_modules=["q_proj", "v_proj"], **RESUME_CONFIG)
    recorder = RecordTrainingState(method)
    callbacks: list[pl.Callback] = [PEFTCallback(method, target="model"), recorder]
    if dirpath is not None:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0))
    g = torch.Generator().manual_seed(1)  # a different batch each step: the importances move
    ids = torch.randint(0, checks.VOCAB, (4 * BATCHES, 12), generator=g)
    data = DataLoader(TensorDataset(ids, torch.zeros(4 * BATCHES)), batch_size=4, shuffle=False)
    module = checks.TinyTask(tiny_llama, lr=2e-2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=dirpath is not None, default_root_dir=tmp_path,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, recorder


def _assert_same_state(actual: dict[str, Any], expected: dict[str, Any], step: int) -> None:
    assert actual.keys() == expected.keys(), step
    for key, value in expected.items():
        same = torch.equal(actual[key], value) if isinstance(value, torch.Tensor) else actual[key] == value
        assert same, (step, key)


def test_resume_mid_allocation_from_adapter_checkpoint_is_exact(tmp_path: Path) -> None:
    assert RESUME_CONFIG["tinit"] < RESUME_AT < RESUME_STEPS - RESUME_CONFIG["tfinal"]  # inside the budgeting
    uninterrupted, full = _fit_adalora(tmp_path, max_epochs=3)
    full_states = full.states
    first, _ = _fit_adalora(tmp_path, max_epochs=1, dirpath=tmp_path / "ckpt")
    resumed, resumed_run = _fit_adalora(
        tmp_path, max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    entry = saved["lightning_peft"]
    assert set(entry) == {"adapter_name", "target", "method", "adapter_keys", "training_state"}
    layers = svd_layers(uninterrupted.model)
    assert set(entry["training_state"]) == {"total_step"} | {
        f"{name}.{key}"
        for name in layers
        for key in ["rank_mask"]
        + [f"{a}.{e}" for a in ("lora_A", "lora_E", "lora_B") for e in adalora_module._EMA_NAMES]
    }
    assert entry["training_state"]["total_step"] == RESUME_STEPS
    _assert_same_state(entry["training_state"], full_states[RESUME_AT - 1], RESUME_AT)

    _assert_same_state(resumed_run.restored, full_states[RESUME_AT - 1], RESUME_AT)  # EMAs and masks restored
    assert len(uninterrupted.losses) == RESUME_STEPS and len(first.losses) == RESUME_AT
    assert first.losses + resumed.losses == uninterrupted.losses  # bit-identical trajectory after step K
    for step, (actual, expected) in enumerate(zip(resumed_run.states, full_states[RESUME_AT:], strict=True)):
        _assert_same_state(actual, expected, RESUME_AT + 1 + step)  # EMAs and masks, step by step
    for key, value in uninterrupted.model.state_dict().items():  # incl. the masked (zero) entries of E
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    ranks = {n: layer.rank_pattern("default") for n, layer in layers.items()}
    assert {n: layer.rank_pattern("default") for n, layer in svd_layers(resumed.model).items()} == ranks
    assert sum(map(sum, ranks.values())) == 4 * 2 and not all(map(all, ranks.values()))


def test_checkpoint_without_training_state_still_resumes_with_a_warning(tmp_path: Path) -> None:
    _fit_adalora(tmp_path, max_epochs=1, dirpath=tmp_path / "ckpt")
    old = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    del old["lightning_peft"]["training_state"]  # as written before the hook existed
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="importance statistics .* restart from zero"):
        resumed, _ = _fit_adalora(tmp_path, max_epochs=3, ckpt_path=str(tmp_path / "old.ckpt"))
    assert len(resumed.losses) == RESUME_STEPS - RESUME_AT
    kept = sum(
        int(torch.count_nonzero(layer.lora_E["default"])) for layer in svd_layers(resumed.model).values()
    )
    assert kept == 4 * 2  # the allocation still ends at target_r per layer


def test_training_state_of_unknown_modules_is_refused_and_of_other_shapes_restarts() -> None:
    method = AdaLoRA(target_modules=["q_proj"], init_r=4, target_r=2)
    model = inject(tiny_llama(), method)
    with pytest.raises(ValueError, match="modules this model does not adapt"):
        method.load_training_state(
            model, "default", {"model.layers.0.self_attn.v_proj.rank_mask": torch.ones(4)}
        )
    q = "model.layers.0.self_attn.q_proj.lora_E"
    wrong = {f"{q}.exp_avg_ipt": torch.ones(3, 1), f"{q}.exp_avg_unc": torch.ones(3, 1)}
    with pytest.warns(UserWarning, match=r"q_proj.lora_E has shape \(3, 1\).*statistics restart"):
        method.load_training_state(model, "default", wrong)
    assert "default" not in svd_layers(model)["model.layers.0.self_attn.q_proj"].importance


# --- parity with Hugging Face peft ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "targets"),
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])],
    ids=["llama", "gpt2_conv1d"],
)
def test_outputs_merge_and_regulariser_match_peft(build: Callable, targets: list[str]) -> None:
    peft = pytest.importorskip("peft")
    config = {"init_r": 6, "target_r": 2, "lora_alpha": 16, "total_step": 10, "target_modules": targets}
    # task_type: only the task wrappers (PeftModelForCausalLM) route through AdaLoraModel.forward, which adds the
    # regulariser to the loss; a bare PeftModel calls the base model directly.
    reference = peft.get_peft_model(build(), peft.AdaLoraConfig(**config, task_type="CAUSAL_LM"))
    checks.randomise(reference)
    method = AdaLoRA.from_peft_config(config)
    ours = inject(build(), method)
    peft_state = peft.get_peft_model_state_dict(reference)
    mapping = {to_peft_key(k, "default"): k for k in adapter_state_dict(ours)}
    assert set(mapping) == set(peft_state)  # lora_A, lora_B, lora_E under peft's names
    ours.load_state_dict({mapping[k]: v for k, v in peft_state.items()}, strict=False)
    ids, _ = checks.fit_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=ids)
        out = ours(input_ids=ids, labels=ids)
        assert torch.equal(out.logits, expected.logits)
        # peft adds the orthogonal regulariser to the loss it returns
        torch.testing.assert_close(
            out.loss + method.extra_loss(ours, "default"), expected.loss, atol=1e-6, rtol=0
        )
        reference.merge_adapter()
        merge(ours)
        torch.testing.assert_close(checks.logits(ours), checks.logits(reference), atol=1e-6, rtol=0)


@pytest.mark.parametrize("delta_t", [1, 2])
def test_rank_allocation_matches_peft_step_by_step(delta_t: int, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    config = {"init_r": 6, "target_r": 2, "lora_alpha": 8, "tinit": 2, "tfinal": 2, "deltaT": delta_t}
    config |= {"total_step": 10, "target_modules": ["q_proj", "v_proj"]}
    reference = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**config, task_type="CAUSAL_LM"))
    method = AdaLoRA.from_peft_config(config)
    ours = inject(tiny_llama(), method)
    mapping = {to_peft_key(k, "default"): k for k in adapter_state_dict(ours)}
    ours.load_state_dict(
        {mapping[k]: v for k, v in peft.get_peft_model_state_dict(reference).items()}, strict=False
    )
    optimizers = [
        torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (reference, ours)
    ]
    ids, _ = checks.fit_batch()
    for step in range(1, 11):
        reference(input_ids=ids, labels=ids).loss.backward()  # peft's loss includes the regulariser
        (ours(input_ids=ids, labels=ids).loss + method.extra_loss(ours, "default")).backward()
        for optimizer in optimizers:
            optimizer.step()
        reference.base_model.update_and_allocate(step)
        method.on_optimizer_step(ours, "default", step, None)
        for optimizer in optimizers:
            optimizer.zero_grad()
        theirs = {
            n.replace(".lora_E.default", ""): p
            for n, p in reference.base_model.model.named_parameters()
            if "lora_E" in n
        }
        for name, layer in svd_layers(ours).items():
            E = layer.lora_E["default"]
            assert torch.equal(E == 0, theirs[name] == 0), (step, name)  # the same triplets masked
            torch.testing.assert_close(E, theirs[name], atol=1e-5, rtol=1e-4)
    assert sum(method.ranks(ours).values()) == 8
    # The same final pattern as peft's, and peft's pruned directory loads here with the same outputs.
    assert reference.peft_config["default"].rank_pattern == {
        f"{n}.lora_E.default": layer.rank_pattern("default") for n, layer in svd_layers(ours).items()
    }
    reference.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert {n: m.lora_E["default"].shape[0] for n, m in svd_layers(loaded).items()} == method.ranks(ours)
    with torch.no_grad():
        torch.testing.assert_close(checks.logits(loaded), checks.logits(reference), atol=1e-6, rtol=0)


# --- hyperparameters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_r": 0}, "init_r=0 must be an integer >= 1"),
        ({"target_r": 16}, "target_r=16 > init_r=12"),
        ({"deltaT": 0}, "deltaT=0 must be an integer >= 1"),
        ({"beta1": 1.0}, r"beta1=1.0 must be in \(0, 1\)"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight=-1.0 must be >= 0"),
        ({"alpha": 0}, "alpha=0 must be > 0"),
        ({"tinit": 50, "tfinal": 50, "total_step": 100}, "leaves no budgeting phase"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoRA(**kwargs)


def test_schedule_needs_a_total_step_and_the_config_its_scale() -> None:
    method = AdaLoRA()
    model = inject(tiny_llama(), method)
    with pytest.raises(ValueError, match="needs the total number of optimizer steps"):
        method.on_optimizer_step(model, "default", 1, None)
    with pytest.raises(ValueError, match="leaves no budgeting phase"):
        late = AdaLoRA(tinit=5)
        late.on_optimizer_step(inject(tiny_llama(), late), "default", 1, 5)
    with pytest.raises(ValueError, match="lacks 'init_r' or 'lora_alpha'"):
        AdaLoRA.from_peft_config({"peft_type": "ADALORA", "target_r": 4})
