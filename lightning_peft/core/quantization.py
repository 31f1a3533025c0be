"""bitsandbytes mechanics shared by QLoRA and by LoRA on quantized bases: quantize, dequantize, prepare, export.

* :func:`quantize` / :func:`quantize_linear`: ``nn.Linear`` -> bitsandbytes ``Linear4bit`` (NF4/FP4, blocks of 64,
  optional double quantization of the block scales), on CPU or CUDA;
* :func:`dequantize_weight` / :func:`dequantize`: back to floats, from 4-bit or 8-bit (LLM.int8) layers, however
  they were made (here, transformers' ``BitsAndBytesConfig``, Lightning's ``BitsandbytesPrecision``);
* :func:`prepare_model_for_kbit_training`: what peft's function of that name does, checkpointing apart;
* :func:`export_merged`: a merged full-precision copy for serving.

bitsandbytes is imported only when something is quantized, so ``import lightning_peft`` stays light; before that,
no module can be a bitsandbytes layer and :func:`is_quantized_linear` answers from ``sys.modules``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.linear import Linear as TorchLinear  # real even while Lightning patches nn.Linear

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.injection import injection_record, merge_and_unload
from lightning_peft.core.targeting import find_targets, name_matches, output_head_names, replace_module


def _bnb() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("QLoRA needs bitsandbytes: pip install 'bitsandbytes>=0.45'.") from error
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit Linear (nothing to check if bitsandbytes isn't loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes 4-bit or 8-bit weight (``Params4bit``/``Int8Params``)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params))


# --- layers -----------------------------------------------------------------------------------------------
_BLOCK = 64  # values per quantization block (bitsandbytes' 4-bit default)


def quantize_linear(
    linear: nn.Linear,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight in 4 bits (blocks of 64), on the weight's device.

    ``quant_storage`` is the dtype of the tensor the packed codes live in (two codes per byte either way, so the
    same bytes): ``torch.uint8``, or a float dtype, which lets FSDP flatten the codes with float weights.
    """
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage, device="meta",
    )  # fmt: skip
    weight = linear.weight.detach()
    params = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=quant_storage, module=layer,
    )  # fmt: skip
    layer.weight = params._quantize(weight.device)  # the one bitsandbytes entry point that also works on CPU
    if linear.bias is not None:
        layer.bias = linear.bias
    keep_portable_layout(layer)
    return layer.train(linear.training)


def keep_portable_layout(layer: nn.Module) -> None:
    """Keep a Linear4bit's codes in the standard bitsandbytes layout.

    On CPUs with AVX512-BF16, bitsandbytes repacks the codes at the first no-grad eval forward into a CPU-only
    layout with bf16 scales: dequantizing that layout gives wrong weights, saving converts it back lossily, and
    eval outputs then differ from training outputs. Disabling the repack keeps one exact representation.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):  # already repacked (e.g. a model evaluated before)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` float weight of a bitsandbytes Linear (the weight itself for any other layer)."""
    weight = layer.weight
    if not is_quantized_linear(layer):
        return weight
    bnb = _bnb()
    if isinstance(weight, bnb.nn.Params4bit):
        if not weight.bnb_quantized:  # Lightning's layers quantize when moved to CUDA; until then: floats
            return weight.data
        keep_portable_layout(layer)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dtype == torch.int8:  # LLM.int8: one absmax per output row, codes in [-127, 127]
        row_scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, row_scale)
    return weight.data


def weight_storage_bytes(layer: nn.Module, include_tables: bool = True) -> int:
    """Bytes that hold a Linear4bit's weight: packed codes, block scales (themselves quantized with double
    quantization) and, with ``include_tables``, the per-layer lookup tables (16 + 256 floats, fixed per layer)."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, state.offset.reshape(1)]
        tensors += [state.state2.code] if include_tables else []
    tensors += [state.code] if include_tables else []
    return sum(t.numel() * t.element_size() for t in tensors)


# --- models -----------------------------------------------------------------------------------------------
def quantize(
    model: nn.Module,
    modules: list[str] | str | None = None,
    *,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
    skip: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Replace ``nn.Linear`` layers of ``model`` by bitsandbytes 4-bit layers, in place.

    Args:
        model: The model.
        modules: As :class:`~lightning_peft.methods.QLoRA`'s ``quantize_modules``.
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: Quantize the per-block scales too.
        compute_dtype: dtype of the matmuls.
        quant_storage: dtype of the tensors holding the packed codes (see :func:`quantize_linear`).
        skip: Module names (and their children) to leave alone, e.g. ``modules_to_save``.

    Returns:
        The names of the quantized layers.

    Raises:
        ValueError: nothing to quantize.
    """
    if modules is not None:
        found = find_targets(
            model, modules, supported=(nn.Linear,), skip=skip, method="QLoRA quantize_modules"
        )
    else:
        heads = output_head_names(model)
        # Never what an adapter layer holds: its adapters are not to be quantized, nor a base it already wraps.
        wrapped = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
        # Nor what the model keeps in fp32 (T5's `wo`: its activations overflow in low precision).
        skip = [*skip, *hf.keep_in_fp32_modules(model)]
        found = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and name not in heads
            and any(part.isdigit() for part in name.split("."))  # inside a ModuleList of repeated blocks
            and not name.startswith(wrapped)
            and not (skip and _within(name, skip))
        ]
        if not found:
            raise ValueError(
                f"QLoRA: {type(model).__name__} has no nn.Linear inside repeated blocks (names like "
                "model.layers.0.mlp.up_proj) to quantize; pass quantize_modules=[...] (names, a regex or "
                "'all-linear'). GPT-2 style Conv1D layers are not quantized."
            )
    # A layer of at most one 64-value block (a router's or shared expert's 1-wide gate) stays in full precision:
    # 4 bits plus a block scale save nothing there, and bitsandbytes < 0.49 crashes quantizing it on CPU.
    targets = [
        (name, module)
        for name, module in found
        if not is_quantized_linear(module) and module.weight.numel() > _BLOCK
    ]
    for name, module in targets:
        replace_module(
            model, name, quantize_linear(module, quant_type, double_quant, compute_dtype, quant_storage)
        )
    return [name for name, _ in targets]


def _within(name: str, names: list[str] | tuple[str, ...]) -> bool:
    """Whether ``name`` or one of its parents is selected by ``names`` (list syntax: full name or suffix)."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), list(names)) for i in range(1, len(parts) + 1))


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes Linear in ``model`` (also under LoRA layers) by a full-precision ``nn.Linear``.

    In place. Adapters are kept and can then be merged exactly (``W_deq + sBA``).

    Args:
        model: The model.
        dtype: dtype of the new weights; default: the dtype the weights were quantized from.
    """
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            weight = dequantize_weight(module).detach()
            linear = TorchLinear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(weight.to(dtype or weight.dtype), requires_grad=False)
            linear.bias = module.bias
            replace_module(model, name, linear.train(module.training))
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    # What transformers' own dequantize does: without it save_pretrained writes a quantization_config and the
    # saved full-precision model would be reloaded as a quantized one.
    for owner, attr in ((model, "hf_quantizer"), (getattr(model, "config", None), "quantization_config")):
        if owner is not None and hasattr(owner, attr):
            delattr(owner, attr)
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def prepare_model_for_kbit_training(model: nn.Module) -> nn.Module:
    """Make a quantized model trainable stably, as peft's ``prepare_model_for_kbit_training`` (checkpointing apart).

    Parameters left in fp16/bf16 (norms, embeddings, head, biases) are upcast to fp32: their updates and the
    normalisation statistics are where half precision hurts. The input embeddings' output is made to require grad,
    so that with reentrant gradient checkpointing the adapters inside checkpointed blocks still get gradients.
    Every 4-bit layer keeps the standard layout (:func:`keep_portable_layout`): bitsandbytes' CPU inference
    layout has no backward, so after one evaluation gradients would stop flowing through those layers.
    """
    for module in model.modules():
        if is_quantized_linear(module):
            keep_portable_layout(module)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized_param(param):
            param.data = param.data.float()
    # The outermost transformers model (model may be a LightningModule holding it); transformers keeps the hook in
    # `_require_grads_hook`, so preparing twice registers it once.
    owner = next(
        (m for m in model.modules() if callable(getattr(m, "enable_input_require_grads", None))), None
    )
    if owner is not None and not hasattr(owner, "_require_grads_hook"):
        owner.enable_input_require_grads()
    return model


def set_gradient_checkpointing(model: nn.Module, enabled: bool, use_reentrant: bool = True) -> None:
    """Switch activation checkpointing of a transformers model on or off."""
    if not hf.set_activation_checkpointing(model, enabled, use_reentrant):
        raise ValueError(
            f"QLoRA gradient_checkpointing={enabled}: {type(model).__name__} is not a transformers model; switch "
            "checkpointing in its own code and leave gradient_checkpointing=None."
        )


# --- serving ----------------------------------------------------------------------------------------------
def export_merged(
    model: nn.Module, directory: str | os.PathLike | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A full-precision copy of ``model`` with the active adapter merged, for serving; ``model`` is unchanged.

    The copy's weights are the dequantized base plus the exact update (``W_deq + sBA``), so its outputs equal the
    QLoRA model's up to float rounding. It has no adapter layers and no bitsandbytes layers.

    Args:
        model: A model with (Q)LoRA adapters, or just a quantized model.
        directory: If given, save there: ``save_pretrained`` for transformers models (config included, without a
            quantization config), else ``model.safetensors``.
        dtype: Cast the exported model, e.g. ``torch.bfloat16``; default: the dtype the base was quantized from.

    Returns:
        The merged full-precision model.
    """
    exported = dequantize(copy.deepcopy(model))
    if injection_record(exported) is not None:
        merge_and_unload(exported)
    if dtype is not None:
        exported.to(dtype)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        if hasattr(exported, "save_pretrained"):
            exported.save_pretrained(directory)
        else:
            from safetensors.torch import save_model

            save_model(exported, str(Path(directory) / "model.safetensors"))
    return exported
