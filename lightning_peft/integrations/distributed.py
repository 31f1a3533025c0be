"""FSDP support for adapted models: adapter FSDP units and resuming from adapter-only sharded checkpoints.

Two things Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` does not do for PEFT:

* **Gradient memory.** With ``use_orig_params=True`` a flat parameter that mixes frozen base weights and
  trainable adapter weights gets a gradient buffer for all of it. :func:`adapter_auto_wrap_policy` gives every
  module that holds only trainable parameters (``lora_A``/``lora_B`` Linears, bottleneck adapters, copies made by
  ``modules_to_save``) its own FSDP unit, so the frozen units need no gradient at all.
* **Resume.** PEFTCallback writes only adapter tensors; Lightning's sharded loader asks the checkpoint for every
  key of the model and fails with "Missing key in checkpoint state_dict" (Lightning issue #20274).
  :class:`PEFTFSDPStrategy` loads sharded checkpoints with ``DefaultLoadPlanner(allow_partial_load=True)``:
  tensors the checkpoint holds are restored, base weights keep the values the model was built with.

QLoRA: FSDP flattens a unit into one tensor of one dtype, so 4-bit codes must be stored in the float dtype of the
other weights (``QLoRA(quant_storage="float32")``); :func:`refuse_unshardable_quantization` and
:func:`refuse_mixed_storage` (run by PEFTCallback) refuse the other cases before anything is built. FSDP2 shards
each parameter on its own: there any storage works.

Both belong to the strategy rather than to :class:`~lightning_peft.PEFTCallback`: the wrap policy and the
checkpoint reader are strategy arguments/behaviour, and a callback cannot change how a strategy reads files.

Example::

    from lightning_peft.integrations.distributed import PEFTFSDPStrategy

    strategy = PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded")
    trainer = L.Trainer(strategy=strategy, callbacks=[PEFTCallback(LoRA(r=8), target="model")])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_peft.core.injection import clean_key
from lightning_peft.core.quantization import is_quantized_param as _is_quantized_param

# Parameter containers are read by their parent (no forward of their own): FSDP could never unshard them.
_NOT_CALLED = (nn.ParameterDict, nn.ParameterList)


def holds_only_trainable_parameters(module: nn.Module) -> bool:
    """Whether ``module`` owns (non-recursively) parameters and all of them require gradients."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own) and not isinstance(module, _NOT_CALLED)


def adapter_auto_wrap_policy(
    layer_classes: set[type[nn.Module]] | None = None,
) -> Callable[[nn.Module, bool, int], bool]:
    """An FSDP ``auto_wrap_policy``: adapter modules get their own units; optionally wrap ``layer_classes`` too.

    Must be applied after injection (PEFTCallback injects in ``configure_model``, before Lightning wraps), because
    it decides from ``requires_grad``. Modules holding parameters directly (IA3's scaling vectors) stay in their
    parent's unit, which ``use_orig_params=True`` (Lightning's default) allows.

    Args:
        layer_classes: Transformer block classes to wrap as well (e.g. ``{LlamaDecoderLayer}``), as with
            ``FSDPStrategy(auto_wrap_policy={...})``.

    Returns:
        A callable with FSDP's ``(module, recurse, nonwrapped_numel) -> bool`` signature.
    """
    classes = tuple(layer_classes or ())

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True  # always descend: adapters sit deep inside the blocks
        return holds_only_trainable_parameters(module) or (bool(classes) and isinstance(module, classes))

    return policy


class PEFTFSDPStrategy(FSDPStrategy):
    """:class:`~lightning.pytorch.strategies.FSDPStrategy` for adapted models.

    * ``auto_wrap_policy`` may be a set of layer classes (as in Lightning) or ``None``; it is combined with
      :func:`adapter_auto_wrap_policy` unless ``adapter_units=False``. A callable or ``_Policy`` is used unchanged.
    * Sharded checkpoints (``state_dict_type="sharded"``) resume from adapter-only checkpoints; a checkpoint that
      lacks a trainable parameter raises ``KeyError`` (it was written for another adapter configuration).

    Args:
        adapter_units: Give adapter modules their own FSDP units.
        *args: Passed to ``FSDPStrategy``.
        **kwargs: Passed to ``FSDPStrategy``.
    """

    def __init__(self, *args: Any, adapter_units: bool = True, **kwargs: Any) -> None:
        policy = kwargs.get("auto_wrap_policy")
        if adapter_units and (policy is None or isinstance(policy, (set, list, tuple))):
            kwargs["auto_wrap_policy"] = adapter_auto_wrap_policy(set(policy or ()))
        super().__init__(*args, **kwargs)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and self._state_dict_type == "sharded"):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return self._load_partial_sharded_checkpoint(path, weights_only)

    def _load_partial_sharded_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        # Lightning's sharded branch of FSDPStrategy.load_checkpoint, with a partial-load planner and a key check.
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _get_sharded_state_dict_context
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None and self.lightning_module is not None
        reader = FileSystemReader(path=path)
        _require_trainable_tensors(self.model, reader, prefix="model.", path=path)
        with _get_sharded_state_dict_context(self.model):
            module_state = {"model": self.model.state_dict()}
            load(module_state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
            self.model.load_state_dict(module_state["model"], strict=self.lightning_module.strict_loading)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                for idx, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    state = load_sharded_optimizer_state_dict(
                        model_state_dict=_trainable_only(module_state["model"], self.model),
                        optimizer_key=key,
                        storage_reader=reader,
                    )
                    flat = FSDP.optim_state_dict_to_load(
                        optim_state_dict=state[key], model=self.model, optim=optimizer
                    )
                    optimizer.load_state_dict(flat)
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def _require_trainable_tensors(model: nn.Module, reader: Any, prefix: str, path: Path) -> None:
    in_checkpoint = set(reader.read_metadata().state_dict_metadata)
    missing = [
        clean_key(n) for n, p in model.named_parameters() if p.requires_grad and prefix + clean_key(n) not in in_checkpoint
    ]  # fmt: skip
    if missing:
        raise KeyError(
            f"The sharded checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {missing[:5]}. It was written "
            "for another adapter configuration; resume with the PEFTCallback it was trained with."
        )


# --- 4-bit bases (QLoRA) ------------------------------------------------------------------------------------------
def refuse_unshardable_quantization(strategy: Any, method: Any) -> None:
    """At setup: refuse a QLoRA method whose 4-bit codes FSDP could not shard, before anything is built.

    FSDP (v1) flattens a unit's parameters into one tensor of one dtype: codes stored as uint8 (bitsandbytes'
    default) beside float weights fail deep inside FSDP ("Must flatten tensors with uniform dtype"). Stored in the
    float dtype of the other weights (``quant_storage="float32"``), they shard like them. FSDP2
    (``fully_shard``, ModelParallelStrategy) shards each parameter on its own, so any storage works there.
    """
    storage = getattr(method, "quant_storage", None)
    if storage is None:
        return
    if isinstance(strategy, FSDPStrategy) and storage == "uint8":
        raise ValueError(
            f"{type(method).__name__}(quant_storage='uint8') under {type(strategy).__name__}: FSDP flattens each unit "
            "into one tensor of a single dtype, and uint8 4-bit codes cannot share one with float weights. Pass "
            "quant_storage='float32' (the dtype of the other weights; 'bfloat16'/'float16' for a half-precision "
            "model with prepare_for_kbit_training=False): same bytes and outputs, and the codes are sharded."
        )


def refuse_mixed_storage(strategy: Any, model: nn.Module) -> None:
    """Before injection: refuse a model already holding bitsandbytes weights whose dtype FSDP cannot flatten
    with the model's float weights (e.g. loaded with transformers' ``BitsAndBytesConfig``, uint8 storage)."""
    if not isinstance(strategy, FSDPStrategy):  # FSDP2 shards parameter by parameter: any dtype mix works
        return
    quantized = {n: p.dtype for n, p in model.named_parameters() if _is_quantized_param(p)}
    if not quantized:
        return
    floats = {p.dtype for p in model.parameters() if p.is_floating_point() and not _is_quantized_param(p)}
    wrong = {n: d for n, d in quantized.items() if d not in floats}
    if floats and wrong:
        name, dtype = next(iter(wrong.items()))
        raise ValueError(
            f"{type(strategy).__name__}: {len(wrong)} quantized weights (e.g. {name}) are stored as {dtype}, the "
            f"model's float weights as {sorted(map(str, floats))}; FSDP needs one dtype per unit. Load the model "
            "with BitsAndBytesConfig(bnb_4bit_quant_storage=<that float dtype>), or let QLoRA(quant_storage=...) "
            "quantize it; 8-bit (LLM.int8) weights are int8 only: use DDP or PEFTModelParallelStrategy (FSDP2)."
        )


# --- FSDP2 (ModelParallelStrategy) -------------------------------------------------------------------------------
def fully_shard_adapted(
    model: nn.Module, mesh: Any, layer_classes: set[type[nn.Module]] | None = None, **fully_shard_kwargs: Any
) -> nn.Module:
    """Shard an adapted model with FSDP2 (``fully_shard``): adapter modules, then ``layer_classes``, then the root.

    Call it after injection (PEFTCallback injects when the user's ``configure_model`` returns; adapters built from
    local shards would have wrong shapes). Adapter modules get their own groups, as with
    :func:`adapter_auto_wrap_policy`, so frozen groups never need gradients.

    Args:
        model: The adapted model (no DTensor parameters yet).
        mesh: The data-parallel device mesh, e.g. ``strategy.device_mesh["data_parallel"]``.
        layer_classes: Transformer block classes that get their own groups too.
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``mp_policy``, ``reshard_after_forward``, ...).

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    policy = adapter_auto_wrap_policy(layer_classes)
    # Children before parents, as FSDP2 requires; the root is sharded last.
    for module in reversed(list(model.modules())):
        if module is not model and policy(module, False, 0):
            fully_shard(module, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def gathered_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unshard the DTensors of a state dict (collective: call it on every rank), e.g. ``adapter_state_dict(model)``."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


class PEFTModelParallelStrategy(ModelParallelStrategy):
    """:class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2) for adapted models.

    * If ``configure_model`` left the model unsharded, :func:`fully_shard_adapted` shards each child of the
      LightningModule over the data-parallel mesh (after PEFTCallback injected); a model the user sharded is left
      as it is. ``tensor_parallel_size`` > 1 needs the user's own plan in ``configure_model``.
    * Distributed checkpoints resume from adapter-only checkpoints (partial loading, as in
      :class:`PEFTFSDPStrategy`).

    Args:
        layer_classes: Transformer block classes that get their own FSDP2 groups.
        *args: Passed to ``ModelParallelStrategy``.
        **kwargs: Passed to ``ModelParallelStrategy``.
    """

    def __init__(self, *args: Any, layer_classes: set[type[nn.Module]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_classes = layer_classes

    def setup(self, trainer: Any) -> None:
        from lightning.fabric.strategies.model_parallel import _has_dtensor_modules

        assert self.model is not None
        if not _has_dtensor_modules(self.model):
            # Shard each child, not the LightningModule: Lightning calls training_step, never the module's forward,
            # so a root group there would never unshard its parameters.
            for child in self.model.children():
                if any(True for _ in child.parameters()):
                    fully_shard_adapted(child, self.device_mesh["data_parallel"], self.layer_classes)
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning's sharded branch of fabric's model_parallel._load_checkpoint, with partial loading.
        from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        assert self.model is not None and self.lightning_module is not None
        reader = FileSystemReader(path=path)
        _require_trainable_tensors(self.model, reader, prefix="state_dict.", path=path)
        module_state = {"state_dict": get_model_state_dict(self.model)}
        load(module_state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
        self.model.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, storage_reader=FileSystemReader(path=path))
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def _trainable_only(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    # Optimizer state exists only for trainable parameters: asking for the others' would fail as missing keys.
    trainable = {clean_key(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}
