"""The checks every method passes, for your own method too: ``from lightning_peft.testing import check_method``.

Written once for any method on any tiny model, so every method is held to the same contract: identity (or
documented) output at init, only its parameters train, save/load roundtrip, merge equivalence (or a clear
refusal), disabling and unloading give the base model back, named adapters switch, gradient checkpointing gives
gradients to the same parameters, and training through ``PEFTCallback`` lowers the loss. :func:`check_method` runs
them all; each ``assert_*`` is also usable alone. They raise ``AssertionError`` (any test runner reports them).

Example (``examples/custom_method.py`` is a method written outside the package that passes them)::

    from lightning_peft.testing import check_method, tiny_llama

    check_method(tiny_llama, MyMethod(), tmp_dir)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import (
    PEFTCallback,
    adapter_state_dict,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unload,
    unmerge,
)
from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer, ModulesToSave, to_peft_key
from lightning_peft.core.injection import adapter_state_keys
from lightning_peft.methods import NotMergeableError, PEFTMethod
from lightning_peft.testing.models import VOCAB, tiny_bert_classifier, tiny_llama, token_batch

Build = Callable[[], nn.Module]


@contextlib.contextmanager
def raises(error: type[BaseException], match: str | None = None) -> Iterator[None]:
    """Assert that the block raises ``error`` whose message matches the regex ``match`` (as ``pytest.raises``)."""
    try:
        yield
    except error as raised:
        if match is not None and not re.search(match, str(raised)):
            raise AssertionError(
                f"{type(raised).__name__}({str(raised)!r}) does not match {match!r}"
            ) from raised
        return
    raise AssertionError(f"{error.__name__} was not raised")


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_batch()).logits


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor no adapter owns, cloned."""
    owned = set(adapter_state_keys(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in owned}


def randomise(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Move every trainable tensor away from its init, as training would (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(scale * torch.randn(p.shape, generator=g))


# --- METHODS.md acceptance checks -----------------------------------------------------------------------------
def assert_init_is_identity(build: Build, method: PEFTMethod) -> None:
    model = build()
    expected = logits(model)
    assert torch.equal(logits(inject(model, method)), expected)


def assert_trains_only_its_parameters(build: Build, method: PEFTMethod, steps: int = 3) -> set[str]:
    """A few Adam steps: exactly the adapter's tensors change; frozen parameters never get a gradient."""
    model = inject(build(), method)
    adapter_keys = set(adapter_state_keys(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_keys(model, parameters_only=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):  # zero-initialised factors (up, E) pass gradients on from step 2
        optimizer.zero_grad()
        logits(model).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == adapter_keys
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []
    return changed


def assert_roundtrip(build: Build, method: PEFTMethod, directory: Path) -> nn.Module:
    """save_adapter -> load_adapter on a fresh base: the same tensors, the same outputs, no base weights."""
    model = inject(build(), method)
    randomise(model)
    with torch.no_grad():
        expected = logits(model)
    state = adapter_state_dict(model)
    save_adapter(model, directory)
    saved = load_file(directory / "adapter_model.safetensors")
    assert set(saved) == {to_peft_key(k, "default") for k in state}  # adapter tensors only
    loaded = load_adapter(build(), directory)
    loaded_state = adapter_state_dict(loaded)
    assert set(loaded_state) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded_state[key], value, atol=1e-6, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)
    return loaded


def assert_merge_matches(build: Build, method: PEFTMethod, scale: float = 0.05) -> None:
    """Merge, merge twice, unmerge and merge_and_unload keep the outputs of a trained (randomised) adapter."""
    model = build()
    base_out = logits(model).detach()
    inject(model, method)
    randomise(model, scale=scale)
    original_base = base_state(model)
    with torch.no_grad():
        out = logits(model)
    assert (out - base_out).abs().max() > 1e-2

    merge(model)
    merged_base = base_state(model)
    assert any(not torch.equal(merged_base[k], v) for k, v in original_base.items())
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=1e-5)
    merge(model)  # idempotent: a second merge must not apply the update twice
    for key, value in base_state(model).items():
        assert torch.equal(value, merged_base[key]), key
    unmerge(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=1e-5)
    for key, value in base_state(model).items():
        torch.testing.assert_close(value, original_base[key], atol=1e-6, rtol=1e-6, msg=key)

    plain = merge_and_unload(model)
    assert adapter_layers(plain) == []
    assert set(plain.state_dict()) == set(build().state_dict())
    torch.testing.assert_close(logits(plain), out, atol=1e-5, rtol=1e-5)


def assert_non_finite_merge_is_refused(build: Build, method: PEFTMethod, poison: str) -> None:
    """A NaN in the last adapted layer's ``poison`` tensor: merge refuses and changes no layer."""
    model = inject(build(), method)
    last = [layer for _, layer in adapter_layers(model) if not isinstance(layer, ModulesToSave)][-1]
    with torch.no_grad():
        next(p for n, p in last.named_parameters() if poison in n).fill_(float("nan"))
    before = base_state(model)
    with raises(ValueError, match="NaN/Inf"):
        merge(model)
    for key, value in base_state(model).items():
        assert torch.equal(value, before[key]), key
    assert not any(layer.merged for _, layer in adapter_layers(model))


def assert_not_mergeable(build: Build, method: PEFTMethod) -> None:
    model = inject(build(), method)
    before = base_state(model)
    with raises(NotMergeableError, match=rf"{method.name} \(adapter 'default'\) cannot be merged"):
        merge(model)
    with raises(NotMergeableError):
        merge_and_unload(model)
    for key, value in base_state(model).items():
        assert torch.equal(value, before[key]), key
    with raises(ValueError, match="cannot be merged"):
        PEFTCallback(method, merge_on_fit_end=True)


def assert_disable_gives_base(build: Build, method: PEFTMethod, mergeable: bool) -> None:
    model = build()
    base_out = logits(model)
    inject(model, method)
    randomise(model)
    out = logits(model)
    assert (out - base_out).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(logits(model), base_out)
    assert torch.equal(logits(model), out)
    if mergeable:
        merge(model)
        with disable_adapters(model):  # a merged adapter is unmerged to run the base: equal up to rounding
            torch.testing.assert_close(logits(model), base_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=1e-5)


def assert_unload_restores_base(build: Build, method: PEFTMethod) -> None:
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    base_out = logits(model)
    inject(model, method)
    randomise(model)
    assert not torch.equal(logits(model), base_out)
    assert unload(model) is model
    assert adapter_layers(model) == []
    assert list(model.state_dict()) == list(original)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert torch.equal(logits(model), base_out)


def assert_named_adapters_switch(
    build: Build, make_method: Callable[[], PEFTMethod], directory: Path
) -> None:
    """Two adapters of the method in one model: each runs alone when active, and saves/loads on its own."""
    model = inject(build(), make_method(), adapter_name="first")
    randomise(model, seed=1)
    first = logits(model).detach()
    inject(model, make_method(), adapter_name="second")  # now active: only its tensors are trainable
    randomise(model, seed=2)
    second = logits(model).detach()
    assert (first - second).abs().max() > 1e-4
    shared = [layer for _, layer in adapter_layers(model) if not isinstance(layer, ModulesToSave)]
    assert shared and all(layer.adapter_names() == ["first", "second"] for layer in shared)
    set_adapter(model, "first")
    assert torch.equal(logits(model), first)
    save_adapter(model, directory, adapter_name="second")
    assert torch.equal(logits(load_adapter(build(), directory)), second)


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    assert hf.set_activation_checkpointing(model, True, use_reentrant=use_reentrant)


def checkpointing_grads(
    build: Build, make_method: Callable[[], PEFTMethod], mode: str
) -> dict[str, torch.Tensor]:
    """Gradients of one backward pass with ``mode`` in ``none``, ``reentrant``, ``non_reentrant``."""
    model = build().train()
    if mode != "none":
        _enable_checkpointing(model, use_reentrant=mode == "reentrant")
    inject(model, make_method())
    randomise(model)  # non-zero factors everywhere, so every adapter tensor gets a gradient
    calls: list[int] = []
    first_block = next(m for n, m in model.named_modules() if n.endswith("layers.0") or n.endswith("layer.0"))
    # A hook inside the block: a checkpointed block re-runs its forward, not its own __call__, in backward.
    first_linear = next(m for m in first_block.modules() if isinstance(m, (nn.Linear, AdapterLayer)))
    first_linear.register_forward_hook(lambda *_: calls.append(1))
    logits(model).square().mean().backward()
    assert len(calls) == (1 if mode == "none" else 2)  # checkpointed blocks run again in backward
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_checkpointing_gives_same_grads(build: Build, make_method: Callable[[], PEFTMethod]) -> None:
    expected = checkpointing_grads(build, make_method, "none")
    assert expected and all(g.abs().sum() > 0 for g in expected.values())
    for mode in ("reentrant", "non_reentrant"):
        grads = checkpointing_grads(build, make_method, mode)
        assert set(grads) == set(expected), mode
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=f"{mode}: {name}")


# --- training through PEFTCallback ----------------------------------------------------------------------------
class TinyTask(pl.LightningModule):
    """Causal LM on token ids, or sequence classification with labels, on a fixed tiny batch."""

    def __init__(self, build: Build, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = build()
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        is_classifier = "SequenceClassification" in type(self.model).__name__
        loss = self.model(input_ids=ids, labels=labels if is_classifier else ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def fit_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 sequences of 12 tokens and 3-class labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, 3, (4,), generator=g)


def fit(
    build: Build, method: PEFTMethod, steps: int = 8, lr: float = 1e-2, callbacks: list | None = None
) -> TinyTask:
    """Train ``steps`` optimizer steps on one repeated batch."""
    ids, labels = fit_batch()
    data = DataLoader(TensorDataset(ids.repeat(steps, 1), labels.repeat(steps)), batch_size=4, shuffle=False)
    module = TinyTask(build, lr)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        callbacks=[PEFTCallback(method, target="model"), *(callbacks or [])],
    )  # fmt: skip
    trainer.fit(module, data)
    return module


def assert_trains_through_callback(
    build: Build, method: PEFTMethod, lr: float = 1e-2, identity_at_init: bool = True
) -> TinyTask:
    """PEFTCallback training lowers the loss and changes the adapter's tensors, nothing else."""
    module = fit(build, method, steps=8, lr=lr)
    losses = module.losses
    assert len(losses) == 8
    if identity_at_init:  # the first step ran the untrained adapter: the base model's loss
        base = TinyTask(build)
        with torch.no_grad():
            assert abs(losses[0] - base.training_step(list(fit_batch()), 0).item()) <= 1e-6
    assert losses[-1] < 0.99 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    owned = set(adapter_state_keys(module.model))
    reference = build().state_dict()
    for key, value in module.model.state_dict().items():
        if key not in owned:  # wrapped base layers sit under `.base_layer`
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} <= owned
    return module


FAMILIES: dict[str, Build] = {"llama": tiny_llama, "bert": tiny_bert_classifier}


def check_method(
    make_method: Callable[[], PEFTMethod],
    directory: Path,
    build: Build = tiny_llama,
    *,
    identity_at_init: bool = True,
) -> None:
    """Every check above for one method on one model family: what a method must pass to be one.

    For methods whose adapter file holds their state-dict tensors under peft's key names: every method but the soft
    prompts, whose files hold peft's ``prompt_embeddings`` instead (their own tests run the single checks).

    Args:
        make_method: Builds the method with the settings to check, e.g. ``lambda: MyMethod(r=4)``.
        directory: An empty directory the save/load checks write into.
        build: Builds a fresh base model (default: :func:`tiny_llama`); its ``forward(input_ids=...)`` returns
            ``.logits``.
        identity_at_init: Whether the method leaves the output unchanged before training (LoRA-style zero-initialised
            updates); soft prompts and bottleneck adapters with random init do not.

    Raises:
        AssertionError: naming the check that failed.
    """
    directory = Path(directory)
    method = make_method()
    if identity_at_init:
        assert_init_is_identity(build, make_method())
    assert_trains_only_its_parameters(build, make_method())
    assert_roundtrip(build, make_method(), directory / "roundtrip")
    if method.mergeable:
        assert_merge_matches(build, make_method())
    else:
        assert_not_mergeable(build, make_method())
    assert_disable_gives_base(build, make_method(), mergeable=method.mergeable)
    assert_unload_restores_base(build, make_method())
    assert_named_adapters_switch(build, make_method, directory / "named")
    assert_checkpointing_gives_same_grads(build, make_method)
    assert_trains_through_callback(build, make_method(), identity_at_init=identity_at_init)
