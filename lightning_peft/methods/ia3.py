"""(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638): learned rescaling vectors.

Each targeted linear layer gets a vector ``l`` initialised to ones. On attention keys and values it scales
the layer's output, ``y = l * (W x + b)``; on the feed-forward down-projection it scales the input,
``y = W (l * x) + b``, because the paper rescales the intermediate activation that feeds that layer. With
``l = 1`` the model is unchanged, and both forms fold into ``W`` (and ``b``), so IA3 merges exactly.

Numerics, shapes (``(out, 1)`` or ``(1, in)``) and parameter names (``ia3_l``) follow Hugging Face ``peft``
so saved adapters load there and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_dtype, oriented
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import default_targets, find_targets, name_matches, replace_module
from lightning_peft.core.transformers_compat import Conv1D

#: Defaults per transformers ``model_type``: peft's tables (the same in peft 0.21.0 to 0.21.2) for every model type
#: they cover, plus distilbert, whisper, vit and qwen2_moe, which they lack. Like peft, most scale keys and values
#: and the input of the feed-forward down-projection (the paper's choice), some queries and values (Qwen, Gemma,
#: Phi, GPT-J, BART, ...) or queries and keys (OPT); mt5 scales the output of ``wi_1`` and no feed-forward input.
#: RefinedWeb and RefinedWebModel are remote-code Falcon, which transformers does not ship; their names are peft's.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    # peft adds the feed-forward "w2", which transformers 5 no longer builds: routed experts are stacked 3-D
    # tensors, not layers. Keys and values only (the modules peft adapts too), no feed-forward vector.
    "mixtral": ["k_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen2_moe": ["k_proj", "v_proj"],  # as Mixtral: the routed experts hold no layers
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "distilbert": ["k_lin", "v_lin", "ffn.lin2"],
    "deberta": ["in_proj", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "whisper": ["k_proj", "v_proj", "fc2"],
    # transformers 5.4 names ViT's layers key/value/output.dense, later releases k_proj/v_proj/mlp.fc2.
    "vit": ["key", "value", "output.dense", "k_proj", "v_proj", "mlp.fc2"],
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": [],
    "qwen2": ["down_proj"],
    "qwen2_moe": [],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "phi": ["fc2"],
    "opt": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt_neo": ["c_proj"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "bloom": ["mlp.dense_4h_to_h"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "distilbert": ["ffn.lin2"],
    "deberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "t5": ["wo"],
    "mt5": [],
    "bart": ["fc2"],
    "whisper": ["fc2"],
    "vit": ["output.dense", "mlp.fc2"],
}


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class IA3Layer(AdapterLayer):
    """(IA)^3 around ``nn.Linear``, transformers' ``Conv1D`` (GPT-2, weight stored as (in, out)) or a convolution.

    On a convolution the vector scales channels: ``(1, C, 1, ...)`` as peft stores it for ``Conv2d``/``Conv3d``
    (output channels, or input channels for a feed-forward target).
    """

    adapter_attrs = ("ia3_l",)
    adapter_settings = ("is_feedforward",)
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.conv_dims = base_layer.weight.dim() - 2 if isinstance(base_layer, _CONV) else 0
        if self.conv_dims:
            self.out_features, self.in_features = base_layer.out_channels, base_layer.in_channels
        else:
            self.out_features, self.in_features = oriented(base_layer.weight, self.fan_in_fan_out).shape

    def add_adapter(self, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool) -> None:  # type: ignore[override]
        weight = self.base_layer.weight
        dtype = adapter_dtype(weight)
        # (1, in) scales the input's features, (out, 1) the output's: the orientation of W (out, in) they scale.
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        if self.conv_dims:  # channels are dim 1 of a convolution's input and output
            shape = (1, shape[0] * shape[1]) + (1,) * self.conv_dims
        init = torch.ones if init_ia3_weights else torch.randn  # random: not a no-op, for testing merges
        self.ia3_l[adapter_name] = nn.Parameter(init(shape, device=weight.device, dtype=dtype))
        self.is_feedforward[adapter_name] = is_feedforward
        self.active_adapters = [*self.active_adapters, adapter_name]

    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        input_scale = output_scale = None
        for name in adapter_names:
            l = self.ia3_l[name].flatten()  # noqa: E741  (the paper's name)
            if self.is_feedforward[name]:
                input_scale = l if input_scale is None else input_scale * l
            else:
                output_scale = l if output_scale is None else output_scale * l
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * self._channels(input_scale)).to(x.dtype)  # (..., in) * (in,)
        result = self.base_layer(x, *args, **kwargs)
        if output_scale is not None:
            result = (result * self._channels(output_scale)).to(result.dtype)  # (..., out) * (out,)
        return result

    def _channels(self, vector: torch.Tensor) -> torch.Tensor:
        """A ``(features,)`` vector shaped to broadcast over an input or output: ``(C, 1, ...)`` on a convolution."""
        return vector.view(-1, *(1,) * self.conv_dims) if self.conv_dims else vector

    def forward_rows(
        self, rows: list[str | None], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Mixed batch: each row is scaled by its own adapter in ``rows``; ``None`` rows stay base."""
        if x.shape[0] != len(rows):
            raise ValueError(
                f"mixed_batch was given {len(rows)} adapter names but {type(self.base_layer).__name__} got a batch of "
                f"{x.shape[0]} rows; pass one name (or None) per row of the batch."
            )
        # (B, 1, ..., features) for linear layers, (B, channels, 1, ...) for convolutions
        broadcast = (
            (len(rows), -1, *(1,) * self.conv_dims)
            if self.conv_dims
            else (len(rows),) + (1,) * (x.dim() - 2) + (-1,)
        )
        input_scale = self._row_scales(rows, feedforward=True)
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale.view(broadcast)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        output_scale = self._row_scales(rows, feedforward=False)
        if output_scale is not None:
            result = (result * output_scale.view(broadcast)).to(result.dtype)
        return result

    def _row_scales(self, rows: list[str | None], feedforward: bool) -> torch.Tensor | None:
        """(B, features): each row's vector, ones for rows whose adapter scales the other side (or is absent)."""
        vectors = [
            self.ia3_l[n].flatten() if n in self.ia3_l and self.is_feedforward[n] == feedforward else None
            for n in rows
        ]
        present = [v for v in vectors if v is not None]
        if not present:
            return None
        ones = torch.ones_like(present[0])
        return torch.stack([ones if v is None else v for v in vectors])

    # --- merging: W' = l * W (rows) for outputs, W * l (columns) for inputs; b' = l * b for outputs -----------
    def _merged(self, adapter_name: str, undo: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        l = self.ia3_l[adapter_name].detach()  # noqa: E741
        if self.conv_dims:  # weight (out, in, *kernel): scale dim 0 (outputs) or dim 1 (inputs)
            side = (1, -1) if self.is_feedforward[adapter_name] else (-1, 1)
            l = l.flatten().view(*side, *(1,) * self.conv_dims)  # noqa: E741
        with torch.no_grad():
            out_in = oriented(base.weight, self.fan_in_fan_out)  # (out, in)
            weight = oriented(out_in / l if undo else out_in * l, self.fan_in_fan_out).to(base.weight.dtype)
            bias = None
            if not self.is_feedforward[adapter_name] and base.bias is not None:
                bias = (base.bias / l.flatten() if undo else base.bias * l.flatten()).to(base.bias.dtype)
        return weight, bias

    def check_merge(self, adapter_name: str) -> None:
        if (self.ia3_l[adapter_name] == 0).any():
            raise ValueError(
                f"IA3 adapter '{adapter_name}' has exact zeros in ia3_l of {type(self.base_layer).__name__}: merging "
                "would erase weights that unmerge could not restore. The merge was refused; keep it unmerged."
            )
        weight, bias = self._merged(adapter_name)
        self.check_finite(weight, adapter_name, type(self.base_layer).__name__)
        if bias is not None:
            self.check_finite(bias, adapter_name, type(self.base_layer).__name__)

    def merge_adapter(self, adapter_name: str) -> None:
        self.check_merge(adapter_name)
        self._write(*self._merged(adapter_name))

    def unmerge_adapter(self, adapter_name: str) -> None:
        self._write(*self._merged(adapter_name, undo=True))

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)


@register_method
@dataclass(kw_only=True)
class IA3(PEFTMethod):
    """Infused Adapter by Inhibiting and Amplifying Inner Activations.

    Example:
        >>> IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
        'IA3'

    Args:
        target_modules: Linear layers to rescale: names (suffix match), a full-match regex, or ``"all-linear"``.
            ``None`` uses the per-architecture default (keys, values, feed-forward down-projection).
        exclude_modules: Modules to leave alone, same syntax.
        feedforward_modules: Which of the targets are feed-forward layers (their *input* is scaled), same syntax.
            ``None`` uses the per-architecture default; ``[]`` scales every target's output.
        init_ia3_weights: ``True``: vectors start at 1 (no-op). ``False``: random (for tests only).
        modules_to_save: Modules trained in full (e.g. a new classification head).
    """

    peft_type: ClassVar[str] = "IA3"
    mergeable: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"IA3 feedforward_modules {extra} are not in target_modules {self.target_modules}: a feed-forward "
                    "module must also be targeted (as in peft). Add them to target_modules."
                )

    def _resolved(self, model: nn.Module) -> tuple[list[str] | str, list[str] | str]:
        targets, feedforward = self.target_modules, self.feedforward_modules
        if targets is None:
            fix = (
                "pass the key, value and feed-forward output layers, e.g. target_modules=['k_proj', 'v_proj', "
                "'down_proj'], feedforward_modules=['down_proj']."
            )
            targets = default_targets(model, DEFAULT_TARGETS, method="IA3", fix=fix)
        if feedforward is None:
            fix = "name the targets whose input should be scaled, or pass feedforward_modules=[] for none."
            feedforward = default_targets(
                model, DEFAULT_FEEDFORWARD, method="IA3", fix=fix, option="feedforward_modules", separator=":"
            )
        return targets, feedforward

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        targets, feedforward = self._resolved(model)
        found = find_targets(
            model,
            targets,
            supported=(nn.Linear, Conv1D, *_CONV, IA3Layer),
            exclude_modules=self.exclude_modules,
            skip=self.modules_to_save or (),
            linear_types=(nn.Linear, Conv1D),
            method="IA3",
        )
        for name, module in found:  # checked before any layer is replaced
            base = module.base_layer if isinstance(module, IA3Layer) else module
            if (
                isinstance(base, _CONV)
                and base.groups > 1
                and bool(feedforward)
                and name_matches(name, feedforward)
            ):
                raise ValueError(
                    f"IA3: {name} is a grouped convolution (groups={base.groups}); scaling its input channels "
                    "(feedforward_modules) would not fold into its weight. Leave it out of feedforward_modules "
                    "(its output channels are scaled then)."
                )
        for name, module in found:
            layer = module if isinstance(module, IA3Layer) else IA3Layer(module)
            is_feedforward = bool(feedforward) and name_matches(name, feedforward)
            layer.add_adapter(adapter_name, is_feedforward, self.init_ia3_weights)
            if layer is not module:
                replace_module(model, name, layer)

    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        layers = {
            n: m for n, m in model.named_modules() if isinstance(m, IA3Layer) and adapter_name in m.ia3_l
        }
        return {
            "peft_type": self.peft_type,
            # Exact module names: peft's suffix matching then selects the same modules, nothing more.
            "target_modules": sorted(layers),
            "feedforward_modules": sorted(n for n, m in layers.items() if m.is_feedforward[adapter_name]),
            "exclude_modules": None,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
            "init_ia3_weights": self.init_ia3_weights,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> IA3:
        if "feedforward_modules" not in config:
            raise ValueError(
                "adapter_config.json for IA3 lacks 'feedforward_modules': without it, whether each vector scales a "
                "layer's input or its output is unknown and outputs would be silently wrong. Add the list used in "
                "training ([] if none)."
            )
        return cls(
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            feedforward_modules=config["feedforward_modules"] or [],
            init_ia3_weights=config.get("init_ia3_weights", True),
            modules_to_save=config.get("modules_to_save"),
        )
