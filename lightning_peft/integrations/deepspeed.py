"""DeepSpeed ZeRO support for adapted models: adapter-only engine checkpoints, their resume, and ZeRO on CPU.

DeepSpeed writes checkpoints through its engine (a directory: ``checkpoint/mp_rank_00_model_states.pt`` with the
module's tensors, ``checkpoint/*optim_states.pt`` with each rank's fp32 partitions and optimizer state) and never
sees the dict that :class:`~lightning_peft.PEFTCallback` filters. What the callback does instead, through
:func:`prepare_deepspeed` and :func:`require_adapter_tensors`:

* **Adapter-only checkpoints.** ``DeepSpeedStrategy(exclude_frozen_parameters=True)`` leaves frozen tensors out of
  the engine's files. With ``adapter_only_checkpoints=True`` the callback sets it when the user did not, and says
  so once.
* **Resume.** The engine then loads a checkpoint that lacks the base weights; Lightning passes
  ``load_module_strict=pl_module.strict_loading``, which the callback sets to ``False`` at injection. Non-strict
  loading would also accept a checkpoint that lacks adapter tensors (another ``target_modules``), so the callback
  reads the engine's model-states file first and refuses one that does not hold every tensor that trains.

:class:`PEFTDeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy`` with ``exclude_frozen_parameters=True`` by
default that also runs on the CPU (DeepSpeed's CPU accelerator, gloo between processes): Lightning refuses
``accelerator="cpu"`` in three CUDA-only places (the accelerator check, the device-index check, and the engine's
``device_rank``, which is ``None`` for the CPU device). On GPUs it behaves as Lightning's strategy.

Example::

    from lightning_peft.integrations.deepspeed import PEFTDeepSpeedStrategy

    strategy = PEFTDeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True)
    trainer = L.Trainer(strategy=strategy, callbacks=[PEFTCallback(LoRA(r=8), target="model")])
    trainer.fit(module)                                   # checkpoints: a directory holding only the adapter
    trainer.fit(module, ckpt_path="checkpoints/last.ckpt")  # resumes exactly
"""

from __future__ import annotations

import inspect
from collections.abc import Generator, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

# The engine's model-states files of a checkpoint written by Lightning (tag "checkpoint"): ZeRO-2 writes
# mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank (same keys).
_MODEL_STATES = "checkpoint/*mp_rank_00_model_states.pt"


def is_deepspeed(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


# Lightning 2.6 added DeepSpeedStrategy(exclude_frozen_parameters=...); before, its checkpoints held every weight.
_NEEDS_LIGHTNING = (
    "DeepSpeed checkpoints hold only the adapter with DeepSpeedStrategy(exclude_frozen_parameters=True), which "
    "Lightning added in 2.6: pip install 'lightning>=2.6' (or PEFTCallback(adapter_only_checkpoints=False))."
)


def supports_exclude_frozen_parameters() -> bool:
    return "exclude_frozen_parameters" in inspect.signature(DeepSpeedStrategy.__init__).parameters


def prepare_deepspeed(trainer: pl.Trainer, adapter_only_checkpoints: bool, non_finite: str) -> None:
    """Called from ``PEFTCallback.setup``: make a DeepSpeed run write adapter-only checkpoints.

    The engine saves every parameter unless ``exclude_frozen_parameters=True``: a multi-GB checkpoint per save for
    a few MB of adapter. With ``adapter_only_checkpoints=True`` the flag is set (it only changes what is saved).

    Raises:
        ValueError: ``non_finite="skip"``: the engine steps from its own gradient buffers, so dropping
            ``param.grad`` would not skip the step.
    """
    if non_finite == "skip":
        raise ValueError(
            "PEFTCallback(non_finite='skip') cannot skip a step under DeepSpeed: the engine steps from its own "
            "gradient buffers. Use non_finite='raise' (the default: training stops before the step) or 'allow'."
        )
    strategy = trainer.strategy
    if adapter_only_checkpoints and not supports_exclude_frozen_parameters():
        raise RuntimeError(_NEEDS_LIGHTNING)
    if adapter_only_checkpoints and not strategy.exclude_frozen_parameters:
        strategy.exclude_frozen_parameters = True
        rank_zero_info(
            "lightning-peft: DeepSpeedStrategy(exclude_frozen_parameters=True) set, so that DeepSpeed's checkpoints "
            "hold only the adapter (PEFTCallback(adapter_only_checkpoints=False) keeps the base weights in them)."
        )


@contextmanager
def plain_parameters(trainer: pl.Trainer | None) -> Generator[None, None, None]:
    """Build modules with ordinary parameters inside Lightning's ``deepspeed.zero.Init`` context (ZeRO-3).

    Lightning runs ``configure_model`` under ``zero.Init``, which partitions every parameter as its module is
    created, so adapter layers built there would be initialised on empty partitions (LoRA's B not zero: training
    would not start from the base model). Injected outside it, the adapter is initialised as without DeepSpeed and
    the engine partitions it when it is built; a base model created under ``zero.Init`` stays partitioned.
    """
    if trainer is None or not is_deepspeed(trainer):
        yield
        return
    from deepspeed.runtime.zero import partition_parameters

    active = partition_parameters.top_level_context is not None
    if active:
        partition_parameters.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            partition_parameters.restore_init_context()


def require_adapter_tensors(checkpoint_path: str | Path, keys: Iterable[str]) -> None:
    """Refuse a DeepSpeed checkpoint directory whose model states lack some of ``keys`` (module-relative keys).

    Run on resume, because the engine loads non-strictly (the base weights are not in the checkpoint) and would
    otherwise silently keep fresh adapters for missing tensors.

    Raises:
        KeyError: tensors that train are not in the checkpoint (written for another adapter configuration).
        FileNotFoundError: ``checkpoint_path`` is not a DeepSpeed checkpoint directory written by Lightning.
    """
    states = min(Path(checkpoint_path).glob(_MODEL_STATES), default=None)
    if states is None:
        raise FileNotFoundError(
            f"{checkpoint_path} is not a DeepSpeed checkpoint written by Lightning: {_MODEL_STATES} is missing. "
            "Resume a DeepSpeed run from the directory its ModelCheckpoint wrote (e.g. checkpoints/last.ckpt/)."
        )
    # The file also holds Lightning's client state (loops, callbacks): not loadable with weights_only=True.
    stored = torch.load(states, map_location="cpu", weights_only=False, mmap=True)
    present = {k.removeprefix("module.") for k in stored.get("module") or {}}
    present |= {k.removeprefix("module.") for names in stored.get("param_shapes") or [] for k in names}
    missing = [k for k in keys if k not in present]
    if missing:
        raise KeyError(
            f"The DeepSpeed checkpoint {checkpoint_path} lacks {len(missing)} tensors that train, e.g. {missing[:5]}. "
            "It was written for another method, target or target_modules; resume with the PEFTCallback it was "
            "trained with."
        )


def adapter_tensors_from_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    """The trained tensors of an adapter-only DeepSpeed checkpoint directory, full (unpartitioned) and in fp32.

    Works for ZeRO stage 2 and 3 and any number of ranks, on the CPU, without a process group: DeepSpeed's own
    ``get_fp32_state_dict_from_zero_checkpoint`` merges the per-rank fp32 partitions. Keys are those of the
    LightningModule's ``state_dict`` (e.g. ``model.model.layers.0.self_attn.q_proj.lora_A.default.weight``).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoint_path), tag="checkpoint", exclude_frozen_parameters=True
    )
    return dict(state)


class PEFTDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` for adapted models, also on the CPU.

    * ``exclude_frozen_parameters=True`` by default: checkpoints hold only the adapter (and its optimizer state).
    * ``accelerator="cpu"`` runs (DeepSpeed's CPU accelerator, gloo), e.g. ZeRO-3 with parameter and optimizer
      offload on a machine without GPUs, or for testing. Lightning's strategy refuses it.
    * With ``offload_optimizer=True`` a torch optimizer from ``configure_optimizers`` is allowed
      (``zero_force_ds_cpu_optimizer: False``); DeepSpeed would otherwise insist on its own ``DeepSpeedCPUAdam``,
      which it compiles at run time. Pass ``config={...}`` with ``zero_force_ds_cpu_optimizer: true`` to keep that.

    * On the CPU, DeepSpeed's shared-memory all-reduce is not used unless ``cpu_shm_comm=True``: DeepSpeed
      compiles it with g++ when the first process group is created (35-75 s here), and a PEFT run all-reduces
      only adapter gradients, which gloo handles in milliseconds.

    * ZeRO-3: ``configure_model`` builds ordinary parameters (the engine partitions them when it is built), not
      under Lightning's ``deepspeed.zero.Init``: injection reads the base layers' weight shapes, which are empty
      partitions there, and ``transformers``' ``from_pretrained`` fails there (its weight initialisation indexes
      them). Each process therefore holds the whole base model once, before the engine partitions it.

    Args:
        *args: Passed to ``DeepSpeedStrategy``.
        exclude_frozen_parameters: Leave frozen tensors out of checkpoints.
        cpu_shm_comm: On the CPU, let DeepSpeed build and use its shared-memory communicator.
        **kwargs: Passed to ``DeepSpeedStrategy``.
    """

    def __init__(
        self,
        *args: Any,
        exclude_frozen_parameters: bool = True,
        cpu_shm_comm: bool = False,
        **kwargs: Any,
    ) -> None:
        if not supports_exclude_frozen_parameters():
            raise RuntimeError(_NEEDS_LIGHTNING)
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        self._init_config_if_needed()
        yield

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"PEFTDeepSpeedStrategy on accelerator='cpu', but DeepSpeed uses its "
                f"{get_accelerator().device_name()!r} accelerator: set the environment variable DS_ACCELERATOR=cpu."
            )
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # Lightning's version first checks that device indices equal the local ranks: CPU devices have no index.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        if self.cpu_shm_comm:
            return self._init_deepspeed_distributed()
        import sys

        import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is the torch package)

        backend = sys.modules["deepspeed.comm.torch"]
        original = backend.build_shm_op
        backend.build_shm_op = lambda: None  # read once, when DeepSpeed creates its communication backend
        try:
            self._init_deepspeed_distributed()
        finally:
            backend.build_shm_op = original

    def _init_config_if_needed(self) -> None:
        super()._init_config_if_needed()
        zero = (self.config or {}).get("zero_optimization") or {}
        if zero.get("offload_optimizer") and "optimizer" not in self.config:
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._engine_device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._engine_device_rank():
            return super()._initialize_deepspeed_inference(*args, **kwargs)

    @contextmanager
    def _engine_device_rank(self) -> Generator[None, None, None]:
        # Lightning passes args.device_rank=root_device.index, None for the CPU device, and DeepSpeed's engine
        # compares it with 0 (TypeError). On the CPU the local rank is the right value (DeepSpeed's own default).
        if not self._on_cpu:
            yield
            return
        import deepspeed

        original = deepspeed.initialize

        def initialize(*args: Any, **kwargs: Any) -> Any:
            namespace = kwargs.get("args")
            if namespace is not None and getattr(namespace, "device_rank", 0) is None:
                namespace.device_rank = self.local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original


def full_gradients(pl_module: pl.LightningModule) -> dict[str, Any]:
    """``{parameter name: full gradient}`` of every trainable parameter, under any ZeRO stage (collective: call it
    on every rank, after backward and before the optimizer step).

    DeepSpeed keeps gradients in its own (partitioned) buffers, so ``param.grad`` is ``None`` there; PEFTCallback's
    checks for missing and non-finite gradients read them through ``deepspeed.utils.safe_get_full_grad``.
    """
    from deepspeed.utils import safe_get_full_grad

    named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
    grads = {n: safe_get_full_grad(p) for n, p in named}  # every rank, same order: stage 3 gathers
    return {n: g for n, g in grads.items() if g is not None}
