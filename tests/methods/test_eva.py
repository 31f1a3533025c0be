"""EVA init (``init_lora_weights="eva"``): ranks and ``A`` equal to peft's ``initialize_lora_eva_weights`` on the
same model and batches, the adapter directory both ways, the run at fit start in PEFTCallback (and resuming from
its checkpoint), and the refusals."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import PEFTCallback, adapter_state_dict, inject, load_adapter, save_adapter
from lightning_peft.app.checkpoints import load_adapter_checkpoint
from lightning_peft.core.injection import injection_record
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.eva import EvaConfig, initialize_eva_weights
from lightning_peft.methods.lora.layers import LoraLayer
from tests.distributed.process_group import end_process_group, run_script
from tests.tiny_models import tiny_gpt2, tiny_llama, token_batch

# q/k/v see the same input (one shared SVD), o_proj and down_proj their own.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
R, ALPHA, RHO, TAU = 2, 8, 2.0, 0.9


def _model() -> nn.Module:
    return tiny_llama(num_hidden_layers=1)


def _batches(n: int = 4, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    """Dict batches with padding (attention_mask 0) and prompt tokens (labels -100), which EVA leaves out."""
    batches = []
    for i in range(n):
        ids = token_batch(8, 16, seed=seed + i)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _ours(seed: int = 10, **extra) -> tuple[nn.Module, dict[str, int]]:
    model = inject(
        _model(),
        LoRA(r=R, alpha=ALPHA, target_modules=TARGETS, init_lora_weights="eva",
             eva_config=EvaConfig(rho=RHO, tau=TAU), **extra),
    )  # fmt: skip
    return model, initialize_eva_weights(model, _batches(seed=seed))


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch(2, 12)).logits


def _randomise_trainable(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def both() -> tuple[nn.Module, nn.Module]:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=RHO, tau=TAU),
    )  # fmt: skip
    reference = peft.get_peft_model(_model(), config)
    initialize_lora_eva_weights(reference, dataloader=_batches(), show_progress_bar=False)
    return reference, _ours()[0]


def test_eva_matches_peft(both: tuple[nn.Module, nn.Module]) -> None:
    reference, ours = both
    theirs = {k: v for k, v in reference.base_model.model.state_dict().items() if "lora_" in k}
    mine = adapter_state_dict(ours)
    assert sorted(theirs) == sorted(mine)  # the same layers kept (rank 0 removes one) ...
    ranks = {k: v.shape[0] for k, v in mine.items() if ".lora_A." in k}
    assert ranks == {k: v.shape[0] for k, v in theirs.items() if ".lora_A." in k}  # ... with the same ranks
    assert sorted(set(ranks.values())) != [R], "the redistribution moved no rank: the test data is too easy"
    # A: the components, as peft computes them (same seeded randomised SVD and signs): max |diff| 0.0 measured.
    diff = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    assert diff <= 1e-6, diff
    assert all(torch.count_nonzero(v) == 0 for k, v in mine.items() if ".lora_B." in k)
    for name, module in ours.named_modules():
        if isinstance(module, LoraLayer):
            assert (
                module.scaling["default"]
                == reference.get_submodule(f"base_model.model.{name}").scaling["default"]
            )
    # B = 0: the model is the base model at init.
    torch.testing.assert_close(_logits(ours), _logits(_model()), atol=1e-6, rtol=0)
    # The file's per-module ranks and alphas are those peft's config holds after EVA.
    config = injection_record(ours).methods["default"].to_peft_config(ours, "default")
    assert config["rank_pattern"] == reference.peft_config["default"].rank_pattern
    assert config["alpha_pattern"] == reference.peft_config["default"].alpha_pattern
    assert config["rank_pattern"], "no layer changed rank"


@pytest.mark.parametrize(
    ("family", "targets", "eva", "extra"),
    [
        # whiten: only on layers with their own inputs. On layers sharing one SVD (q/k/v) peft divides the shared
        # components in place once per layer, so its k/v (and q) end up divided more than once; here each is
        # divided once.
        ("llama", ["o_proj", "down_proj", "up_proj"], {"whiten": True},
         {"use_rslora": True, "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"o_proj": 4.0}}),
        ("gpt2", ["c_attn", "c_proj"], {"adjust_scaling_factors": False, "use_label_mask": False}, {}),
    ],
    ids=["whiten-rslora-patterns", "gpt2-conv1d"],
)  # fmt: skip
def test_eva_matches_peft_with_options(family: str, targets: list[str], eva: dict, extra: dict) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    build = _model if family == "llama" else tiny_gpt2
    settings = {"rho": RHO, "tau": TAU, **eva}
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(**settings),
        **extra,
    )  # fmt: skip
    reference = peft.get_peft_model(build(), config)
    initialize_lora_eva_weights(reference, dataloader=_batches(), show_progress_bar=False)
    method = LoRA(
        r=R,
        alpha=ALPHA,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=EvaConfig(**settings),
        **extra,
    )
    ours = inject(build(), method)
    initialize_eva_weights(ours, _batches())
    theirs = {k: v for k, v in reference.base_model.model.state_dict().items() if "lora_" in k}
    mine = adapter_state_dict(ours)
    assert sorted(theirs) == sorted(mine)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-6  # measured: 0.0
    saved = method.to_peft_config(ours, "default")
    assert saved["rank_pattern"] == reference.peft_config["default"].rank_pattern
    assert saved["alpha_pattern"] == reference.peft_config["default"].alpha_pattern


def test_eva_directory_loads_both_ways(both: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    reference, ours = both
    _randomise_trainable(ours)
    save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(_model(), tmp_path / "ours")
    torch.testing.assert_close(in_peft(input_ids=token_batch(2, 12)).logits, _logits(ours), atol=1e-6, rtol=0)

    _randomise_trainable(reference)
    reference.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(_model(), tmp_path / "peft")
    expected = reference(input_ids=token_batch(2, 12)).logits
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)


def test_eva_every_process_takes_the_broadcast_result() -> None:
    """PEFTCallback passes ``trainer.strategy.broadcast``: each DDP process then uses rank 0's components, even
    when its own (shuffled) batches would give other ranks."""
    rank0, ranks = _ours()
    sent = {}
    for name, rank in ranks.items():
        width = rank0.get_submodule(name).in_features if rank else 64
        sent[name] = (
            rank0.get_submodule(name).lora_A["default"].weight.detach() if rank else torch.zeros(0, width)
        )
    model = inject(_model(), LoRA(r=R, alpha=ALPHA, target_modules=TARGETS, init_lora_weights="eva",
                                  eva_config=EvaConfig(rho=RHO, tau=TAU)))  # fmt: skip
    local = []
    got = initialize_eva_weights(model, _batches()[::-1], broadcast=lambda mine: local.append(mine) or sent)
    assert got == ranks and sorted(local[0]) == sorted(ranks)  # its own result was offered, rank 0's was used
    theirs, mine = adapter_state_dict(rank0), adapter_state_dict(model)
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)


class _Module(pl.LightningModule):
    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.model, self.lr = _model(), lr

    def train_dataloader(
        self,
    ) -> DataLoader:  # each DDP rank its own batches (seed 10 on rank 0, 50 on rank 1)
        return DataLoader(_batches(seed=10 + 40 * self.trainer.global_rank), batch_size=None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(**extra) -> pl.Trainer:
    method = LoRA(
        r=R,
        alpha=ALPHA,
        target_modules=TARGETS,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=RHO, tau=TAU),
    )
    return pl.Trainer(
        callbacks=[PEFTCallback(method, target="model")], accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **extra,
    )  # fmt: skip


def test_eva_runs_at_fit_start_and_resumes(tmp_path: Path) -> None:
    loader = DataLoader(_batches(), batch_size=None)  # each item is one batch
    module = _Module(lr=0.0)  # lr 0: the adapter stays what EVA made, to compare with the direct call
    trainer = _trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=loader)
    direct, ranks = _ours()
    fitted = adapter_state_dict(module.model)
    assert {k: v.shape[0] for k, v in fitted.items() if ".lora_A." in k} == {
        f"{name}.lora_A.default.weight": r for name, r in ranks.items() if r
    }
    expected = adapter_state_dict(direct)
    assert max((fitted[k] - expected[k]).abs().max().item() for k in expected) == 0.0

    # Train a little, then resume and evaluate from the checkpoint in fresh modules: the ranks come from the file.
    module = _Module(lr=0.5)
    trainer = _trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=loader)
    trained = {k: v.clone() for k, v in adapter_state_dict(module.model).items()}
    assert any(torch.count_nonzero(v) for k, v in trained.items() if ".lora_B." in k)
    trainer.save_checkpoint(tmp_path / "eva.ckpt")
    evaluated = _Module()
    _trainer().validate(evaluated, dataloaders=loader, ckpt_path=tmp_path / "eva.ckpt")
    assert {k: v.shape for k, v in adapter_state_dict(evaluated.model).items()} == {
        k: v.shape for k, v in trained.items()
    }
    assert all(torch.equal(adapter_state_dict(evaluated.model)[k], v) for k, v in trained.items())
    # What `lightning-peft export` and fit's adapter_best/ read checkpoints with: the same ranks and tensors.
    exported, callback = _Module(), trainer.callbacks[0]
    inject(exported.model, callback.method)
    load_adapter_checkpoint(exported, callback, tmp_path / "eva.ckpt")
    assert all(torch.equal(adapter_state_dict(exported.model)[k], v) for k, v in trained.items())
    resumed = _Module(lr=0.5)
    _trainer(max_steps=3).fit(resumed, train_dataloaders=loader, ckpt_path=tmp_path / "eva.ckpt")
    after = adapter_state_dict(resumed.model)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in trained.items()}
    assert not all(torch.equal(after[k], v) for k, v in trained.items())  # it trained on from there


def test_eva_refusals_leave_the_model_unchanged() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"EVA initialises Linear and Conv1D layers only; model.embed_tokens is Embedding"
    ):
        inject(model, LoRA(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights="eva"))
    with pytest.raises(ValueError, match=r"64 input features, fewer than round\(r \* rho\) = 80"):
        inject(model, LoRA(r=40, target_modules=["q_proj"], init_lora_weights="eva"))
    assert injection_record(model) is None or not injection_record(model).methods
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="eva_config is set but init_lora_weights=True"):
        LoRA(eva_config=EvaConfig())
    with pytest.raises(ValueError, match=r"rho=0.5 must be >= 1\.0"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="initialize_eva_weights needs adapter 'default' injected with"):
        initialize_eva_weights(inject(_model(), LoRA(target_modules=["q_proj"])), _batches(1))


def test_eva_that_does_not_converge_says_so() -> None:
    model = inject(
        _model(),
        LoRA(
            r=R,
            target_modules=["o_proj"],
            init_lora_weights="eva",
            eva_config=EvaConfig(tau=1.0, max_batches=3),
        ),
    )
    with pytest.raises(RuntimeError, match=r"had not converged to tau=1.0 after max_batches=3 batches"):
        initialize_eva_weights(model, _batches(2))


@pytest.mark.distributed
@pytest.mark.slow
def test_eva_under_ddp_every_rank_holds_rank0s_init(tmp_path: Path) -> None:
    """2 CPU processes (gloo), each with other batches: after EVA at fit start (lr 0, so nothing trains) both
    ranks hold the adapter EVA computes from rank 0's batches, which differs from rank 1's own."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    done = run_script([sys.executable, __file__, str(tmp_path)], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    expected, own1 = adapter_state_dict(_ours(seed=10)[0]), adapter_state_dict(_ours(seed=50)[0])
    for state in (rank0, rank1):
        assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert sorted(own1) != sorted(expected) or any(not torch.equal(own1[k], expected[k]) for k in expected)


def _ddp_main(out: Path) -> None:
    module = _Module(lr=0.0)
    trainer = _trainer(max_steps=1, devices=2, strategy="ddp", use_distributed_sampler=False)
    trainer.fit(module)
    state = {k: v.detach().clone() for k, v in adapter_state_dict(module.model).items()}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":  # the DDP test's worker: python tests/methods/test_eva.py OUT_DIR
    _ddp_main(Path(sys.argv[1]))
    end_process_group()
