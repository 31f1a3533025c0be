"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) with rsLoRA, DoRA and PiSSA.

A frozen layer ``W`` gains a trainable low-rank update: ``y = W x + B A dropout(x) * s``
with ``A: (r, in)``, ``B: (out, r)``. ``B`` starts at zero so the adapted model
is the base model at step 0. The scale ``s = alpha / r`` keeps the update's size
independent of ``r`` when tuning ``alpha``; rsLoRA (Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732) uses ``alpha / sqrt(r)``, which keeps the
learning dynamics stable as ``r`` grows. DoRA (Liu et al. 2024,
https://arxiv.org/abs/2402.09353) splits ``W + sBA`` into a trained magnitude and
a direction. PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948)
initialises ``A, B`` from the top singular vectors of ``W`` and keeps the
residual as the base; OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775)
does the same from a QR decomposition of ``W`` (``B`` orthonormal).

Numerics and parameter names follow Hugging Face ``peft`` so saved adapters load there.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import ModulesToSave
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import default_targets, find_targets, pattern_value, replace_module
from lightning_peft.core.transformers_compat import Conv1D
from lightning_peft.methods.lora.eva import (
    EvaConfig,
    check_eva_target,
    eva_alpha,
    eva_config_from,
    fit_to_saved,
    initialize_eva_weights,
)
from lightning_peft.methods.lora.layers import (
    LAYER_TYPES,
    InitOption,
    LoraConv,
    LoraLayer,
    LoraLinear,
    init_display_name,
    lora_layer_type,
    rewrites_base_weight,
)
from lightning_peft.methods.lora.param_wrapper import (
    check_parameter_options,
    find_parameter_targets,
    wrap_parameter,
    wrapped_parameter_names,
)
from lightning_peft.methods.trainable_tokens import (
    TrainableTokens,
    from_lora_layout,
    methods_for_lora_option,
    to_lora_layout,
)

#: Default targets per transformers ``model_type`` when ``target_modules`` is not given: peft's table (the same in
#: peft 0.21.0 to 0.21.2) for every model type it covers, plus distilbert, phi3, whisper, vit and qwen2_moe, which it
#: lacks. A list is matched by suffix; a string (gemma4: the language model's projections only, not the vision or
#: audio towers') is a full-match regex. RefinedWeb, RefinedWebModel, btlm, chatglm and rwkv7 are remote-code models
#: transformers does not ship; their names are peft's.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "stablelm": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "bloom": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "mpt": ["Wqkv"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "whisper": ["q_proj", "v_proj"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],  # the language model's (T5: q/v, OPT: q_proj/v_proj)
    "vit": [
        "query",
        "value",
        "q_proj",
        "v_proj",
    ],  # transformers 5.4 names them query/value, later q_proj/v_proj
}


@register_method
@dataclass(kw_only=True)
class LoRA(PEFTMethod):
    """Low-rank adaptation of linear, embedding and convolution layers.

    Example:
        >>> from lightning_peft.methods import LoRA
        >>> LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).r
        8

    Args:
        target_modules: Names (suffix match), a full-match regex, or ``"all-linear"``. ``None`` uses the
            per-architecture default (e.g. ``q_proj, v_proj`` for Llama).
        exclude_modules: Modules to leave alone, same syntax.
        r: Rank of the update.
        alpha: Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the adapter's input, in ``[0, 1)``.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of the adapted layers).
        use_rslora: Rank-stabilised scaling.
        use_dora: Weight-decomposed LoRA (trained magnitude per output row).
        init_lora_weights: ``True`` (kaiming A, zero B), ``"gaussian"``, ``"pissa"``, ``"pissa_niter_<n>"``,
            ``"olora"`` (QR of the base weight; like PiSSA it rewrites the base to the residual), ``"eva"`` (from
            the inputs of training batches, see :mod:`.eva`; PEFTCallback runs it at fit start), ``"loftq"``
            (QLoRA only, see :mod:`.loftq`) or ``False`` (random B: not a no-op; for tests).
        eva_config: EVA's settings (an :class:`~lightning_peft.methods.lora.eva.EvaConfig` or a dict of its fields)
            when ``init_lora_weights="eva"``.
        rank_pattern: ``{regex: r}`` per-module rank overrides (matched against the module name's tail).
        alpha_pattern: ``{regex: alpha}`` per-module alpha overrides.
        trainable_token_indices: Embedding rows trained beside the adapter (peft's option): token ids of the input
            embedding, or ``{module name: ids}``; only those rows are saved (a tied head follows them).
        target_parameters: Parameters adapted directly (peft's option), for weights no Linear holds: the fused 3-D
            expert weights of MoE blocks, e.g. ``["experts.gate_up_proj", "experts.down_proj"]`` (full name or
            ``.``-suffix). One update per expert; no dropout or DoRA there. ``target_modules=[]`` adapts only these.
        modules_to_save: Modules trained in full (e.g. a new classification head).
    """

    peft_type: ClassVar[str] = "LORA"
    mergeable: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: InitOption = True
    eva_config: EvaConfig | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None

    def validate(self) -> None:
        if self.target_parameters is not None:
            check_parameter_options(
                self.target_parameters,
                dropout=self.dropout,
                use_dora=self.use_dora,
                init=self.init_lora_weights,
            )
        if self.trainable_token_indices is not None:
            self._token_methods()  # each TrainableTokens validates its indices here, at construction
        for where, rank in [
            ("r", self.r),
            *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()),
        ]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(
                    f"LoRA {where}={rank!r}: the rank must be an integer >= 1 (typical: 4 to 64)."
                )
        for where, alpha in [
            ("alpha", self.alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if not alpha > 0:
                raise ValueError(
                    f"LoRA {where}={alpha!r}: alpha must be > 0 (common choices: alpha = r or 2r)."
                )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be in [0, 1); use 0 to disable dropout.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoRA bias={self.bias!r} must be one of 'none', 'all', 'lora_only'.")
        init = self.init_lora_weights
        if not (
            isinstance(init, bool)
            or init in ("gaussian", "pissa", "olora", "eva", "loftq")
            or re.fullmatch(r"pissa_niter_\d+", str(init))
        ):
            raise ValueError(
                f"LoRA init_lora_weights={init!r}: use True, False, 'gaussian', 'eva', 'loftq' (QLoRA), 'pissa', "
                "'pissa_niter_<n>' or 'olora'."
            )
        if init == "eva":
            self.eva_config = eva_config_from(self.eva_config)
        elif self.eva_config is not None:
            raise ValueError(
                f"LoRA eva_config is set but init_lora_weights={init!r}; set init_lora_weights='eva' or drop it."
            )
        if init == "loftq" and not hasattr(self, "loftq_iter"):
            raise ValueError(
                "LoRA init_lora_weights='loftq' needs a quantized base built by LoftQ: use "
                "QLoRA(init_lora_weights='loftq', ...), which quantizes the residual W - BA itself."
            )
        if self.use_dora and rewrites_base_weight(init):
            raise ValueError(
                f"LoRA: use_dora=True cannot be combined with {init_display_name(init)} initialisation; pick one."
            )

    def resolve_target_modules(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        return default_targets(
            model,
            DEFAULT_TARGETS,
            method="LoRA",
            fix="pass e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'.",
        )

    def _module_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules to wrap; none where only ``target_parameters`` are meant (``target_modules=[]``, or ``None``
        on a model without default modules), as in peft."""
        if self.target_parameters and self.target_modules is not None and len(self.target_modules) == 0:
            return []
        try:
            spec = self.resolve_target_modules(model)
        except ValueError:
            if self.target_parameters and self.target_modules is None:
                return []
            raise
        return find_targets(
            model,
            spec,
            supported=(*LAYER_TYPES, LoraLayer),
            exclude_modules=self.exclude_modules,
            skip=self.modules_to_save or (),
            linear_types=(nn.Linear, Conv1D),
            method="LoRA",
        )

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        targets = self._module_targets(model)
        parameters = (
            find_parameter_targets(model, self.target_parameters, module_targets={n for n, _ in targets})
            if self.target_parameters
            else []
        )
        # Check every target before changing any (PiSSA rewrites base weights), so a refusal leaves the model as is.
        planned = []
        for name, module in targets:
            layer = module if isinstance(module, LoraLayer) else lora_layer_type(module)(module)
            r = int(pattern_value(name, self.rank_pattern, self.r))
            self._check_target(name, layer, r)
            planned.append((name, module, layer, r, pattern_value(name, self.alpha_pattern, self.alpha)))
        _warn_about_ranks_beyond_width(planned)
        for name, module, layer, r, alpha in planned:
            layer.add_adapter(
                adapter_name, r, alpha, self.dropout, self.use_rslora, self.use_dora, self.init_lora_weights
            )
            if layer is not module:
                replace_module(model, name, layer)
        for target in parameters:  # in module and registration order: a module's parameters nest as in peft
            r = int(pattern_value(target.name, self.rank_pattern, self.r))
            alpha = pattern_value(target.name, self.alpha_pattern, self.alpha)
            wrap_parameter(model, target).add_adapter(
                adapter_name, r, alpha, self.use_rslora, self.init_lora_weights
            )
        for tokens in self._token_methods():  # rows trained beside the LoRA layers, in the same adapter
            tokens.inject_layers(model, adapter_name)

    def _token_methods(self) -> list[TrainableTokens]:
        """``trainable_token_indices`` as peft reads it: a list for the input embedding, or ``{module: ids}``."""
        option = self.trainable_token_indices
        return [] if option is None else methods_for_lora_option(option)

    def to_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Token rows as peft's LoRA files hold them (``<embedding>.token_adapter.``, no tied head copy)."""
        return to_lora_layout(model, adapter_name, tensors) if self.trainable_token_indices else tensors

    def from_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return from_lora_layout(model, adapter_name, tensors) if self.trainable_token_indices else tensors

    def _check_target(self, name: str, layer: LoraLayer, r: int) -> None:
        kind = type(layer.base_layer).__name__
        groups = getattr(layer.base_layer, "groups", 1) if isinstance(layer, LoraConv) else 1
        if groups > 1 and (r % groups or self.use_dora):
            raise ValueError(
                f"LoRA on the grouped convolution {name} (groups={groups}): "
                + ("DoRA is not supported there." if self.use_dora else f"r={r} must be a multiple of groups (B is "
                   f"grouped, as in peft); set r (or rank_pattern for this module) to e.g. {groups * max(1, r // groups)}.")
            )  # fmt: skip
        if self.use_dora and not isinstance(layer, (LoraLinear, LoraConv)):
            raise ValueError(
                f"LoRA use_dora=True: DoRA supports Linear, Conv1D and convolution layers; {name} is {kind}."
            )
        init = self.init_lora_weights
        if init == "eva":
            check_eva_target(name, layer, r, self.eva_config.rho)
        if rewrites_base_weight(init):
            what = init_display_name(init)
            if not isinstance(layer, LoraLinear):
                raise ValueError(
                    f"LoRA init_lora_weights={init!r}: {what} supports {'Linear' if init == 'olora' else 'Linear/Conv1D'} "
                    f"layers; {name} is {kind}."
                )
            if init == "olora" and layer.fan_in_fan_out:
                # peft runs OLoRA on the stored (in, out) Conv1D weight, so a file of ours would not load there.
                raise ValueError(
                    f"LoRA init_lora_weights='olora': {name} is a GPT-2 style Conv1D; peft re-runs OLoRA on load "
                    "from its transposed weight and fails, so the adapter would not be portable. Use "
                    "init_lora_weights='pissa' (or True) for this model."
                )
            if r > min(layer.in_features, layer.out_features):
                raise ValueError(
                    f"LoRA init_lora_weights={init!r}: {what} needs r <= min(out, in) = "
                    f"{min(layer.in_features, layer.out_features)} for {name}, got r={r}; lower r (or set "
                    "rank_pattern for this module)."
                )

    # --- EVA: ranks and A from the data, at fit start ----------------------------------------------------------
    def needs_training_data(self) -> bool:
        return self.init_lora_weights == "eva"

    def initialize_from_data(
        self, model: nn.Module, adapter_name: str, batches: Any, broadcast: Any = None
    ) -> None:
        if self.init_lora_weights == "eva":
            initialize_eva_weights(model, batches, adapter_name, broadcast=broadcast)

    def fit_to_checkpoint(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        if self.init_lora_weights != "eva":
            return
        shapes = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                saved = state.get(f"{name}.lora_A.{adapter_name}.weight")
                shapes[name] = None if saved is None else saved.shape
        if all(shape is None for shape in shapes.values()):
            return  # not a checkpoint of this adapter: the callback's key check names what is missing

        def alpha_of(name: str, rank: int) -> float:
            r = int(pattern_value(name, self.rank_pattern, self.r))
            return eva_alpha(pattern_value(name, self.alpha_pattern, self.alpha), r, rank, self.eva_config)

        fit_to_saved(model, adapter_name, alpha_of, self.use_rslora, shapes)

    def _eva_file_fields(self, model: nn.Module, adapter_name: str, targeted: list[str]) -> dict[str, Any]:
        """EVA's per-module ranks and alphas as peft writes them: ``{module name: value}`` where they differ from
        ``r`` / ``alpha`` (peft replaces the patterns by these), and peft's ``eva_config``."""
        if self.init_lora_weights != "eva":
            return {}
        rank_pattern, alpha_pattern = {}, {}
        for name in targeted:
            rank = model.get_submodule(name).r[adapter_name]
            r = int(pattern_value(name, self.rank_pattern, self.r))
            alpha = eva_alpha(pattern_value(name, self.alpha_pattern, self.alpha), r, rank, self.eva_config)
            if rank != self.r:
                rank_pattern[name] = rank
            if alpha != self.alpha:
                alpha_pattern[name] = alpha
        eva_config = self.eva_config.to_peft()
        return {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "eva_config": eva_config}

    def extra_state_names(self, model: nn.Module, adapter_name: str) -> list[str]:
        if self.bias == "all":
            # Not inside a modules_to_save wrapper: its original stays frozen, its copies are adapter state already.
            wrapped = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, ModulesToSave))
            return [
                name
                for name, _ in model.named_parameters()
                if (name == "bias" or name.endswith(".bias"))
                and "lora_" not in name
                and not name.startswith(wrapped)
            ]
        if self.bias == "lora_only":
            return [
                f"{name}.base_layer.bias"
                for name, module in model.named_modules()
                if isinstance(module, LoraLayer)
                and adapter_name in module.r
                and module.base_layer.bias is not None
            ]
        return []

    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        targeted = sorted(
            n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r
        )
        return {
            "peft_type": self.peft_type,
            # The exact module names: peft's suffix matching then selects the same modules, nothing more.
            "target_modules": targeted,
            "exclude_modules": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": any(
                getattr(m, "fan_in_fan_out", False) for n, m in model.named_modules() if n in targeted
            ),
            "trainable_token_indices": self.trainable_token_indices,
            **self._eva_file_fields(model, adapter_name, targeted),
            # The exact parameter names, as for target_modules (peft matches them by the same suffix rule).
            "target_parameters": wrapped_parameter_names(model, adapter_name) or None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoRA:
        if "lora_alpha" not in config or "r" not in config:
            raise ValueError(
                "adapter_config.json for LORA lacks 'r' or 'lora_alpha'; without them the adapter's scale is unknown "
                "and outputs would be silently wrong. Add the values used in training."
            )
        return cls(
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            bias=config.get("bias", "none"),
            use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora")
            or False,  # absent (or null) in pre-DoRA files: explicitly plain LoRA
            # EVA and LoftQ set A/B once, from data or the base; a saved adapter holds them (and its ranks): as
            # peft's own LoftQ example does, load it as plain LoRA.
            init_lora_weights=_loaded_init(config.get("init_lora_weights", True)),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            trainable_token_indices=config.get("trainable_token_indices"),
            target_parameters=config.get("target_parameters"),
            modules_to_save=config.get("modules_to_save"),
        )


def _loaded_init(init: InitOption) -> InitOption:
    return True if init in ("eva", "loftq") else init


def _warn_about_ranks_beyond_width(planned: list[tuple[str, nn.Module, LoraLayer, int, float]]) -> None:
    """A rank above min(in, out) adds parameters but no expressiveness: B @ A cannot exceed the layer's rank."""
    wide = [
        (name, r, width)
        for name, _, layer, r, _ in planned
        if (width := min(getattr(layer, "in_features", r), getattr(layer, "out_features", r))) < r
    ]
    if wide:
        name, r, width = wide[0]
        warnings.warn(
            f"LoRA r={r} exceeds the width of {len(wide)} target layers (e.g. {name}: min(in, out) = {width}): the "
            "update cannot have a higher rank than the layer, so the extra parameters add nothing. Lower r, set "
            "rank_pattern for those layers, or train them in full (modules_to_save).",
            stacklevel=4,
        )
