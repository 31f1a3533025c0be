"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA over a 4-bit quantized base.

The frozen base Linears are stored as 4-bit codes, NF4 (quantiles of a normal distribution, suited to trained
weights) or FP4, in blocks of 64 weights that share one absmax scale; double quantization stores those scales in
8 bits too, so a weight costs ~4.127 bits instead of 16 or 32. Each forward pass dequantizes a layer to
``compute_dtype`` for its matmul; the LoRA adapters beside it stay in full precision and are the only trained
parameters, so gradients flow *through* the 4-bit base but never *into* it.

The adapters are LoRA's, unchanged: a saved directory says ``peft_type: "LORA"`` and loads in peft, or with
:func:`lightning_peft.load_adapter`, as plain LoRA on a quantized or a full-precision base. This file holds
:class:`QLoRA` (quantize the base, prepare it for k-bit training, inject LoRA) and :class:`LoraBnbLinear`, the
LoRA layer around bitsandbytes ``Linear4bit``/``Linear8bitLt`` however they were made (here, by transformers'
``BitsAndBytesConfig`` or Lightning's ``BitsandbytesPrecision``), which plain :class:`LoRA` uses too. The
bitsandbytes mechanics (quantize, dequantize, prepare, export) are in :mod:`lightning_peft.core.quantization`.

Merging into a quantized base is refused: re-quantizing ``W + sBA`` rounds most of a small update back onto the
4-bit grid (``benchmarks/qlora_memory.py``: an update of 1% of ``|W|`` keeps ~2% of itself, one of 5% ~27%), so
the merged model would silently differ from the trained one. :func:`~lightning_peft.core.quantization.export_merged`
merges exactly in full precision instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import NotMergeableError
from lightning_peft.core.quantization import (
    TorchLinear,
    dequantize_weight,
    is_quantized_linear,
    keep_portable_layout,
    prepare_model_for_kbit_training,
    quantize,
    set_gradient_checkpointing,
)
from lightning_peft.core.targeting import find_targets
from lightning_peft.methods.lora.layers import (
    LAYER_RESOLVERS,
    InitOption,
    LoraLinear,
    init_display_name,
    rewrites_base_weight,
)
from lightning_peft.methods.lora.loftq import apply_loftq
from lightning_peft.methods.lora.lora import LoRA

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = {"uint8": torch.uint8, **COMPUTE_DTYPES}


class LoraBnbLinear(LoraLinear):
    """LoRA around a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    The base runs its own quantized matmul; the update ``B A x * s`` runs in the adapters' float dtype and is
    added to it. DoRA's weight norms read the dequantized weight. After
    :func:`~lightning_peft.core.quantization.dequantize` the base is a plain ``nn.Linear`` and this layer behaves
    exactly like :class:`LoraLinear`, merging included.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # LoraLinear read the shape off the weight, which bitsandbytes stores packed ((out * in / 2, 1) for 4 bits).
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        keep_portable_layout(base_layer)

    @property
    def quantized(self) -> bool:
        return is_quantized_linear(self.base_layer)

    def create_weights(self, adapter_name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        # torch's own Linear: under Lightning's BitsandbytesPrecision init context `nn.Linear` is a 4-bit class, and
        # the adapters must never be quantized.
        self.lora_A[adapter_name] = TorchLinear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = TorchLinear(r, self.out_features, bias=False, device=device, dtype=dtype)

    def initialise(self, adapter_name: str, init: InitOption) -> None:
        if rewrites_base_weight(init) and self.quantized:
            raise ValueError(
                f"LoRA init_lora_weights={init!r}: {init_display_name(init)} rewrites the base weight, which is quantized here "
                f"({type(self.base_layer).__name__}); use init_lora_weights=True or 'gaussian'."
            )
        super().initialise(adapter_name, init)

    def base_weight(self) -> torch.Tensor:
        return dequantize_weight(self.base_layer)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if not self.quantized:
            return super().delta_weight(adapter_name)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (B @ A) * self.scaling[adapter_name]  # (out, r) @ (r, in) -> (out, in), in the adapters' dtype

    def check_merge(self, adapter_name: str) -> None:
        if self.quantized:
            raise NotMergeableError(
                f"Cannot merge adapter '{adapter_name}' into a quantized {type(self.base_layer).__name__}: "
                "re-quantizing W + sBA rounds most of the update back onto the 4/8-bit grid, so the merged model "
                "would differ from the trained one (benchmarks/qlora_memory.py measures it). Nothing was changed. "
                "For a merged model use lightning_peft.core.quantization.export_merged(model) (full precision), or "
                "call lightning_peft.core.quantization.dequantize(model) and then merge."
            )
        super().check_merge(adapter_name)

    def merge_adapter(self, adapter_name: str) -> None:
        self.check_merge(adapter_name)
        super().merge_adapter(adapter_name)


LAYER_RESOLVERS.append(lambda module: LoraBnbLinear if is_quantized_linear(module) else None)


@dataclass(kw_only=True)
class QLoRA(LoRA):
    """LoRA on a 4-bit base: quantize the model's Linears with bitsandbytes, then train LoRA adapters on top.

    Example:
        >>> from lightning_peft.methods import QLoRA
        >>> QLoRA(r=16, alpha=32, quant_type="nf4", compute_dtype="bfloat16").peft_type
        'LORA'

    Every LoRA argument applies (see :class:`~lightning_peft.methods.LoRA`); ``target_modules`` defaults to
    ``"all-linear"``, as the paper found adapters on every block Linear necessary to match full fine-tuning.
    If the model already holds bitsandbytes layers (loaded with transformers' ``BitsAndBytesConfig``, converted
    by Lightning's ``BitsandbytesPrecision``, or quantized for an earlier adapter), nothing more is quantized and
    the adapters go on those layers. The saved adapter is plain LoRA (``peft_type: "LORA"``). Merging refuses on
    the 4-bit base; use :func:`~lightning_peft.core.quantization.export_merged`.

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat, the paper's choice) or ``"fp4"``.
        double_quant: Also quantize the per-block scales (8-bit, blocks of 256): ~0.37 bits per weight saved.
        compute_dtype: dtype weights are dequantized to for each matmul: ``"float32"``, ``"bfloat16"`` (the
            usual choice on GPUs) or ``"float16"``; ``torch.bfloat16`` etc. are taken too (stored by name).
        quantize_modules: Linears to quantize, in ``target_modules`` syntax (names, a regex, ``"all-linear"``).
            ``None``: every ``nn.Linear`` inside the model's repeated blocks (a dotted name with an index, e.g.
            ``model.layers.3.mlp.up_proj``), so not the embeddings, the output head or a classifier.
        prepare_for_kbit_training: Upcast the remaining fp16/bf16 parameters (norms, embeddings, head) to fp32
            and make the input embeddings' output require grad, as peft's ``prepare_model_for_kbit_training``.
        gradient_checkpointing: ``True``/``False`` switches activation checkpointing of a transformers model on or
            off; ``None`` leaves it as it is.
        use_reentrant: The checkpointing variant used when ``gradient_checkpointing=True``.
        quant_storage: dtype of the tensors the packed 4-bit codes are stored in (same bytes, two codes per byte):
            ``"uint8"`` (bitsandbytes' default) or the float dtype of the model's other weights (``"float32"``,
            ``"bfloat16"``, ``"float16"``; ``torch.float32`` etc. are taken too), which FSDP needs: it flattens a
            unit's parameters into one tensor of a single dtype. Outputs are the same either way.
        loftq_iter: With ``init_lora_weights="loftq"``: LoftQ's alternating iterations (see :mod:`.loftq`; the
            model must then still be in full precision, so LoftQ can read the weights it quantizes).
    """

    target_modules: list[str] | str | None = "all-linear"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantize_modules: list[str] | str | None = None
    prepare_for_kbit_training: bool = True
    gradient_checkpointing: bool | None = None
    use_reentrant: bool = True
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        # torch.bfloat16 etc.: the spelling transformers and bitsandbytes users write
        if isinstance(self.compute_dtype, torch.dtype):
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")  # type: ignore[assignment]
        if isinstance(self.quant_storage, torch.dtype):
            self.quant_storage = str(self.quant_storage).removeprefix("torch.")  # type: ignore[assignment]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QLoRA quant_type={self.quant_type!r} must be 'nf4' or 'fp4'.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"QLoRA compute_dtype={self.compute_dtype!r} must be one of {list(COMPUTE_DTYPES)}."
            )
        if self.quant_storage not in STORAGE_DTYPES:
            raise ValueError(
                f"QLoRA quant_storage={self.quant_storage!r} must be one of {list(STORAGE_DTYPES)} (the dtype the "
                "packed 4-bit codes are stored in)."
            )
        init = self.init_lora_weights
        if rewrites_base_weight(init):
            raise ValueError(
                f"QLoRA init_lora_weights={init!r}: {init_display_name(init)} cannot rewrite a 4-bit base weight."
            )
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            raise ValueError(
                f"QLoRA loftq_iter={self.loftq_iter!r} must be an integer >= 1 (peft's default: 1)."
            )

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        # LoRA's targets are checked before quantizing (quantize checks its own selection before replacing
        # anything), so a bad name leaves the model unquantized.
        targets = find_targets(
            model, self.resolve_target_modules(model), supported=(nn.Module,), exclude_modules=self.exclude_modules,
            skip=self.modules_to_save or (), method="QLoRA",
        )  # fmt: skip
        loftq = self.init_lora_weights == "loftq"
        already_quantized = any(is_quantized_linear(m) for m in model.modules())
        if loftq and already_quantized:
            raise ValueError(
                "QLoRA init_lora_weights='loftq' needs the full-precision weights it quantizes, but this model is "
                "already quantized (bitsandbytes layers). Load the model unquantized and let QLoRA quantize it."
            )
        # LoftQ reads the full-precision weights after quantization replaced their layers (references, no copies).
        originals = {n: m.weight.detach() for n, m in targets if loftq and isinstance(m, nn.Linear)}
        quantized: list[str] = []
        if not already_quantized:
            self._check_storage(model)
            quantized = quantize(
                model, self.quantize_modules, quant_type=self.quant_type, double_quant=self.double_quant,
                compute_dtype=COMPUTE_DTYPES[self.compute_dtype], quant_storage=STORAGE_DTYPES[self.quant_storage],
                skip=self.modules_to_save or (),
            )  # fmt: skip
        if self.prepare_for_kbit_training:
            prepare_model_for_kbit_training(model)
        if self.gradient_checkpointing is not None:
            set_gradient_checkpointing(model, self.gradient_checkpointing, self.use_reentrant)
        super().inject_layers(model, adapter_name)
        if loftq:
            settings = {
                "quant_type": self.quant_type, "double_quant": self.double_quant,
                "compute_dtype": COMPUTE_DTYPES[self.compute_dtype], "quant_storage": STORAGE_DTYPES[self.quant_storage],
            }  # fmt: skip
            apply_loftq(model, adapter_name, originals, quantized, self.loftq_iter, settings)

    def frozen_float_dtypes(self, model: nn.Module) -> set[torch.dtype]:
        """The dtypes ``model``'s float weights will have once prepared (``prepare_for_kbit_training`` upcasts
        fp16/bf16 to float32): what FSDP flattens the 4-bit codes with, so what a float ``quant_storage`` must be.
        (The adapters, float32 on a 4-bit base, get units of their own under PEFTFSDPStrategy.)"""
        upcast = (torch.float16, torch.bfloat16) if self.prepare_for_kbit_training else ()
        return {
            torch.float32 if p.dtype in upcast else p.dtype
            for p in model.parameters()
            if p.is_floating_point()
        }

    def _check_storage(self, model: nn.Module) -> None:
        storage = STORAGE_DTYPES[self.quant_storage]
        dtypes = self.frozen_float_dtypes(model)
        if storage != torch.uint8 and dtypes and storage not in dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(
                f"QLoRA quant_storage={self.quant_storage!r}: the model's float weights will be {names}, so FSDP "
                f"could not flatten the 4-bit codes with them (it needs one dtype per unit). Use quant_storage="
                f"{names[0]!r} (prepare_for_kbit_training=True upcasts fp16/bf16 weights to float32), or 'uint8' "
                "without FSDP. Nothing was quantized."
            )

    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict:
        config = super().to_peft_config(model, adapter_name)
        if self.init_lora_weights == "loftq":
            # A, B are in the file: peft must not re-run LoftQ when loading it.
            config["init_lora_weights"] = True
        return config
