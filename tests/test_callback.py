"""PEFTCallback on real Trainer runs: build sites, optimizers, adapter-only checkpoints, exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFTCallback, count_parameters, inject
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.layers import LoraLayer
from tests.tiny_models import VOCAB, MLPConv, tiny_bert_classifier, tiny_llama

QV = LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])


def token_loader(batches: int = 4, batch_size: int = 2, length: int = 12, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batches * batch_size, length), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


class CausalLM(pl.LightningModule):
    """A user's module: a tiny Llama built in __init__, setup or configure_model."""

    def __init__(
        self, build_in: str = "init", lr: float = 1e-2, two_groups: bool = False, scheduler: bool = False
    ):
        super().__init__()
        self.build_in, self.lr, self.two_groups, self.scheduler = build_in, lr, two_groups, scheduler
        self.model = tiny_llama() if build_in == "init" else None
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def setup(self, stage: str) -> None:
        if self.build_in == "setup" and self.model is None:
            self.model = tiny_llama()

    def configure_model(self) -> None:
        if self.build_in == "configure_model" and self.model is None:
            self.model = tiny_llama()

    def loss(self, batch) -> torch.Tensor:
        (ids,) = batch
        # No cache while training (a wrapped activation checkpoint would replay the cache update on recompute).
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.val_losses.append(loss.item())
        self.log("val_loss", loss)

    test_step = validation_step

    def configure_optimizers(self):
        if self.two_groups:
            decay = [p for n, p in self.named_parameters() if not n.endswith("bias") and "norm" not in n]
            no_decay = [p for n, p in self.named_parameters() if n.endswith("bias") or "norm" in n]
            groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
        else:
            groups = self.parameters()
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int = 1, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    defaults.update(kwargs)
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        defaults["enable_checkpointing"] = True
    return pl.Trainer(callbacks=callbacks, **defaults)


def lora_param_names(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("build_in", ["init", "setup", "configure_model"])
def test_injects_at_every_build_site_and_trains_only_adapters(tmp_path, build_in):
    module = CausalLM(build_in)
    reference = tiny_llama().state_dict()  # same seed: the base weights the module builds
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=3)
    trainer.fit(module, token_loader())

    layers = [n for n, m in module.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4  # q_proj and v_proj of 2 layers
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(trained) == lora_param_names(module.model)
    # lora_B starts at zero: after 3 steps it moved; every base tensor is bit-identical to the original.
    assert all(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)
    for key, value in module.model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    assert all(p.grad is None for n, p in module.model.named_parameters() if "lora_" not in n)


def test_optimizer_holds_exactly_the_trainable_parameters_with_groups_and_scheduler(tmp_path):
    module = CausalLM(two_groups=True, scheduler=True)
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=4)
    trainer.fit(module, token_loader())

    (optimizer,) = trainer.optimizers
    assert len(optimizer.param_groups) == 2  # groups kept: the scheduler holds per-group state
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == 8  # lora_A + lora_B for 4 layers
    assert sum(p.numel() for p in in_optimizer) == count_parameters(module)["trainable"]
    assert {id(p) for p in in_optimizer} == {id(p) for p in module.parameters() if p.requires_grad}
    # StepLR(step_size=2, gamma=0.5) after 4 steps: lr = 1e-2 * 0.5**2 in both groups
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-3, 2.5e-3])


def test_parameter_counts_logged_at_fit_start(tmp_path):
    module = CausalLM()
    callback = PEFTCallback(QV, target="model")
    make_trainer(tmp_path, [callback], max_steps=1).fit(module, token_loader())
    # q: A (8x64) + B (64x8); v: A (8x64) + B (32x8) (2 key/value heads of 16); 2 layers
    expected = 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))
    assert callback.parameter_counts["trainable"] == expected
    assert callback.parameter_counts["total"] == sum(p.numel() for p in module.parameters())
    assert callback.parameter_counts["trainable_percent"] == pytest.approx(
        100 * expected / callback.parameter_counts["total"]
    )


def test_validate_and_test_do_not_inject_twice(tmp_path):
    module = CausalLM()
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=2)
    trainer.fit(module, token_loader())
    names_after_fit = lora_param_names(module)
    trainer.validate(module, token_loader(batches=1), verbose=False)
    trainer.test(module, token_loader(batches=1), verbose=False)
    assert lora_param_names(module) == names_after_fit
    assert not any(".base_layer.base_layer" in n for n, _ in module.named_parameters())
    # the hooks wrapped on the instance for the run are restored at teardown
    assert not {"configure_model", "configure_optimizers", "on_save_checkpoint", "on_load_checkpoint"} & set(
        vars(module)
    )


def test_checkpoint_holds_only_adapters_and_their_optimizer_state(tmp_path):
    # Large enough that the adapter/base ratio is realistic: r=8 on q,v of a 256-wide model.
    def wide_llama():
        return tiny_llama(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=2048,
        ).train()  # fmt: skip

    def fit(adapter_only: bool, directory: Path) -> dict:
        module = CausalLM()
        module.model = wide_llama()
        callback = PEFTCallback(QV, target="model", adapter_only_checkpoints=adapter_only)
        checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
        make_trainer(tmp_path, [callback, checkpoint], max_steps=2).fit(module, token_loader())
        return torch.load(directory / "last.ckpt", weights_only=True)

    adapter_ckpt = fit(True, tmp_path / "adapter")
    full_ckpt = fit(False, tmp_path / "full")

    keys = list(adapter_ckpt["state_dict"])
    assert len(keys) == 8 and all(".lora_A.default." in k or ".lora_B.default." in k for k in keys)
    assert adapter_ckpt["lightning_peft"]["adapter_keys"] == keys
    (opt_state,) = adapter_ckpt["optimizer_states"]
    assert len(opt_state["state"]) == 8  # AdamW moments for the 8 adapter tensors, nothing else
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_ckpt["state_dict"].values())
    full_bytes = sum(t.numel() * t.element_size() for t in full_ckpt["state_dict"].values())
    assert adapter_bytes / full_bytes < 0.02
    assert set(keys) < set(full_ckpt["state_dict"])


def test_save_weights_only_checkpoint_is_adapter_only(tmp_path):
    module = CausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=True)
    make_trainer(tmp_path, [PEFTCallback(QV, target="model"), checkpoint], max_steps=2).fit(
        module, token_loader()
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in saved
    assert set(saved["state_dict"]) == {f"model.{k}" for k in lora_keys(module.model)}


def lora_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict() if "lora_" in k]


def test_resume_from_adapter_checkpoint_is_exact(tmp_path):
    def run(max_epochs: int, ckpt_path: str | None = None, dirpath: Path | None = None) -> CausalLM:
        module = CausalLM(scheduler=True)
        callbacks = [PEFTCallback(LoRA(r=4, target_modules="all-linear", dropout=0.0), target="model")]
        if dirpath is not None:
            callbacks.append(ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0))
        trainer = make_trainer(tmp_path, callbacks, max_epochs=max_epochs)
        trainer.fit(module, token_loader(), ckpt_path=ckpt_path)
        return module

    uninterrupted = run(4)
    first_half = run(2, dirpath=tmp_path / "ckpt")
    resumed = run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    assert len(uninterrupted.losses) == 16
    assert first_half.losses + resumed.losses == uninterrupted.losses  # bit-identical trajectory
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_validate_and_test_from_adapter_checkpoint(tmp_path):
    trained = CausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model"), checkpoint], max_steps=4)
    trainer.fit(trained, token_loader())
    expected = make_trainer(tmp_path, []).validate(trained, token_loader(batches=2), verbose=False)[0][
        "val_loss"
    ]

    fresh = CausalLM()  # same base weights, untrained adapters
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")])
    before = trainer.validate(fresh, token_loader(batches=2), verbose=False)[0]["val_loss"]
    got = trainer.validate(
        fresh, token_loader(batches=2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False
    )
    tested = trainer.test(
        fresh, token_loader(batches=2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False
    )
    assert got[0]["val_loss"] == pytest.approx(expected, abs=1e-6)
    assert tested[0]["val_loss"] == pytest.approx(expected, abs=1e-6)
    assert abs(before - expected) > 1e-4  # the checkpoint's adapters made the difference


def test_checkpoint_missing_adapter_keys_is_refused(tmp_path):
    module = CausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [PEFTCallback(QV, target="model"), checkpoint], max_steps=1).fit(
        module, token_loader()
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    dropped = "model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    del saved["state_dict"][dropped]
    torch.save(saved, tmp_path / "broken.ckpt")

    fresh = CausalLM()
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")])
    with pytest.raises(KeyError, match=r"lacks 1 adapter tensors.*v_proj\.lora_B"):
        trainer.validate(
            fresh, token_loader(batches=1), ckpt_path=str(tmp_path / "broken.ckpt"), verbose=False
        )


def test_merge_on_fit_end_folds_adapters_and_keeps_outputs(tmp_path):
    module = CausalLM()
    make_trainer(tmp_path, [PEFTCallback(QV, target="model", merge_on_fit_end=True)], max_steps=3).fit(
        module, token_loader()
    )
    layers = [m for m in module.model.modules() if isinstance(m, LoraLayer)]
    assert all(m.merged_adapters == ["default"] for m in layers)
    ids = token_loader(batches=1).dataset.tensors[0]
    merged = module.model(ids).logits
    for layer in layers:
        layer.unmerge()
    unmerged = module.model(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_merge_on_fit_end_refused_for_unmergeable_method():
    @dataclass(kw_only=True)
    class NoMerge(LoRA):
        mergeable = False

    with pytest.raises(ValueError, match="cannot be merged"):
        PEFTCallback(NoMerge(target_modules=["q_proj"]), merge_on_fit_end=True)


class PlainModule(pl.LightningModule):
    """A LightningModule that *is* the network (target=None): convs, embedding and linears as direct children."""

    def __init__(self):
        super().__init__()
        self.net = MLPConv()
        self.inputs = MLPConv.example_inputs(batch=8)
        self.targets = torch.arange(8) % 4

    def training_step(self, batch, batch_idx):
        logits = self.net(*self.inputs)
        return torch.nn.functional.cross_entropy(logits, self.targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_module_with_convs_and_no_target(tmp_path):
    module = PlainModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    method = LoRA(
        r=2, target_modules=["conv2d", "conv1d", "pointwise", "embed", "fc1"], modules_to_save=["fc2"]
    )
    make_trainer(tmp_path, [PEFTCallback(method)], max_steps=3).fit(
        module, DataLoader(range(3), batch_size=1)
    )
    state = module.state_dict()
    changed = {k for k in state if k in before and not torch.equal(state[k], before[k])}
    assert (
        changed == set()
    )  # every original tensor (now under .base_layer or the frozen original head) untouched
    assert not torch.equal(state["net.fc2.modules_to_save.default.weight"], before["net.fc2.weight"])
    assert any("lora_embedding_B" in k for k in state)


def test_bert_classifier_head_in_modules_to_save(tmp_path):
    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert_classifier()
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, VOCAB, (6, 10), generator=g)
            self.labels = torch.tensor([0, 1, 2, 0, 1, 2])

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=self.ids, labels=self.labels).loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = Classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    method = LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    make_trainer(tmp_path, [PEFTCallback(method, target="model"), checkpoint], max_steps=3).fit(
        module, DataLoader(range(3), batch_size=1)
    )
    keys = set(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"])
    assert {
        "model.classifier.modules_to_save.default.weight",
        "model.classifier.modules_to_save.default.bias",
    } < keys
    assert all("lora_" in k or "modules_to_save" in k for k in keys)
    assert len(keys) == 2 + 2 * 2 * 2  # head (w, b) + (A, B) x (query, value) x 2 layers


def test_missing_target_names_the_children(tmp_path):
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="backbone")], max_steps=1)
    with pytest.raises(AttributeError, match=r"no such submodule.*\['model'\]"):
        trainer.fit(CausalLM(), token_loader())


def test_optimizer_built_before_injection_is_refused(tmp_path):
    class Eager(CausalLM):
        def __init__(self):
            super().__init__()
            self.optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)  # sees no adapters

        def configure_optimizers(self):
            return self.optimizer

    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=1)
    with pytest.raises(ValueError, match="created before the adapters were injected"):
        trainer.fit(Eager(), token_loader())


def test_spawn_launchers_are_refused():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="strategy='ddp'"):
        PEFTCallback(QV, target="model").setup(trainer, CausalLM(), "fit")


def test_callback_rejects_non_method():
    with pytest.raises(TypeError, match="PEFTMethod"):
        PEFTCallback({"r": 8})


@dataclass(kw_only=True)
class CountingLoRA(LoRA):
    """LoRA plus an L2 pull on lora_A and a record of the per-step hook (what AdaLoRA-like methods use)."""

    penalty: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.calls: list[tuple[int, int | None]] = []

    def on_optimizer_step(self, model, adapter_name, step, total_steps):
        assert adapter_name == "default"
        self.calls.append((step, total_steps))

    def extra_loss(self, model, adapter_name):
        assert adapter_name == "default"
        if not self.penalty:
            return None
        return self.penalty * sum((p**2).sum() for n, p in model.named_parameters() if "lora_A" in n)


def test_per_step_hook_runs_once_per_optimizer_step_with_accumulation(tmp_path):
    method = CountingLoRA(target_modules=["q_proj"])
    trainer = make_trainer(
        tmp_path, [PEFTCallback(method, target="model")], max_epochs=2, accumulate_grad_batches=2
    )
    trainer.fit(CausalLM(), token_loader(batches=4))
    assert method.calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 8 batches / 2 accumulated = 4 steps


def test_extra_loss_gradient_equals_adding_it_to_the_loss(tmp_path):
    penalty = 0.5

    class WithPenalty(CausalLM):
        def training_step(self, batch, batch_idx):
            reg = sum((p**2).sum() for n, p in self.model.named_parameters() if "lora_A" in n)
            return self.loss(batch) + penalty * reg

    via_hook = CausalLM()
    make_trainer(tmp_path, [PEFTCallback(CountingLoRA(target_modules=["q_proj"], penalty=penalty), target="model")],
                 max_steps=3, accumulate_grad_batches=2).fit(via_hook, token_loader(batches=6))  # fmt: skip
    in_loss = WithPenalty()
    make_trainer(tmp_path, [PEFTCallback(LoRA(target_modules=["q_proj"]), target="model")],
                 max_steps=3, accumulate_grad_batches=2).fit(in_loss, token_loader(batches=6))  # fmt: skip
    for (name, a), (_, b) in zip(
        via_hook.model.named_parameters(), in_loss.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    plain = CausalLM()
    make_trainer(tmp_path, [PEFTCallback(LoRA(target_modules=["q_proj"]), target="model")], max_steps=3,
                 accumulate_grad_batches=2).fit(plain, token_loader(batches=6))  # fmt: skip
    a_plain = plain.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    a_hook = via_hook.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a_hook.norm() < a_plain.norm()  # the penalty did act


def test_inject_directly_then_callback_with_same_method_is_a_no_op(tmp_path):
    module = CausalLM()
    inject(module.model, QV)
    names = lora_param_names(module)
    make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=1).fit(module, token_loader())
    assert lora_param_names(module) == names
    other = LoRA(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already injected"):
        make_trainer(tmp_path, [PEFTCallback(other, target="model")], max_steps=1).fit(module, token_loader())


def test_save_checkpoint_after_fit_is_adapter_only_and_loads_back(tmp_path):
    """After fit, teardown has given the module its own on_save_checkpoint back; the callback's hook still filters."""
    module = CausalLM()
    callback = PEFTCallback(QV, target="model")
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(module, token_loader())
    assert "on_save_checkpoint" not in vars(module)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    saved = torch.load(tmp_path / "after_fit.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in lora_keys(module.model)}
    assert saved["lightning_peft"]["adapter_keys"] == list(saved["state_dict"])
    (opt_state,) = saved["optimizer_states"]
    assert len(opt_state["state"]) == len(saved["state_dict"])


def test_weights_only_save_checkpoint_after_fit_is_adapter_only_too(tmp_path):
    """Lightning runs no callback hook for ``weights_only=True`` and teardown has given the module its own hook back:
    the filter at the write (the callback's AtomicCheckpointIO) keeps the promise; a merged model stays whole."""
    module = CausalLM()
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model")], max_steps=2)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in lora_keys(module.model)}
    assert saved["lightning_peft"]["adapter_keys"] == list(saved["state_dict"])
    assert "optimizer_states" not in saved
    merged = CausalLM()
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model", merge_on_fit_end=True)], max_steps=2)
    trainer.fit(merged, token_loader())
    trainer.save_checkpoint(tmp_path / "merged_weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "merged_weights.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(merged.state_dict()) and "lightning_peft" not in saved


def test_save_checkpoint_after_merge_on_fit_end_is_the_full_merged_model(tmp_path):
    module = CausalLM()
    trainer = make_trainer(tmp_path, [PEFTCallback(QV, target="model", merge_on_fit_end=True)], max_steps=2)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "merged.ckpt")
    saved = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(module.state_dict())
