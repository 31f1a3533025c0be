"""No silent loss: whatever trains is saved, whatever is injected is used - under torch.compile, Fabric, module
shapes users write (a head beside the backbone, PyTorch's own transformer layers, nn.Linear subclasses)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch import nn

from examples.fabric_loop import train as fabric_steps
from lightning_peft import PEFTCallback, adapter_state_dict, inject, load_adapter, merge, save_adapter
from lightning_peft.formats.peft_directory import WEIGHTS_NAME
from lightning_peft.integrations.fabric import InputGradientProbe, adapter_filter, trainable_parameters
from lightning_peft.methods import LoRA
from lightning_peft.methods.lora.layers import LoraLayer
from lightning_peft.testing.checks import randomise
from tests.test_callback import QV, CausalLM, make_trainer, token_loader
from tests.tiny_models import VOCAB, tiny_llama, token_batch

LORA_KEYS = 8  # lora_A + lora_B of q_proj and v_proj in 2 layers


def fit_twice_and_once(tmp_path: Path, build, callback_factory) -> tuple[list, list, dict]:
    """An uninterrupted 2-epoch run, and a run stopped after epoch 1 and resumed from its last checkpoint."""
    full = build()
    make_trainer(tmp_path / "full", [callback_factory()], max_epochs=2).fit(full, token_loader(batches=2))
    first = build()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(tmp_path / "first", [callback_factory(), checkpoint], max_epochs=1).fit(
        first, token_loader(batches=2)
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = build()
    make_trainer(tmp_path / "resumed", [callback_factory()], max_epochs=2).fit(
        resumed, token_loader(batches=2), ckpt_path=last
    )
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert len(full.losses) == 4 and len(first.losses) == len(resumed.losses) == 2
    return full.losses, first.losses + resumed.losses, saved


# --- 1. torch.compile ----------------------------------------------------------------------------------------
class CompiledCausalLM(CausalLM):
    """A user who compiles the model: in __init__, or in on_fit_start (after injection and optimizers)."""

    def __init__(self, where: str, backend: str = "aot_eager") -> None:
        super().__init__()
        self.where, self.backend = where, backend
        if where == "init":
            self.model = torch.compile(self.model, backend=backend)

    def on_fit_start(self) -> None:
        if self.where == "on_fit_start":
            self.model = torch.compile(self.model, backend=self.backend)


@pytest.mark.parametrize(
    ("where", "backend"),
    [
        ("init", "aot_eager"),
        ("on_fit_start", "aot_eager"),
        pytest.param("init", "inductor", marks=pytest.mark.slow),
    ],
)
def test_compiled_model_checkpoints_its_adapter_and_resumes_exactly(
    tmp_path: Path, where: str, backend: str
) -> None:
    full, resumed, saved = fit_twice_and_once(
        tmp_path, lambda: CompiledCausalLM(where, backend), lambda: PEFTCallback(QV, target="model")
    )
    assert len(saved) == LORA_KEYS and all(".lora_" in k for k in saved)
    assert resumed == full


def test_save_adapter_of_a_compiled_model_loads_into_a_plain_one(tmp_path: Path) -> None:
    model = torch.compile(inject(tiny_llama(), QV), backend="aot_eager")
    randomise(model)
    save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / WEIGHTS_NAME)) == LORA_KEYS
    assert all("_orig_mod" not in k for k in adapter_state_dict(model))
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(tiny_llama(), tmp_path)(ids).logits, model(ids).logits, atol=1e-5, rtol=0
        )


# --- 2. a head beside the adapted backbone -------------------------------------------------------------------
class BackboneAndHead(pl.LightningModule):
    """A tiny Llama's body as the backbone, the user's own linear head beside it (not under the target)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_llama().model
        torch.manual_seed(5)
        self.head = nn.Linear(64, VOCAB)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.head(self.backbone(input_ids=ids, use_cache=False).last_hidden_state)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_trainable_head_beside_the_target_is_saved_and_resumed(tmp_path: Path) -> None:
    full, resumed, saved = fit_twice_and_once(
        tmp_path, BackboneAndHead, lambda: PEFTCallback(QV, target="backbone")
    )
    assert {k for k in saved if not k.startswith("backbone.")} == {"head.weight", "head.bias"}
    assert sum(".lora_" in k for k in saved) == LORA_KEYS and len(saved) == LORA_KEYS + 2
    assert resumed == full


# --- 3. Lightning Fabric -------------------------------------------------------------------------------------
def fabric_setup(injected: nn.Module) -> tuple[Fabric, nn.Module, torch.optim.Optimizer]:
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(injected, torch.optim.AdamW(trainable_parameters(injected), lr=1e-2))
    return fabric, model, optimizer


def test_fabric_saves_only_the_adapter_and_resumes_exactly(tmp_path: Path) -> None:
    batches = [token_batch(seed=s) for s in range(4)]
    fabric, model, optimizer = fabric_setup(inject(tiny_llama(), QV))
    full = fabric_steps(fabric, model, optimizer, batches)

    fabric, model, optimizer = fabric_setup(inject(tiny_llama(), QV))
    first = fabric_steps(fabric, model, optimizer, batches[:2])
    state = {"model": model, "optimizer": optimizer, "step": 2}
    fabric.save(tmp_path / "ckpt.pt", state, filter={"model": adapter_filter(model)})
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert len(saved["model"]) == LORA_KEYS and all(".lora_" in k for k in saved["model"])

    fabric, model, optimizer = fabric_setup(inject(tiny_llama(), QV))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(tmp_path / "ckpt.pt", state, strict=False)
    assert state["step"] == 2
    assert first + fabric_steps(fabric, model, optimizer, batches[2:]) == full


def test_save_adapter_on_the_module_fabric_returns(tmp_path: Path) -> None:
    fabric, model, optimizer = fabric_setup(inject(tiny_llama(), QV))
    fabric_steps(fabric, model, optimizer, [token_batch()])
    assert len(adapter_state_dict(model)) == LORA_KEYS
    save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / WEIGHTS_NAME)) == LORA_KEYS
    ids = token_batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(tiny_llama(), tmp_path)(ids).logits, model(ids).logits, atol=1e-6, rtol=0
        )


def test_inject_after_fabric_setup_on_one_device_works(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = inject(fabric.setup_module(tiny_llama()), QV)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 4
    assert len(adapter_state_dict(model)) == LORA_KEYS
    save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / WEIGHTS_NAME)) == LORA_KEYS


def test_inject_after_data_parallel_wrapping_is_refused() -> None:
    model = nn.DataParallel(tiny_llama())
    with pytest.raises(ValueError, match=r"already wrapped in DataParallel.*Inject first, then wrap"):
        inject(model, QV)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_saving_zero_adapter_tensors_is_an_error(tmp_path: Path) -> None:
    class Renaming(nn.Module):  # a wrapper whose state_dict renames everything
        def __init__(self) -> None:
            super().__init__()
            self.inner = inject(tiny_llama(), QV)
            object.__setattr__(self, "_lightning_peft", self.inner._lightning_peft)

        def state_dict(self, *args, **kwargs):
            return {"renamed." + k: v for k, v in self.inner.state_dict().items()}

    with pytest.raises(RuntimeError, match=r"found 0 of the 8 tensors.*nothing was written"):
        save_adapter(Renaming(), tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()


# --- 4. modules that read their children's weights -----------------------------------------------------------
def encoder(seed: int = 0) -> nn.TransformerEncoder:
    """Lightning's demos.Transformer shape: PyTorch's own encoder layers, batch-first."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def test_transformer_encoder_layer_uses_lora_in_eval_as_the_merged_model_does() -> None:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    base = encoder()
    with torch.no_grad():
        base_out = base(x)
    model = inject(encoder(), LoRA(r=4, target_modules=["linear1", "linear2"]))
    randomise(model)
    with torch.no_grad():  # eval + no_grad: the conditions of PyTorch's fused fast path
        unmerged = model(x)
        merged = merge(model)(x)
    assert (unmerged - base_out).abs().max() > 1e-2  # the adapter acts...
    torch.testing.assert_close(
        unmerged, merged, atol=1e-5, rtol=0
    )  # ...in eval exactly as merged into the weights


def test_lora_on_multihead_attention_out_proj_is_refused_and_leaves_the_model_as_it_was() -> None:
    model = encoder()
    with pytest.raises(ValueError, match=r"inside nn.MultiheadAttention .* reads out_proj.weight directly"):
        inject(model, LoRA(r=4, target_modules=["out_proj", "linear1"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# --- 5. subclasses of the supported layers -------------------------------------------------------------------
class MyLinear(nn.Linear):
    """A user's subclass with its own forward (same computation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class ScaledEmbedding(nn.Embedding):
    """As BART's and Gemma 3's: the lookup times embed_scale."""

    def __init__(self, num: int, dim: int, embed_scale: float) -> None:
        super().__init__(num, dim)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = ScaledEmbedding(VOCAB, 16, embed_scale=4.0)
        self.proj = MyLinear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def test_subclasses_of_linear_and_embedding_get_lora_and_merge_exactly() -> None:
    model = inject(Subclassed(), LoRA(r=4, target_modules=["embed", "proj"]))
    assert {type(m.base_layer).__name__ for m in model.modules() if isinstance(m, LoraLayer)} == {
        "ScaledEmbedding", "MyLinear",
    }  # fmt: skip
    randomise(model)
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids)
        base = Subclassed()(ids)
        merged = merge(model)(ids)
    assert (unmerged - base).abs().max() > 1e-2
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=0)


def test_multihead_attention_projection_class_is_dispatched_not_a_key_error() -> None:
    out_proj = nn.MultiheadAttention(16, 2).out_proj  # NonDynamicallyQuantizableLinear
    holder = nn.Sequential(out_proj)
    model = inject(holder, LoRA(r=2, target_modules=["0"]))
    assert (
        isinstance(model[0], LoraLayer)
        and type(model[0].base_layer).__name__ == "NonDynamicallyQuantizableLinear"
    )


# --- 6. a tensor that gets no gradient -----------------------------------------------------------------------
class UserCheckpointed(CausalLM):
    """A user's module that runs the decoder layers itself: plainly, through torch.utils.checkpoint (reentrant or
    not), or on hidden states detached from the graph (a bug no hook can mend)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def loss(self, batch) -> torch.Tensor:
        (ids,) = batch
        body = self.model.model
        hidden = body.embed_tokens(ids)  # frozen: does not require grad
        positions = torch.arange(ids.shape[1])[None]
        rotary = body.rotary_emb(hidden, positions)
        for layer in body.layers:
            run = lambda h, layer=layer: layer(h, position_embeddings=rotary, position_ids=positions)  # noqa: E731
            if self.how == "detached":
                hidden = run(hidden).detach()
            elif self.how == "plain":
                hidden = run(hidden)
            else:
                hidden = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=self.how == "reentrant")
        logits = self.model.lm_head(body.norm(hidden))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _fit_user_checkpointed(tmp_path: Path, how: str) -> tuple[UserCheckpointed, PEFTCallback]:
    module = UserCheckpointed(how)
    callback = PEFTCallback(LoRA(r=8, target_modules=["q_proj", "v_proj", "lm_head"]), target="model")
    make_trainer(tmp_path / how, [callback], max_steps=3).fit(module, token_loader(batches=3))
    return module, callback


def test_reentrant_checkpointing_in_a_user_module_trains_the_adapters_inside_it(tmp_path: Path) -> None:
    plain, plain_callback = _fit_user_checkpointed(tmp_path, "plain")
    for how in ("reentrant", "non_reentrant"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*got no gradient.*")
            checkpointed, _ = _fit_user_checkpointed(tmp_path, how)
        assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-6), how
        ours, reference = adapter_state_dict(checkpointed.model), adapter_state_dict(plain.model)
        assert sorted(ours) == sorted(reference) and len(ours) == LORA_KEYS + 2
        for key in ours:  # B starts at zero: equal B after 3 steps means the gradients flowed
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{how}: {key}")
    # A model that does not checkpoint keeps no hook after the first step: its inputs never require grad again.
    embed = plain.model.model.embed_tokens
    assert not embed._forward_hooks and not plain.model._forward_pre_hooks and plain_callback._probe is None


def test_the_probe_in_a_hand_written_loop_keeps_its_hooks_only_under_reentrant_checkpoints() -> None:
    for how, kept in (("reentrant", True), ("non_reentrant", False), ("plain", False)):
        module = UserCheckpointed(how)
        inject(module.model, LoRA(r=8, target_modules=["q_proj", "v_proj"]))
        probe = InputGradientProbe(module.model)
        (ids,) = next(iter(token_loader(batches=1)))
        for _ in range(2):
            loss = module.loss((ids,))
            assert probe.decide(loss) is kept, how
            loss.backward()
        grads = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert grads == [], how
        assert bool(module.model.model.embed_tokens._forward_hooks) is kept, how


def test_tensors_without_gradient_at_the_first_step_are_named(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"8 trainable tensors got no gradient.*detached"):
        module, _ = _fit_user_checkpointed(tmp_path, "detached")
    trained = {n for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    assert trained == {"model.lm_head.lora_A.default.weight", "model.lm_head.lora_B.default.weight"}


# --- 9. norm statistics that change in training --------------------------------------------------------------
class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 2)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def image_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 6, 6, generator=g), torch.tensor([0, 1, 0, 1]))
    return torch.utils.data.DataLoader(data, batch_size=2)


@pytest.mark.parametrize("saved", [False, True])
def test_batchnorm_statistics_that_would_not_be_saved_are_named(tmp_path: Path, saved: bool) -> None:
    method = LoRA(r=2, target_modules=["0", "4"], modules_to_save=["1"] if saved else None)
    trainer = make_trainer(tmp_path, [PEFTCallback(method, target="net")], max_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ConvNet(), image_loader())
    named = [
        str(w.message) for w in record if "BatchNorm layers update their running statistics" in str(w.message)
    ]
    if saved:  # the trained copy of the norm layer holds its statistics
        assert named == []
    else:
        assert len(named) == 1 and "['net.1']" in named[0]


# --- 7. mid-epoch resume with a stateful loader --------------------------------------------------------------
class StatefulLoader(torch.utils.data.DataLoader):
    """A loader that resumes where it stopped: Lightning saves its state_dict and restores it mid-epoch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.consumed, self.skip = 0, 0

    def __iter__(self):
        for index, batch in enumerate(super().__iter__()):
            if index >= self.skip:
                self.consumed = index + 1
                yield batch
        self.skip = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["consumed"]


def test_mid_epoch_resume_from_a_step_checkpoint_continues_with_the_next_batch(tmp_path: Path) -> None:
    def loader() -> StatefulLoader:
        ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
        return StatefulLoader(torch.utils.data.TensorDataset(ids), batch_size=2)

    full = CausalLM()
    make_trainer(tmp_path / "full", [PEFTCallback(QV, target="model")], max_steps=4).fit(full, loader())
    first = CausalLM()
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path / "first", [PEFTCallback(QV, target="model"), every_2], max_steps=2).fit(
        first, loader()
    )
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = CausalLM()
    make_trainer(tmp_path / "resumed", [PEFTCallback(QV, target="model")], max_steps=4).fit(
        resumed, loader(), ckpt_path=checkpoint
    )
    assert (
        len(full.losses) == 4 and first.losses + resumed.losses == full.losses
    )  # batches 2 and 3, not 0 and 1
