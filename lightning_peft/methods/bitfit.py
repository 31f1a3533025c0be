"""BitFit (Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199): train only the bias terms.

Each adapted layer keeps its bias frozen and gets a trainable copy per adapter, ``bitfit_bias``, which the
layer's own computation uses in its place (``F.linear(x, W, b')``, ``F.layer_norm(..., b')``, ...). Training
a copy rather than the base tensor is what lets BitFit follow the same contract as every other method: the
copy starts equal to the bias, so the model is unchanged at init bit for bit; disabling or unloading the
adapter gives the original biases back exactly; merging copies the trained bias into the base layer (and
unmerging restores the saved original, again exactly). The number of trained values is the same as training
the biases in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import find_targets, replace_module
from lightning_peft.core.transformers_compat import Conv1D

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
#: Layer types whose forward BitFit can run with a replacement bias.
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, *_NORMS, *_CONV)


def forward_with_bias(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed with ``bias`` instead of ``layer.bias`` (the same kernel as the layer's own forward)."""
    base = next(cls for cls in type(layer).__mro__ if cls in SUPPORTED_TYPES)
    if type(layer).forward is not base.forward:
        # A subclass with its own forward (ConvNeXt's channels-first LayerNorm): run that forward, with the bias
        # swapped in for this call only.
        return torch.func.functional_call(layer, {"bias": bias}, (x,))
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, bias)
    if isinstance(layer, Conv1D):  # GPT-2: weight is (in, out)
        out = torch.addmm(bias, x.view(-1, x.size(-1)), layer.weight)  # (N, in) @ (in, out) -> (N, out)
        return out.view(*x.shape[:-1], layer.nf)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, layer.weight, bias, layer.eps)
    if isinstance(layer, _CONV):
        return layer._conv_forward(x, layer.weight, bias)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, layer.weight, bias, layer.eps)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        # Batch statistics and the running buffers behave as in the layer's own forward (train or eval mode).
        return torch.func.functional_call(layer, {"bias": bias}, (x,))
    raise TypeError(f"BitFit cannot run {type(layer).__name__} with a replacement bias.")


class BitFitLayer(AdapterLayer):
    """A layer whose bias is replaced by a trained copy per adapter."""

    adapter_attrs = ("bitfit_bias",)
    adapter_settings = ("_bias_before_merge",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self._bias_before_merge: dict[str, torch.Tensor] = {}

    def add_adapter(self, adapter_name: str) -> None:  # type: ignore[override]
        self.bitfit_bias[adapter_name] = nn.Parameter(self.base_layer.bias.detach().clone())
        self.active_adapters = [*self.active_adapters, adapter_name]

    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return forward_with_bias(self.base_layer, x, self.bitfit_bias[adapter_names[-1]])

    def check_merge(self, adapter_name: str) -> None:
        self.check_finite(self.bitfit_bias[adapter_name], adapter_name, type(self.base_layer).__name__)

    def merge_adapter(self, adapter_name: str) -> None:
        self.check_merge(adapter_name)
        bias = self.base_layer.bias
        with torch.no_grad():
            self._bias_before_merge[adapter_name] = bias.detach().clone()
            bias.copy_(self.bitfit_bias[adapter_name])

    def unmerge_adapter(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.base_layer.bias.copy_(self._bias_before_merge.pop(adapter_name))


def _has_own_bias(module: nn.Module) -> bool:
    # `_parameters`, not getattr: an adapter wrapper forwards `.bias` to its base layer.
    return module._parameters.get("bias") is not None or isinstance(module, BitFitLayer)


@register_method
@dataclass(kw_only=True)
class BitFit(PEFTMethod):
    """Train the biases (all of them, or those of chosen modules) and nothing else.

    Example:
        >>> from torch import nn
        >>> from lightning_peft import count_parameters, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), BitFit())
        >>> count_parameters(model)["trainable"]  # the 8 + 2 biases
        10

    Args:
        target_modules: Modules whose bias is trained (names with suffix match, a full-match regex, or
            ``"all-linear"``); modules without a bias are passed over. ``None``: every bias of the model
            (linear, convolution, LayerNorm, GroupNorm and BatchNorm layers), as in the paper.
        exclude_modules: Modules to leave alone, same syntax.
        modules_to_save: Modules trained in full (e.g. a new classification head).

    Raises:
        ValueError: at injection, when the selected modules have no bias at all (e.g. Llama's layers are
            bias-free): training nothing would silently leave the model as it is.
    """

    peft_type: ClassVar[str] = "BITFIT"
    mergeable: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        for name, module in self._targets(model):
            layer = module if isinstance(module, BitFitLayer) else BitFitLayer(module)
            layer.add_adapter(adapter_name)
            if layer is not module:
                replace_module(model, name, layer)

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        spec = self.target_modules
        if spec is None:
            # Every module holding a bias, by exact name; find_targets then applies skip/exclude and type checks.
            spec = [name for name, module in model.named_modules() if name and _has_own_bias(module)]
            if not spec:
                raise ValueError(
                    f"BitFit: {type(model).__name__} has no bias parameters (e.g. Llama, Mistral and T5 layers are "
                    "bias-free), so BitFit would train nothing. Use LoRA or IA3 for this model, or a model with "
                    "biases (BERT, RoBERTa, GPT-2, Qwen2)."
                )
        targets = find_targets(
            model,
            spec,
            supported=(*SUPPORTED_TYPES, BitFitLayer),
            exclude_modules=self.exclude_modules,
            skip=self.modules_to_save or (),
            linear_types=(nn.Linear, Conv1D),
            method="BitFit",
        )
        with_bias = [(n, m) for n, m in targets if _has_own_bias(m)]
        if not with_bias:
            shown = ", ".join(n for n, _ in targets[:5])
            raise ValueError(
                f"BitFit: target_modules={self.target_modules!r} selects {len(targets)} modules ({shown}"
                f"{', ...' if len(targets) > 5 else ''}) and none of them has a bias, so BitFit would train "
                "nothing. Target modules with biases, or use LoRA/IA3 for a bias-free model."
            )
        return with_bias
