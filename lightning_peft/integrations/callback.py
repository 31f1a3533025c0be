"""PEFTCallback: parameter-efficient fine-tuning for any LightningModule.

Lightning has no hook that runs after every place a user may build a model
(``__init__``, ``setup``, ``configure_model``) yet before the strategy wraps it
(DDP/FSDP) and creates optimizers. The callback therefore wraps, on the module
*instance*, four hooks for the duration of a run:

* ``configure_model``: run the user's, then inject (Lightning calls it after
  ``LightningModule.setup`` and before wrapping; a plain closure without
  ``__wrapped__`` makes ``is_overridden`` see it);
* ``configure_optimizers``: run the user's, then drop frozen parameters from every
  param group in place (groups are kept, so LR schedulers stay valid);
* ``on_save_checkpoint`` / ``on_load_checkpoint``: keep only adapter weights (the
  module hook runs even with ``save_weights_only=True``) and refuse a checkpoint
  that lacks adapter keys before anything is loaded; the method's non-parameter
  training state (:meth:`~lightning_peft.methods.PEFTMethod.training_state`) is
  written to and restored from the ``lightning_peft`` entry.

The callback knows nothing about any single method: per-method behaviour comes
through the :class:`~lightning_peft.methods.PEFTMethod` hooks.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.core.adapter_layer import ModulesToSave, adapter_layers
from lightning_peft.core.contract import PEFTMethod, method_class
from lightning_peft.core.injection import (
    adapter_state_keys,
    clean_key,
    count_parameters,
    inject,
    injection_record,
    merge,
    prepare_gradient_checkpointing,
    state_dict_key,
)
from lightning_peft.formats.atomic_io import AtomicCheckpointIO
from lightning_peft.formats.peft_directory import refuse_non_finite
from lightning_peft.integrations import deepspeed as deepspeed_support
from lightning_peft.integrations.distributed import refuse_mixed_storage, refuse_unshardable_quantization
from lightning_peft.integrations.gradient_flow import InputGradientProbe

CHECKPOINT_KEY = "lightning_peft"
_PATCHED_HOOKS = ("configure_model", "configure_optimizers", "on_save_checkpoint", "on_load_checkpoint")
_ORIGINAL = "_lightning_peft_original"
_OWNER = "_lightning_peft_owner"


def report_parameter_counts(
    trainer: pl.Trainer, pl_module: pl.LightningModule, what: str
) -> dict[str, float]:
    """Count the module's parameters, print "lightning-peft: <what> trains N of M parameters (P%)" (the line
    the benchmarks parse) and log them as ``peft/*`` metrics at step 0; returns the counts."""
    counts = count_parameters(pl_module)
    rank_zero_info(
        f"lightning-peft: {what} trains {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({counts['trainable_percent']:.4f}%)"
    )
    metrics = {
        f"peft/{k}_params" if k != "trainable_percent" else "peft/trainable_percent": v
        for k, v in counts.items()
    }
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=0)
    return counts


class PEFTCallback(Callback):
    """Inject a PEFT method into a LightningModule, train only its parameters, checkpoint only them.

    Example::

        from lightning_peft import PEFTCallback
        from lightning_peft.methods import LoRA

        trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, target_modules=["q_proj", "v_proj"]), target="model")])
        trainer.fit(my_module)          # my_module.model gets LoRA; checkpoints hold only lora_ weights
        trainer.fit(my_module, ckpt_path="last.ckpt")   # resumes exactly

    Args:
        method: The method and its hyperparameters.
        target: Dotted path of the submodule to adapt (e.g. ``"model"``); ``None`` adapts the whole module.
        adapter_only_checkpoints: Write only adapter weights (and their optimizer state) to checkpoints.
        merge_on_fit_end: Fold the adapter into the base weights when ``fit`` ends (mergeable methods only).
        adapter_name: Name of the adapter inside the model.
        non_finite: What a NaN/inf gradient (a diverged loss, inf in the inputs) does: ``"raise"`` stops training
            before that optimizer step, naming the step; ``"skip"`` drops that step's gradients and goes on (the
            decision is taken on all-reduced gradients, so every rank takes the same). Either way a checkpoint
            with non-finite adapter tensors is neither written nor resumed from. ``"allow"`` checks nothing.
            Under fp16 mixed precision the gradient scaler skips such steps itself and no check runs.

    Raises:
        ValueError: ``merge_on_fit_end=True`` for a method that cannot merge, or an unknown ``non_finite``.
    """

    def __init__(
        self,
        method: PEFTMethod,
        target: str | None = None,
        adapter_only_checkpoints: bool = True,
        merge_on_fit_end: bool = False,
        adapter_name: str = "default",
        non_finite: Literal["raise", "skip", "allow"] = "raise",
    ) -> None:
        if not isinstance(method, PEFTMethod):
            raise TypeError(
                f"PEFTCallback expects a PEFTMethod such as LoRA(...), got {type(method).__name__}."
            )
        if merge_on_fit_end and not method.mergeable:
            raise ValueError(
                f"merge_on_fit_end=True, but {method.name} cannot be merged into the base weights."
            )
        if non_finite not in ("raise", "skip", "allow"):
            raise ValueError(f"non_finite={non_finite!r} must be one of 'raise', 'skip', 'allow'.")
        self.method = method
        self.non_finite = non_finite
        self.target = target
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_name = adapter_name
        self.parameter_counts: dict[str, float] = {}
        self._last_global_step = -1
        self._total_steps: int | None = None
        self._gradients_checked = False
        self._probe: InputGradientProbe | None = None

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's checkpoint state by this: two PEFTCallbacks (other targets or adapters) differ.
        return self._generate_state_key(target=self.target, adapter_name=self.adapter_name)

    # --- where the model lives -------------------------------------------------------------------------------
    def target_module(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.target is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.target)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise AttributeError(
                f"PEFTCallback(target={self.target!r}): {type(pl_module).__name__} has no such submodule after "
                f"setup/configure_model; its children are {children}. Pass the attribute that holds the model."
            ) from None

    def _prefix(self) -> str:
        return f"{self.target}." if self.target else ""

    def adapter_keys(self, pl_module: pl.LightningModule) -> list[str]:
        """Checkpoint keys (relative to the LightningModule, without wrapper segments) of every adapter tensor."""
        return [self._prefix() + k for k in adapter_state_keys(self.target_module(pl_module))]

    def checkpoint_keys(self, pl_module: pl.LightningModule) -> list[str]:
        """What an adapter-only checkpoint holds: the adapter's tensors and every other tensor that trains.

        A trainable module beside the target (a user's head next to ``target="backbone"``) trains, so it is
        saved; keys are compared without wrapper segments (``_orig_mod.`` of a compiled submodule, ...).
        """
        keys = self.adapter_keys(pl_module)
        known = set(keys)
        keys += [
            k for n, p in pl_module.named_parameters() if p.requires_grad and (k := clean_key(n)) not in known
        ]
        return list(dict.fromkeys(keys))

    # --- setup: wrap the module's hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _refuse_multiprocessing_launcher(trainer)
        refuse_unshardable_quantization(trainer.strategy, self.method)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # Lightning's own write is copied from TMPDIR when the checkpoint directory is on another filesystem:
            # a kill then leaves a partial file under the final name.
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            module = weakref.ref(pl_module)
            trainer.strategy.checkpoint_io.before_save = lambda checkpoint: self._filter_unhooked(
                module(), checkpoint
            )
        if self.method.may_have_unused_parameters:
            ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
            if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("static_graph"):
                ddp_kwargs.setdefault("find_unused_parameters", True)
        if deepspeed_support.is_deepspeed(trainer):
            deepspeed_support.prepare_deepspeed(trainer, self.adapter_only_checkpoints, self.non_finite)
        self._wrap(pl_module, "configure_model", self._configure_model)
        self._wrap(pl_module, "configure_optimizers", self._configure_optimizers)
        self._wrap(pl_module, "on_save_checkpoint", self._on_save_checkpoint)
        self._wrap(pl_module, "on_load_checkpoint", self._on_load_checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        for hook in _PATCHED_HOOKS:
            current = pl_module.__dict__.get(hook)
            if getattr(current, _OWNER, None) is self:
                original = getattr(current, _ORIGINAL)
                if original is None:
                    del pl_module.__dict__[hook]
                else:
                    pl_module.__dict__[hook] = original

    def _wrap(self, pl_module: pl.LightningModule, hook: str, body: Callable[..., Any]) -> None:
        current = pl_module.__dict__.get(hook)
        # Re-running setup replaces our own wrapper; another PEFTCallback's wrapper is wrapped in turn.
        own = getattr(current, _OWNER, None) is self
        instance_original = (
            getattr(current, _ORIGINAL) if own else current
        )  # None: the hook comes from the class
        original = (
            instance_original
            if instance_original is not None
            else getattr(type(pl_module), hook).__get__(pl_module)
        )

        # A plain closure, deliberately without functools.wraps: is_overridden follows __wrapped__.
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return body(pl_module, original, *args, **kwargs)

        setattr(wrapper, _ORIGINAL, instance_original)
        setattr(wrapper, _OWNER, self)
        pl_module.__dict__[hook] = wrapper

    def _configure_model(self, pl_module: pl.LightningModule, original: Callable[[], None]) -> None:
        original()
        model = self.target_module(pl_module)
        record = injection_record(model)
        if record is not None and self.adapter_name in record.methods:
            if record.methods[self.adapter_name] != self.method:
                raise ValueError(
                    f"{type(pl_module).__name__}: adapter '{self.adapter_name}' is already injected with "
                    f"{record.methods[self.adapter_name]}; this callback asks for {self.method}."
                )
            return  # hooks re-run for every stage: inject once
        trainer = getattr(pl_module, "_trainer", None)
        if trainer is not None:
            refuse_mixed_storage(trainer.strategy, model)
        with deepspeed_support.plain_parameters(trainer):
            inject(model, self.method, self.adapter_name)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        # Not when resuming (ckpt_path): the checkpoint's tensors, and their shapes, replace it in on_load_checkpoint.
        if self.method.needs_training_data() and fitting and not trainer.ckpt_path:
            self._initialize_from_data(trainer, model)
        if self.adapter_only_checkpoints:
            # Base weights are not in our checkpoints; adapter keys are checked in on_load_checkpoint.
            pl_module.strict_loading = False

    def _initialize_from_data(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """A data-driven init (EVA) over the train loader, before the strategy wraps the model and optimizers
        exist; every process then takes rank 0's result (so DDP replicas agree even on shuffled data)."""
        loader = trainer.fit_loop._data_source.dataloader()
        if trainer.strategy.root_device != next(model.parameters()).device and trainer.num_devices == 1:
            model.to(trainer.strategy.root_device)  # where the strategy would move it next, and the data goes
        rank_zero_info(f"{self.method.name} '{self.adapter_name}': initialising from the train loader")
        self.method.initialize_from_data(
            model, self.adapter_name, loader, broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0)
        )

    def _configure_optimizers(self, pl_module: pl.LightningModule, original: Callable[[], Any]) -> Any:
        result = original()
        optimizers = list(_find_optimizers(result))
        if not optimizers:  # None (no optimization) or something Lightning will reject itself
            return result
        in_optimizers: set[int] = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                # In place, keeping every group: schedulers hold per-group state (initial_lr, ...).
                group["params"] = [p for p in group["params"] if p.requires_grad]
                in_optimizers.update(id(p) for p in group["params"])
        left_out = [
            name for name, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizers
        ]
        if left_out:
            raise ValueError(
                f"configure_optimizers returned optimizers that do not hold {len(left_out)} trainable adapter "
                f"parameters (e.g. {left_out[:3]}): they were created before the adapters were injected (an optimizer "
                "built in __init__, or LightningCLI's top-level `optimizer:`). Build the optimizer inside "
                "configure_optimizers from self.parameters()."
            )
        return result

    def _on_save_checkpoint(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], checkpoint: dict
    ) -> None:
        original(checkpoint)
        keys = self.checkpoint_keys(pl_module)
        checkpoint[CHECKPOINT_KEY] = {
            "adapter_name": self.adapter_name,
            "target": self.target,
            "method": self.method.config_dict(),
            "adapter_keys": keys,
            # Non-parameter training state (e.g. AdaLoRA's importance EMAs), restored in _on_load_checkpoint.
            "training_state": self.method.training_state(self.target_module(pl_module), self.adapter_name),
        }
        if "state_dict" in checkpoint:
            state = checkpoint["state_dict"]
            wanted = set(keys)
            kept = {k: v for k, v in state.items() if clean_key(k) in wanted}
            # Empty on ranks that write nothing (full-state FSDP gathers on rank 0): nothing to check there.
            missing = sorted(set(keys) - {clean_key(k) for k in kept}) if state else []
            if missing:
                raise RuntimeError(
                    f"The checkpoint would lack {len(missing)} of the {len(keys)} tensors that train, e.g. "
                    f"{missing[:5]}: the module's state_dict names them differently from its parameters (a wrapper "
                    "lightning-peft does not know?). Nothing was written; inject into the unwrapped model, or "
                    "report the wrapper."
                )
            if self.non_finite != "allow":
                refuse_non_finite(
                    kept,
                    "The checkpoint",
                    "nothing was written (PEFTCallback(non_finite='allow') writes it).",
                )
            if self.adapter_only_checkpoints:
                # Written without wrapper segments: a checkpoint from a compiled run loads into a plain one too.
                checkpoint["state_dict"] = {clean_key(k): v for k, v in kept.items()}

    def _on_load_checkpoint(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], checkpoint: dict
    ) -> None:
        original(checkpoint)
        self._refuse_other_hyperparameters(checkpoint)
        state = checkpoint.get("state_dict")
        if (
            state is not None
        ):  # back to the live names (a compiled submodule's _orig_mod.), before Lightning loads it
            checkpoint["state_dict"] = state = {
                state_dict_key(pl_module, clean_key(k)): v for k, v in state.items()
            }
        # state is None: sharded strategies load weights through their own planner
        wanted = self.checkpoint_keys(pl_module) if state is not None else []
        trainer = getattr(pl_module, "_trainer", None)
        if state is None and trainer is not None and deepspeed_support.is_deepspeed(trainer):
            # The engine loaded non-strictly (no base weights in the checkpoint): check the adapter was there.
            deepspeed_support.require_adapter_tensors(trainer.ckpt_path, self.checkpoint_keys(pl_module))
        present = {clean_key(k) for k in state} if state is not None else set()
        missing = [k for k in wanted if k not in present]
        if state is not None:
            prefix = self._prefix()
            # Shapes that came from data (EVA's ranks) follow the checkpoint; then the key and shape checks run.
            self.method.fit_to_checkpoint(
                self.target_module(pl_module),
                self.adapter_name,
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
            )
            wanted = self.checkpoint_keys(pl_module)
            missing = [k for k in wanted if k not in present]
            self._refuse_other_shapes(pl_module, state)
        if missing:
            raise KeyError(
                f"The checkpoint lacks {len(missing)} adapter tensors of {self.method.name}, e.g. {missing[:5]}. "
                "It was written for another method, target or target_modules (or before PEFT was added); load it "
                "with the same PEFTCallback configuration it was trained with."
            )
        if state is not None and self.non_finite != "allow":
            wanted = set(wanted)
            refuse_non_finite(
                {k: v for k, v in state.items() if clean_key(k) in wanted and isinstance(v, torch.Tensor)},
                "The checkpoint",
                "nothing was loaded (PEFTCallback(non_finite='allow') loads it).",
            )
        training_state = (checkpoint.get(CHECKPOINT_KEY) or {}).get("training_state")
        if training_state is None and (trainer is None or trainer.state.fn != TrainerFn.FITTING):
            return  # an older checkpoint evaluated, not resumed: nothing restarts, no warning
        self.method.load_training_state(self.target_module(pl_module), self.adapter_name, training_state)

    def _refuse_other_shapes(self, pl_module: pl.LightningModule, state: dict) -> None:
        # Named here, before Lightning's load_state_dict would print a page of size mismatches.
        live = {clean_key(n): t for n, t in (*pl_module.named_parameters(), *pl_module.named_buffers())}
        wrong = [
            f"{key} {tuple(value.shape)} vs {tuple(live[key].shape)}"
            for k, value in state.items()
            if isinstance(value, torch.Tensor)
            and (key := clean_key(k)) in live
            and value.shape != live[key].shape
        ]
        if wrong:
            raise ValueError(
                f"The checkpoint's tensors do not fit this model: {len(wrong)} differ in shape (checkpoint vs "
                f"model), e.g. {wrong[:3]}. It was trained on another base model; resume with the base it was "
                "written for."
            )

    def _refuse_other_hyperparameters(self, checkpoint: dict) -> None:
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("method")
        if not isinstance(saved, dict):
            return  # written without PEFTCallback or by an older version: the key check below still runs
        ours = self.method.config_dict()
        init_only = set(self.method.init_only_fields)
        theirs_args, ours_args = saved.get("init_args") or {}, ours["init_args"]
        differ = [
            f"{k}: checkpoint {theirs_args.get(k)!r}, callback {ours_args.get(k)!r}"
            for k in sorted(set(theirs_args) | set(ours_args))
            if k not in init_only and theirs_args.get(k) != ours_args.get(k)
        ]
        saved_path = saved.get("class_path")
        if not isinstance(saved_path, str) or method_class(saved_path) is not type(self.method):
            differ.insert(0, f"method: checkpoint {saved.get('class_path')}, callback {ours['class_path']}")
        if differ:
            raise ValueError(
                f"The checkpoint was trained with other {self.method.name} settings than this PEFTCallback's: "
                f"{'; '.join(differ)}. Resume with the settings it was written with; to train on with new ones, "
                "start a new run from its adapter (load_adapter(..., is_trainable=True))."
            )

    # --- training-time hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.target_module(pl_module)
        prepare_gradient_checkpointing(model)
        # The user's own torch.utils.checkpoint(use_reentrant=True) would starve the adapters inside it.
        self._probe = InputGradientProbe(model)
        self.parameter_counts = report_parameter_counts(
            trainer, pl_module, f"{self.method.name} '{self.adapter_name}'"
        )
        self._last_global_step = trainer.global_step
        self._gradients_checked = False
        # Read at the first step: estimated_stepping_batches now would set the loader up before a resume restores it.
        self._total_steps = None
        self._report_trainable_outside_target(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.adapter_only_checkpoints:
            return
        # Running statistics change in train() mode; unless a method or modules_to_save owns them, no checkpoint
        # or adapter file holds them, so a reload would not reproduce the trained model.
        replaced = {
            id(m.base_layer) for m in pl_module.modules() if isinstance(m, ModulesToSave)
        }  # never run
        drifting = [
            clean_key(name)
            for name, m in pl_module.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            and id(m) not in replaced
            and m.training
            and m.track_running_stats
        ]
        if drifting:
            saved = set(self.checkpoint_keys(pl_module))
            drifting = [name for name in drifting if f"{name}.running_mean" not in saved]
        if drifting:
            rank_zero_warn(
                f"lightning-peft: {len(drifting)} BatchNorm layers update their running statistics in training, but "
                f"adapter-only checkpoints do not hold them (e.g. {drifting[:3]}): reloading would not reproduce "
                "the trained model. Put them in the method's modules_to_save, or keep them in eval() mode."
            )

    def _report_trainable_outside_target(self, pl_module: pl.LightningModule) -> None:
        if self.target is None:
            return
        # From parameter names only: nothing here may touch a state_dict (FSDP units must not initialise yet).
        outside = [
            k
            for n, p in pl_module.named_parameters()
            if p.requires_grad and not (k := clean_key(n)).startswith(self._prefix())
        ]
        if outside:
            rank_zero_info(
                f"lightning-peft: {len(outside)} trainable tensors outside target {self.target!r} train and are saved "
                f"in checkpoints beside the adapter: {outside[:5]}{' ...' if len(outside) > 5 else ''} (freeze them "
                "to leave them out)."
            )

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._probe is not None and not self._probe.decided and self._probe.decide(loss):
            rank_zero_info(
                "lightning-peft: the model uses reentrant activation checkpointing; its frozen inputs now require "
                "grad so the adapters inside the checkpoints train."
            )

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._gradients_checked:
            self._gradients_checked = True
            _warn_about_tensors_without_gradient(_gradients(trainer, pl_module), pl_module)
        model = self.target_module(pl_module)
        extra = self.method.extra_loss(model, self.adapter_name)
        if extra is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale *= scaler.get_scale()
        # autograd.grad + manual accumulation: a second .backward() would re-fire DDP's reducer hooks. The term
        # depends only on adapter weights, identical on every rank, so its gradient needs no all-reduce.
        grads = torch.autograd.grad(extra * scale, params, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
        pl_module.log("peft/extra_loss", extra.detach(), on_step=True, prog_bar=False)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.non_finite == "allow" or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        # After the all-reduce: every rank sees the same gradients and so takes the same decision.
        grads = _gradients(trainer, pl_module)
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(list(grads.values())))).all()):
            return
        bad = [clean_key(n) for n, g in grads.items() if not bool(torch.isfinite(g).all())]
        params = [p for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        message = (
            f"lightning-peft: step {trainer.global_step} (epoch {trainer.current_epoch}) has NaN/inf gradients in "
            f"{len(bad)} trainable tensors, e.g. {bad[:3]} (a diverged loss, or NaN/inf in the batch)"
        )
        if self.non_finite == "skip":
            for p in params:
                p.grad = None
            rank_zero_warn(f"{message}; the step is skipped (PEFTCallback(non_finite='skip')).")
            return
        raise FloatingPointError(
            f"{message}. Training stopped before the optimizer step, so the adapter and its checkpoints stay "
            "finite. Lower the learning rate or check the data; PEFTCallback(non_finite='skip') skips such steps."
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_global_step:
            return  # still accumulating gradients: no optimizer step happened
        self._last_global_step = trainer.global_step
        if self._total_steps is None:
            total = trainer.estimated_stepping_batches
            self._total_steps = int(total) if math.isfinite(total) else -1
        total_steps = self._total_steps if self._total_steps >= 0 else None
        self.method.on_optimizer_step(
            self.target_module(pl_module), self.adapter_name, trainer.global_step, total_steps
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        """``trainer.save_checkpoint`` outside a run (after ``fit``, when teardown has given the module its own
        ``on_save_checkpoint`` back): the same adapter-only filter. During a run the wrapped module hook does it (it
        also runs for weights-only checkpoints, which skip callback hooks); after ``merge_on_fit_end`` the
        checkpoint is the merged model's, in full."""
        if getattr(pl_module.__dict__.get("on_save_checkpoint"), _OWNER, None) is self:
            return
        target = self.target_module(pl_module)
        layers = [layer for _, layer in adapter_layers(target)]
        if not layers or any(self.adapter_name in layer.merged_adapters for layer in layers):
            return  # not injected (yet), or merged into the base weights: the full model is the checkpoint
        self._on_save_checkpoint(pl_module, lambda _: None, checkpoint)

    def _filter_unhooked(self, pl_module: pl.LightningModule | None, checkpoint: dict) -> None:
        """At the write, a checkpoint no hook of ours saw: ``trainer.save_checkpoint(path, weights_only=True)``
        after ``fit`` (Lightning runs no callback hook for a weights-only save, and teardown has given the module
        its own hook back) gets the same adapter-only filter as every other checkpoint."""
        if pl_module is None or CHECKPOINT_KEY in checkpoint or "state_dict" not in checkpoint:
            return
        self.on_save_checkpoint(pl_module._trainer, pl_module, checkpoint)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_fit_end:
            merge(self.target_module(pl_module), [self.adapter_name])
            rank_zero_info(
                f"lightning-peft: merged {self.method.name} '{self.adapter_name}' into the base weights"
            )


def _gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The gradients of the trainable parameters by name (DeepSpeed keeps them in its own buffers)."""
    if deepspeed_support.is_deepspeed(trainer):
        return deepspeed_support.full_gradients(pl_module)
    return {n: p.grad for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None}


def _warn_about_tensors_without_gradient(
    grads: dict[str, torch.Tensor], pl_module: pl.LightningModule
) -> None:
    """After the first backward every trainable tensor should have a gradient; one that has none never trains."""
    silent = [n for n, p in pl_module.named_parameters() if p.requires_grad and n not in grads]
    if silent:
        rank_zero_warn(
            f"lightning-peft: {len(silent)} trainable tensors got no gradient in the first backward, e.g. "
            f"{silent[:4]}: they will not train. Likely causes: reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True)) over frozen inputs - use use_reentrant=False; an "
            "input detached from the graph; a module that reads its children's weights instead of calling them; "
            "or a part of the model the loss does not use."
        )


def _find_optimizers(obj: Any) -> Iterator[torch.optim.Optimizer]:
    """Every optimizer in what configure_optimizers may return (optimizer, lists, tuples, dicts, nestings)."""
    if isinstance(obj, torch.optim.Optimizer):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _find_optimizers(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _find_optimizers(item)


def _refuse_multiprocessing_launcher(trainer: pl.Trainer) -> None:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        raise ValueError(
            "PEFTCallback does not support spawn/fork launchers (strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook'): "
            "they copy weights back into a parent process that was never injected, silently dropping the trained "
            "adapters. Use strategy='ddp' (or torchrun / SLURM)."
        )
