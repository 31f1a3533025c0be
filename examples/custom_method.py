"""A method written outside lightning_peft, in one file: LoHa, and the checks every built-in method passes.

LoHa (Hyeon-Woo et al., 2022, "FedPara"; peft's ``LoHaConfig``) replaces LoRA's product ``B A`` by the Hadamard
(element-wise) product of two low-rank products, ``dW = s * (W1a W1b) * (W2a W2b)``: rank up to ``r^2`` from
``4 r (in + out)`` parameters. ``W2b`` starts at zero, so the model is unchanged until training moves it.

What a method is here, all of it in this file:

* an :class:`~lightning_peft.core.adapter_layer.AdapterLayer` that declares its per-adapter tensors
  (``adapter_attrs``) and settings (``adapter_settings``), adds an adapter (``add_adapter``), computes the adapted
  output (``adapted_forward``) and, being mergeable, folds into the base weight and back;
* a :class:`~lightning_peft.core.contract.PEFTMethod` dataclass of its hyperparameters that injects the layers,
  registered for loading with ``@register_method``.

The base class handles disabling, merged adapters, deleting an adapter and its state dict; the library handles
freezing, optimizers, checkpoints, adapter directories, merge and unload.

Run: ``python examples/custom_method.py`` (about 20 s on a laptop CPU).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft import inject, load_adapter, save_adapter
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import find_targets, replace_module
from lightning_peft.testing import check_method, tiny_llama, token_batch


class LoHaLayer(AdapterLayer):
    """LoHa around one ``nn.Linear``: ``y = W x + b + s * ((W1a W1b) * (W2a W2b)) x``."""

    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    adapter_settings = ("scaling",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.hada_w1_a, self.hada_w1_b = nn.ParameterDict(), nn.ParameterDict()
        self.hada_w2_a, self.hada_w2_b = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, r: int, alpha: float) -> None:
        weight = self.base_layer.weight  # (out, in)
        out_features, in_features = weight.shape

        def factor(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=torch.float32))

        self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name] = (
            factor(out_features, r),
            factor(r, in_features),
        )
        self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name] = (
            factor(out_features, r),
            factor(r, in_features),
        )
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            nn.init.normal_(getattr(self, name)[adapter_name], std=0.1)
        nn.init.zeros_(self.hada_w2_b[adapter_name])  # dW = 0: the model is unchanged at init
        self.scaling[adapter_name] = alpha / r
        self.active_adapters = [*self.active_adapters, adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[adapter_name] @ self.hada_w1_b[adapter_name]  # (out, r) @ (r, in) -> (out, in)
        w2 = self.hada_w2_a[adapter_name] @ self.hada_w2_b[adapter_name]  # (out, r) @ (r, in) -> (out, in)
        return self.scaling[adapter_name] * w1 * w2

    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapter_names:
            delta = self.delta_weight(name)
            result = result + (x.to(delta.dtype) @ delta.T).to(
                result.dtype
            )  # (..., in) @ (in, out) -> (..., out)
        return result

    def check_merge(self, adapter_name: str) -> None:
        self.check_finite(self.base_layer.weight + self.delta_weight(adapter_name), adapter_name, "nn.Linear")

    def merge_adapter(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight(adapter_name).to(self.base_layer.weight.dtype))

    def unmerge_adapter(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.base_layer.weight.sub_(self.delta_weight(adapter_name).to(self.base_layer.weight.dtype))


@register_method
@dataclass(kw_only=True)
class LoHa(PEFTMethod):
    """LoHa: a Hadamard product of two rank-``r`` updates on each target ``nn.Linear``.

    Args:
        r: Rank of each of the two products.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``.
        target_modules: Names, a regex, or ``"all-linear"`` (as every method's ``target_modules``).
    """

    peft_type: ClassVar[str] = "EXAMPLE_LOHA"  # its own type: peft's LoHa files are not claimed to load
    mergeable: ClassVar[bool] = True

    r: int = 4
    alpha: float = 4.0
    target_modules: list[str] | str = "all-linear"

    def validate(self) -> None:
        if self.r < 1 or not math.isfinite(self.alpha):
            raise ValueError(f"LoHa needs r >= 1 and a finite alpha, got r={self.r}, alpha={self.alpha}.")

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        for name, module in find_targets(
            model, self.target_modules, supported=(nn.Linear, LoHaLayer), method=self.name
        ):
            layer = module if isinstance(module, LoHaLayer) else LoHaLayer(module)
            layer.add_adapter(adapter_name, self.r, self.alpha)
            if layer is not module:
                replace_module(model, name, layer)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_method(lambda: LoHa(r=2, alpha=64, target_modules=["q_proj", "v_proj"]), tmp)
        model = inject(tiny_llama(), LoHa(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, LoHaLayer)):
                layer.hada_w2_b["default"].normal_(std=0.1)
        save_adapter(model, f"{tmp}/loha")
        loaded = load_adapter(tiny_llama(), f"{tmp}/loha")
        ids = token_batch()
        difference = (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(
        f"LoHa passes lightning_peft.testing.check_method; reloaded from its directory, max |logit diff| = {difference:.1e}"
    )


if __name__ == "__main__":
    main()
