"""LoRA's layers: the wrappers that hold the low-rank weights around ``nn.Linear``, GPT-2's ``Conv1D``,
``nn.Embedding`` and ``nn.Conv1d/2d/3d`` (and, through :data:`LAYER_RESOLVERS`, bitsandbytes layers), their
plain-LoRA forward and merge. What an adapter computes beyond plain LoRA is its variant's (:mod:`.variants`:
DoRA in :mod:`.dora`, UniPELT's gate); mixed batches are :class:`~.rows.PerRowUpdates`'. The method's
configuration and injection are in :mod:`.lora`.

Numerics and parameter names follow Hugging Face ``peft`` so saved adapters load there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import NotMergeableError, adapter_dtype, oriented
from lightning_peft.core.contract import about_to_change_base
from lightning_peft.core.transformers_compat import Conv1D
from lightning_peft.methods.lora.dora import ConvDora, LinearDora
from lightning_peft.methods.lora.kernels import FusedLoraLinear
from lightning_peft.methods.lora.rows import PerRowUpdates
from lightning_peft.methods.lora.variants import GatedVariant, LoraVariant

InitOption = bool | Literal["gaussian", "pissa", "olora"] | str


def rewrites_base_weight(init: InitOption) -> bool:
    """Whether an init moves part of the base weight into ``A, B`` and keeps the residual as the base: PiSSA
    (``"pissa"``, ``"pissa_niter_<n>"``) and OLoRA (``"olora"``). Such inits need a writable float base weight."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def init_display_name(init: InitOption) -> str:
    """The paper's name of a base-rewriting init, for error messages."""
    return "OLoRA" if init == "olora" else "PiSSA"


#: The variants' tensor containers (``lora_magnitude_vector``, ``lora_gate``): every LoRA layer has them, empty
#: unless an adapter uses the variant.
VARIANT_CONTAINERS: dict[str, type[nn.Module]] = {
    **LinearDora.containers,
    **ConvDora.containers,
    **GatedVariant.containers,
}


class LoraLayer(PerRowUpdates):
    """Common state of the LoRA wrappers: per-adapter rank, scale, dropout and weights, and the adapters'
    variants (``lora_variant``: absent for plain LoRA)."""

    adapter_attrs = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_dropout",
        *VARIANT_CONTAINERS,
    )
    adapter_settings = ("r", "scaling", "lora_variant")
    #: The DoRA variant of this layer kind (None: DoRA is refused).
    dora_variant: type[LoraVariant] | None = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        for attr, container in VARIANT_CONTAINERS.items():
            setattr(self, attr, container())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, LoraVariant] = {}

    def add_adapter(  # type: ignore[override]
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
        init: InitOption,
    ) -> None:
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = self.base_layer.weight
        self.create_weights(adapter_name, r, device=weight.device, dtype=adapter_dtype(weight))
        self.initialise(adapter_name, init)
        if use_dora:
            if self.dora_variant is None:
                raise ValueError(
                    f"DoRA is supported on Linear, GPT-2 Conv1D and convolution layers, not "
                    f"{type(self.base_layer).__name__}."
                )
            variant = self.dora_variant()
            variant.create(self, adapter_name)
            self.lora_variant[adapter_name] = variant
        self.active_adapters = [*self.active_adapters, adapter_name]

    # --- implemented per layer kind --------------------------------------------------------------------------
    def create_weights(self, adapter_name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def initialise(self, adapter_name: str, init: InitOption) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        # EVA and LoftQ start as the default and are set later (from data: eva.py; from the base: loftq.py).
        if init is True or init in ("eva", "loftq"):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
            nn.init.zeros_(B)
        elif init is False:  # not a no-op: useful to test merge paths
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            raise ValueError(
                f"init_lora_weights={init!r} is not supported for {type(self.base_layer).__name__}."
            )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B @ A`` in the base weight's own layout."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base weight as floats in the base layer's own layout (quantized bases dequantize here)."""
        return self.base_layer.weight

    # --- merging: the variant folds the update in (plain LoRA: W + sBA) -------------------------------------
    def _merged_weight(self, adapter_name: str, commit: bool = False) -> torch.Tensor:
        """The base weight with the adapter folded in, refused if not finite; ``commit``: it will be written."""
        variant = self.lora_variant.get(adapter_name, _PLAIN)
        weight = self.base_weight()
        with torch.no_grad():
            delta = self.delta_weight(adapter_name)
            merge = variant.merge if commit else variant.merged_weight
            new = merge(self, adapter_name, weight, delta)
        self.check_finite(new, adapter_name, type(self.base_layer).__name__)
        return new

    def check_merge(self, adapter_name: str) -> None:
        self._merged_weight(adapter_name)

    def merge_adapter(self, adapter_name: str) -> None:
        new = self._merged_weight(adapter_name, commit=True)
        with torch.no_grad():
            self.base_layer.weight.copy_(new)

    def unmerge_adapter(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(adapter_name)
            variant = self.lora_variant.get(adapter_name)
            if variant is None:
                weight.sub_(delta)
            else:
                weight.copy_(variant.unmerged_weight(self, adapter_name, weight, delta))

    # --- forward: base output plus each adapter's update --------------------------------------------------------
    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapter_names:
            result = result + self.adapter_update(name, x, result).to(result.dtype)
        return result

    def holds(self, adapter_name: str) -> bool:
        return adapter_name in self.r

    def adapter_update(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to ``base_result``: its variant's update, or plain LoRA's :meth:`adapter_output`."""
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return self.adapter_output(adapter_name, x, base_result)
        return variant.update(self, adapter_name, x, base_result)

    def dropped_input(self, adapter_name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` in the adapter's dtype through its dropout; at p = 0 (an Identity) no module is called at all."""
        dropout = self.lora_dropout[adapter_name]
        x = x.to(dtype)
        return x if isinstance(dropout, nn.Identity) else dropout(x)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """Plain LoRA's update ``s B A dropout(x)``."""
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropped = self.dropped_input(adapter_name, x, A.weight.dtype)
        scaling = self.scaling[adapter_name]
        after_A = A(dropped)  # (..., in) -> (..., r); scaled here, where it is r wide, not at (..., out)
        # A tensor scale (hotswap-ready: formats/hotswap.py) always multiplies: comparing it would break the graph.
        return B(after_A if not torch.is_tensor(scaling) and scaling == 1 else after_A * scaling)


#: The variant of plain LoRA adapters (they hold none): its hooks are plain LoRA's.
_PLAIN = LoraVariant()


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2; weight stored as (in, out))."""

    dora_variant = LinearDora

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        out_features, in_features = oriented(base_layer.weight, self.fan_in_fan_out).shape
        self.in_features, self.out_features = in_features, out_features
        #: Set by :func:`~lightning_peft.methods.lora.shared_input.share_lora_inputs`: A products shared with the
        #: layers reading the same input.
        self.shared_inputs: Any = None

    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        name = self.fusable_adapter(x, args, kwargs)
        if name is None:
            return super().adapted_forward(adapter_names, x, *args, **kwargs)
        variant = self.lora_variant.get(name)
        if variant is not None:
            return variant.fused_forward(self, name, x)
        if (
            self.shared_inputs is not None
            and (shared := self.shared_inputs.forward(self, name, x)) is not None
        ):
            return shared
        base, A, B = self.base_layer, self.lora_A[name], self.lora_B[name]
        dropped = self.dropped_input(name, x, x.dtype)
        return FusedLoraLinear.apply(
            x, None if dropped is x else dropped, base.weight, base.bias, A.weight, B.weight,
            self.scaling[name], self.fan_in_fan_out,
        )  # fmt: skip

    def fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one pending adapter when the fused kernel computes exactly what the modules would, else None.

        That takes a plain ``nn.Linear``/``Conv1D`` base and plain ``nn.Linear`` adapters with no hooks (FSDP
        units, quantized or tensor-parallel weights run through the modules), one pending adapter that is plain
        LoRA or has a variant whose own kernel is exact (:meth:`LoraVariant.fusable`: DoRA's; a gate's never), no
        mixed batch, one dtype throughout and no autocast.
        """
        if self.disabled or self.row_adapters is not None or args or kwargs:
            return None
        pending = self.pending_adapters()
        if len(pending) != 1:
            return None
        name = pending[0]
        if torch.is_tensor(self.scaling[name]):  # hotswap-ready (a graph input): the kernel wants a float
            return None
        base, A, B = self.base_layer, self.lora_A[name], self.lora_B[name]
        if type(base) not in (nn.Linear, Conv1D) or type(A) is not nn.Linear or type(B) is not nn.Linear:
            return None
        if any(_has_hooks(m) for m in (base, A, B)) or torch.is_autocast_enabled(x.device.type):
            return None
        tensors = [t for t in (base.weight, base.bias, A.weight, B.weight) if t is not None]
        if any(type(t) is not nn.Parameter or t.dtype != x.dtype or t.device != x.device for t in tensors):
            return None
        variant = self.lora_variant.get(name)
        if variant is not None and not variant.fusable(self, name, x):
            return None
        return name

    def create_weights(self, adapter_name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)

    def initialise(self, adapter_name: str, init: InitOption) -> None:
        if init == "olora":
            self._olora_init(adapter_name)
        elif isinstance(init, str) and init.startswith("pissa"):
            self._pissa_init(adapter_name, init)
        else:
            super().initialise(adapter_name, init)

    def _pissa_init(self, adapter_name: str, init: str) -> None:
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        weight = self.base_layer.weight
        with torch.no_grad():
            W = oriented(weight, self.fan_in_fan_out).float()  # (out, in)
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            else:  # "pissa_niter_<n>": randomised SVD, n subspace iterations
                U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[-1]))
                Vh = V.T
            sqrt_s = (S[:r] / scaling).sqrt()
            A = sqrt_s.unsqueeze(1) * Vh[:r]  # (r, in)
            B = U[:, :r] * sqrt_s  # (out, r)
            self.lora_A[adapter_name].weight.copy_(A)
            self.lora_B[adapter_name].weight.copy_(B)
            # The base keeps the residual, so the adapted output equals the original at init.
            about_to_change_base(weight)
            weight.copy_(oriented(W - scaling * (B @ A), self.fan_in_fan_out).to(weight.dtype))

    def _olora_init(self, adapter_name: str) -> None:
        """OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): ``W = Q R`` (reduced QR), ``B = Q[:, :r]``
        (orthonormal columns), ``A = R[:r]``; the base keeps ``W - s B A``. Unlike PiSSA the factors are not
        divided by ``s``: B's orthonormal columns are the point (well-conditioned updates, faster convergence)."""
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        weight = self.base_layer.weight
        with torch.no_grad():
            W = oriented(weight, self.fan_in_fan_out).float()  # (out, in)
            Q, R = torch.linalg.qr(W)  # (out, k) @ (k, in), k = min(out, in) >= r (checked at injection)
            B, A = Q[:, :r], R[:r]  # (out, r), (r, in)
            self.lora_A[adapter_name].weight.copy_(A)
            self.lora_B[adapter_name].weight.copy_(B)
            about_to_change_base(weight)
            weight.copy_(oriented(W - scaling * (B @ A), self.fan_in_fan_out).to(weight.dtype))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (B @ A) * self.scaling[adapter_name]  # (out, r) @ (r, in) -> (out, in)
        return oriented(delta, self.fan_in_fan_out).to(self.base_layer.weight.dtype)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``A: (r, num_embeddings)`` is looked up like an embedding, ``B: (dim, r)``."""

    def create_weights(self, adapter_name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, num, device=device, dtype=dtype))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(dim, r, device=device, dtype=dtype))

    def initialise(self, adapter_name: str, init: InitOption) -> None:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        if init is False:
            nn.init.normal_(A)
        elif init in (True, "gaussian"):
            nn.init.zeros_(A)  # A (not B) is zero here: B ~ N(0, 1) so gradients reach A from step one
        else:
            raise ValueError(f"init_lora_weights={init!r} is not supported for nn.Embedding.")
        nn.init.normal_(B)

    def pending_adapters(self) -> list[str]:
        return [a for a in super().pending_adapters() if a in self.lora_embedding_A]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return ((B @ A).T * self.scaling[adapter_name]).to(self.base_layer.weight.dtype)  # (num, dim)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        base = self.base_layer
        after_A = F.embedding(
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        out = (after_A @ B.T) * self.scaling[adapter_name]  # (..., r) @ (r, dim) -> (..., dim)
        # Scaled embeddings (BART's, Gemma 3's) multiply their lookup by embed_scale: so does the update, as a merged
        # weight would be (and as peft does).
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            out = out * (embed_scale.to(out.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return out


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` is a conv with the base's kernel and ``r`` channels, ``B`` a 1x1 conv."""

    dora_variant = ConvDora

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base_layer.weight.dim() - 2]

    def create_weights(self, adapter_name: str, r: int, device: torch.device, dtype: torch.dtype) -> None:
        base = self.base_layer
        conv = type(base)
        self.lora_A[adapter_name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        # A grouped base (depthwise, ResNeXt) gets a grouped B, as peft: A sees every input channel, each group of
        # B's output channels reads its share of the r. That update is no grouped kernel, so it cannot merge.
        self.lora_B[adapter_name] = conv(
            r, base.out_channels, 1, 1, groups=base.groups, bias=False, device=device, dtype=dtype
        )  # fmt: skip

    def check_merge(self, adapter_name: str) -> None:
        if self.base_layer.groups > 1:
            raise NotMergeableError(
                f"LoRA adapter '{adapter_name}' on a grouped convolution (groups={self.base_layer.groups}): its update "
                "mixes every input channel, which a grouped kernel cannot hold, so it does not fold into the weight "
                "(as in peft). Keep it unmerged."
            )
        super().check_merge(adapter_name)

    def merge_adapter(self, adapter_name: str) -> None:
        self.check_merge(adapter_name)
        super().merge_adapter(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        # Composing conv(k) then conv(1x1) is the conv whose kernel is B applied to A's kernels.
        delta = self._conv_fn(A.transpose(0, 1), B).transpose(0, 1)  # (out, in, *k)
        return (delta * self.scaling[adapter_name]).to(self.base_layer.weight.dtype)


#: The LoRA layer type wrapping each supported base layer type.
LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    Conv1D: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
}

#: ``module -> LoRA layer type or None`` rules tried before :data:`LAYER_TYPES` (qlora.py adds bitsandbytes layers).
LAYER_RESOLVERS: list[Callable[[nn.Module], type[LoraLayer] | None]] = []


def lora_layer_type(module: nn.Module) -> type[LoraLayer]:
    """The LoRA layer for ``module``: by its most specific supported base class, so subclasses of ``nn.Linear``
    (``NonDynamicallyQuantizableLinear``, a user's ``MyLinear``), ``nn.Embedding`` (scaled embeddings) and
    ``nn.Conv*`` are handled as their base."""
    for resolve in LAYER_RESOLVERS:
        if (layer_type := resolve(module)) is not None:
            return layer_type
    for base in type(module).__mro__:
        if base in LAYER_TYPES:
            return LAYER_TYPES[base]
    raise TypeError(
        f"LoRA cannot adapt {type(module).__name__}; supported: {sorted(t.__name__ for t in LAYER_TYPES)} and "
        "their subclasses."
    )
