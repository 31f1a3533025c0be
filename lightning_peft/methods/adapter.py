"""Bottleneck adapters: Houlsby, Pfeiffer and parallel.

A bottleneck ``f(h) = up(act(down(h)))`` projects the hidden size ``d`` down to ``d / reduction_factor`` and
back. Where it joins the block is what distinguishes the styles:

* ``"houlsby"`` (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751): sequential, ``h + f(h)``, on the output
  of both the attention and the feed-forward sublayer, before the block adds the residual (and normalises);
* ``"pfeiffer"`` (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247): the same, after the feed-forward
  sublayer only;
* ``"parallel"`` (He et al. 2022, https://arxiv.org/abs/2110.04366): beside the sublayer, reading its input
  ``x``: ``sublayer(x) + s * f(x)``, with ``s = 4`` as in the paper.

``up`` starts at zero, so ``f = 0`` and the adapted model is exactly the base model at init.

Insertion needs no copy of any attention code: a :class:`BottleneckLayer` wraps an existing submodule of each
block and edits only its output (or, for post-LayerNorm blocks, the residual it receives).
:func:`insertion_points` knows where those submodules are in the Llama/Mistral/Qwen2, GPT-2 and BERT/RoBERTa
families, and takes module names for any other model. :class:`Bottleneck`, :class:`BottleneckLayer` and
:func:`insertion_points` are the parts that composite methods (MAM adapter, UniPELT) build on.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer, adapter_dtype
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import TargetSpec, find_targets, replace_module
from lightning_peft.core.transformers_compat import ACT2FN, Conv1D

Sublayer = Literal["attention", "feed_forward"]
#: How a bottleneck joins the wrapped module ``m``:
#: ``"sequential"``: ``m(x) + s f(m(x))``; ``"parallel"``: ``m(x) + s f(x)`` (``x``: m's first argument);
#: ``"parallel_residual"``: ``m(x, r + s f(r))`` for post-LN modules ``m(x, r) = LN(g(x) + r)`` (BERT's
#: ``*Output``), i.e. ``LN(g(x) + r + s f(r))`` where ``r`` is the sublayer's input.
Placement = Literal["sequential", "parallel", "parallel_residual"]


@dataclass(frozen=True)
class BlockLayout:
    """Where the sublayers of one architecture family's blocks are, in ``target_modules`` syntax."""

    #: Module whose output is the sublayer's output before the residual add (sequential bottlenecks).
    attention_output: TargetSpec
    feed_forward_output: TargetSpec
    #: Module computing the sublayer from its input (parallel bottlenecks).
    attention: TargetSpec
    feed_forward: TargetSpec
    #: Post-LayerNorm blocks: the parallel branch joins through the ``*Output`` module's residual argument.
    parallel_placement: Placement = "parallel"


_DECODER = BlockLayout(["self_attn.o_proj"], ["mlp.down_proj"], ["self_attn"], ["mlp"])
_BERT = BlockLayout(
    ["attention.output.dense"],
    r".*layer\.\d+\.output\.dense",  # a regex: the suffix "output.dense" also names attention.output.dense
    ["attention.output"],
    r".*layer\.\d+\.output",
    parallel_placement="parallel_residual",
)
# Sparse MoE blocks: the experts' weights are stacked 3-D tensors, so the bottleneck wraps the whole routed block
# (sized by the model's hidden size where the block holds no linear layer).
_MOE = BlockLayout(["self_attn.o_proj"], ["mlp"], ["self_attn"], ["mlp"])
_GPT2 = BlockLayout(["attn.c_proj"], ["mlp.c_proj"], ["attn"], ["mlp"])
#: Each family's blocks checked against the layout on a tiny model (tests/test_default_targets.py): Gemma 2/3 norm
#: the sublayer outputs before the residual add (the bottleneck joins before that norm, inside the sublayer), Phi-3
#: fuses gate and up projections, StableLM may run attention and MLP on the same input (parallel residual).
LAYOUTS: dict[str, BlockLayout] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "stablelm": _DECODER,
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "layoutlm": _BERT,
    "deberta": _BERT,
    "deberta-v2": _BERT,
}


def insertion_points(
    model: nn.Module,
    sublayer: Sublayer,
    parallel: bool,
    modules: TargetSpec = None,
    skip: Sequence[str] = (),
    method: str = "Adapter",
) -> list[tuple[str, nn.Module, Placement]]:
    """The modules a bottleneck on ``sublayer`` wraps in every block, and how it joins each.

    Args:
        model: The model.
        sublayer: ``"attention"`` or ``"feed_forward"``.
        parallel: Parallel bottleneck (reads the sublayer's input) rather than sequential (reads its output).
        modules: User-given modules (``target_modules`` syntax) for models without a default layout: each one's
            output must be the sublayer's output before the residual add; a parallel bottleneck reads its first
            argument.
        skip: Modules never to wrap (e.g. ``modules_to_save``).
        method: Method name for error messages.

    Raises:
        ValueError: no default layout for the model and no ``modules`` given, or nothing matches.
    """
    placement: Placement = "parallel" if parallel else "sequential"
    if modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in LAYOUTS:
            raise ValueError(
                f"{method}: no default {sublayer} insertion point for model_type={model_type!r} (defaults exist for "
                f"{sorted(LAYOUTS)}); pass {sublayer}_modules, the modules whose output is the {sublayer} "
                "sublayer's output before the residual add, e.g. ['self_attn'] / ['mlp']."
            )
        layout = LAYOUTS[model_type]
        if parallel:
            modules = layout.attention if sublayer == "attention" else layout.feed_forward
            placement = layout.parallel_placement
        else:
            modules = layout.attention_output if sublayer == "attention" else layout.feed_forward_output
    found = find_targets(model, modules, supported=(nn.Module,), skip=skip, method=f"{method} {sublayer}")
    return [(name, module, placement) for name, module in found]


def input_size(module: nn.Module) -> int | None:
    """Input width of a block's submodule: that of its first linear layer (``None`` if it holds none)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        return None
    first = linears[0]
    return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]


def check_parallel_width(name: str, module: nn.Module, method: str, model_width: int | None = None) -> None:
    """A parallel bottleneck reads the module's input and adds to its output: both must be the hidden state."""
    width_in, width_out = input_size(module), hidden_size(module, model_width)
    if width_in is not None and width_in != width_out:
        raise ValueError(
            f"{method}: a parallel bottleneck beside {name} ({type(module).__name__}) would read its {width_in}-wide "
            f"input and add to its {width_out}-wide output; the widths must be equal (the hidden size). Pass the "
            "module that computes the whole sublayer from the hidden state (e.g. ['mlp']); models whose "
            "feed-forward is inline in the block (fc1/fc2 as in OPT, BART, Whisper) have none: use style='houlsby' "
            "or 'pfeiffer' there."
        )


def hidden_size(module: nn.Module, default: int | None = None) -> int:
    """Output width of a block's submodule: its own, or that of its last linear layer (e.g. ``o_proj``).

    A block that maps the hidden state to itself may end in a narrower side branch (Qwen2-MoE's
    ``shared_expert_gate``, hidden -> 1, registered after the shared expert): where some linear layer writes the
    width the first one reads, the last such layer gives the output width. A block with no linear layer (Mixtral's
    routed experts, stacked in 3-D parameters) has width ``default``, the model's hidden size, where one is known.
    """
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears and default is not None:
        return default
    if not linears:
        raise ValueError(
            f"Adapter: cannot tell the hidden size of {type(module).__name__}: it holds no linear layer. Point the "
            "insertion at the sublayer's output projection instead."
        )
    width_in = input_size(module)
    back_to_input = [m for m in linears if hidden_size(m) == width_in]
    return hidden_size((back_to_input or linears)[-1])


def _model_hidden_size(model: nn.Module) -> int | None:
    """The residual stream's width from a transformers config (its text part for multimodal ones), if any."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    return width if isinstance(width, int) else None


class Bottleneck(nn.Module):
    """``up(act(down(dropout(h))))``: ``d -> d / reduction_factor -> d``; ``up`` zero-initialised (identity).

    A subclass may scale the output per token by a ``gate`` on the input, ``g(h) * f(h)``, built by
    :meth:`build_gate` (UniPELT's :class:`~lightning_peft.methods.composite.gating.GatedBottleneck`).
    """

    def __init__(
        self,
        dim: int,
        reduction_factor: float = 16,
        non_linearity: str = "relu",
        dropout: float = 0.0,
        init_weights: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        size = max(1, int(dim // reduction_factor))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # down keeps nn.Linear's kaiming_uniform(a=sqrt 5) init; up = 0 makes the whole bottleneck output 0
        self.down = nn.Linear(dim, size, device=device, dtype=dtype)
        self.act = ACT2FN[non_linearity]
        self.up = nn.Linear(size, dim, device=device, dtype=dtype)
        if init_weights:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.gate = self.build_gate(dim, device, dtype)

    def build_gate(
        self, dim: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> nn.Module | None:
        """A ``(..., d) -> (..., 1)`` module whose output scales the bottleneck's, or ``None`` (no gate)."""
        return None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(self.dropout(h))))  # (..., d) -> (..., d/rf) -> (..., d)
        return out if self.gate is None else self.gate(h) * out  # (..., 1) * (..., d)


class BottleneckLayer(AdapterLayer):
    """Wraps a block's submodule and joins one bottleneck per adapter to it (see :data:`Placement`)."""

    adapter_attrs = ("bottleneck",)
    adapter_settings = ("placement", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()
        self.placement: dict[str, Placement] = {}
        self.scaling: dict[str, float] = {}
        # Names of the wrapped forward's first two parameters: model code passes them by keyword or position.
        inner = base_layer
        while isinstance(inner, AdapterLayer):  # another method's wrapper takes (*args, **kwargs)
            inner = inner.base_layer
        self._arg_names = list(inspect.signature(inner.forward).parameters)[:2]

    def add_adapter(  # type: ignore[override]
        self, adapter_name: str, module: nn.Module, placement: Placement, scaling: float
    ) -> None:
        """Add ``module`` (a :class:`Bottleneck`, or any ``(..., d) -> (..., d)`` module) as adapter ``adapter_name``."""
        if placement == "parallel_residual" and len(self._arg_names) < 2:
            raise ValueError(
                f"{type(self.base_layer).__name__} takes no residual argument to join a bottleneck to."
            )
        self.bottleneck[adapter_name] = module
        self.placement[adapter_name] = placement
        self.scaling[adapter_name] = scaling
        self.active_adapters = [*self.active_adapters, adapter_name]

    def _branch(self, name: str, h: torch.Tensor) -> torch.Tensor:
        f = self.bottleneck[name]
        dtype = next(f.parameters()).dtype
        return (self.scaling[name] * f(h.to(dtype))).to(h.dtype)

    def _get(self, index: int, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        name = self._arg_names[index]
        if name in kwargs:
            return kwargs[name], True
        return args[index], False

    def adapted_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        active = adapter_names
        x, _ = self._get(0, args, kwargs)
        for name in active:
            if self.placement[name] == "parallel_residual":
                residual, by_name = self._get(1, args, kwargs)
                residual = residual + self._branch(name, residual)
                if by_name:
                    kwargs = {**kwargs, self._arg_names[1]: residual}
                else:
                    args = (*args[:1], residual, *args[2:])
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # attention modules return (output, weights)
        for name in active:
            if self.placement[name] == "sequential":
                h = h + self._branch(name, h)
            elif self.placement[name] == "parallel":
                h = h + self._branch(name, x)
        return (h, *out[1:]) if isinstance(out, tuple) else h


_STYLE_SUBLAYERS: dict[str, list[Sublayer]] = {
    "houlsby": ["attention", "feed_forward"],
    "pfeiffer": ["feed_forward"],
    "parallel": ["feed_forward"],  # He et al.: the parallel adapter works best on the feed-forward sublayer
}


@register_method
@dataclass(kw_only=True)
class Adapter(PEFTMethod):
    """Bottleneck adapters after (or beside) the attention and/or feed-forward sublayer of every block.

    Example:
        >>> Adapter(style="parallel").resolved_scaling()
        4.0

    Args:
        style: ``"houlsby"`` (sequential, after attention and feed-forward), ``"pfeiffer"`` (sequential, after
            feed-forward) or ``"parallel"`` (beside the sublayer, scaled).
        reduction_factor: Hidden size divided by the bottleneck size (16: a 4096-wide model gets 256).
        non_linearity: Activation between the projections, a transformers ``ACT2FN`` name (``"relu"``,
            ``"gelu"``, ``"swish"``, ``"tanh"``, ...).
        scaling: Multiplier of the bottleneck's output; ``None``: 4.0 for ``"parallel"`` (He et al.), else 1.0.
        sublayers: Which sublayers get a bottleneck; ``None``: the style's own (see above; ``"parallel"``: the
            feed-forward only, as in He et al.).
        dropout: Dropout on the bottleneck's input.
        attention_modules: For models without a default layout: modules whose output is the attention
            sublayer's output before the residual add (e.g. ``["self_attn"]``), ``target_modules`` syntax.
        feed_forward_modules: The same for the feed-forward sublayer (e.g. ``["mlp"]``).
        init_weights: ``True``: ``up`` starts at zero (exact identity). ``False``: random (for tests only).
        modules_to_save: Modules trained in full (e.g. a new classification head).
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"
    #: The bottleneck built at every insertion point (a composite method's variant may add a gate).
    bottleneck_class: ClassVar[type[Bottleneck]] = Bottleneck

    style: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    scaling: float | None = None
    sublayers: list[Sublayer] | None = None
    dropout: float = 0.0
    attention_modules: list[str] | str | None = None
    feed_forward_modules: list[str] | str | None = None
    init_weights: bool = True

    def validate(self) -> None:
        if self.style not in _STYLE_SUBLAYERS:
            raise ValueError(f"Adapter style={self.style!r} must be one of {sorted(_STYLE_SUBLAYERS)}.")
        if not self.reduction_factor > 0:
            raise ValueError(
                f"Adapter reduction_factor={self.reduction_factor!r} must be > 0 (typical: 2 to 64; 16 by default)."
            )
        if self.non_linearity not in ACT2FN:
            raise ValueError(
                f"Adapter non_linearity={self.non_linearity!r} is unknown; use one of "
                f"{', '.join(sorted(k for k in ACT2FN if '_' not in k))}."
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"Adapter dropout={self.dropout!r} must be in [0, 1).")
        if self.sublayers is not None:
            unknown = [s for s in self.sublayers if s not in ("attention", "feed_forward")]
            if unknown or not self.sublayers:
                raise ValueError(
                    f"Adapter sublayers={self.sublayers!r}: use a non-empty list of 'attention', 'feed_forward'."
                )

    def resolved_scaling(self) -> float:
        if self.scaling is not None:
            return float(self.scaling)
        return 4.0 if self.style == "parallel" else 1.0

    def resolved_sublayers(self) -> list[Sublayer]:
        return list(self.sublayers) if self.sublayers is not None else _STYLE_SUBLAYERS[self.style]

    def build_bottleneck(self, dim: int, device: torch.device, dtype: torch.dtype) -> Bottleneck:
        """One bottleneck of width ``dim``, a :attr:`bottleneck_class`."""
        return self.bottleneck_class(
            dim, self.reduction_factor, self.non_linearity, self.dropout, self.init_weights, device, dtype
        )

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        parallel = self.style == "parallel"
        sites: list[tuple[str, nn.Module, Placement]] = []
        for sublayer in self.resolved_sublayers():
            given = self.attention_modules if sublayer == "attention" else self.feed_forward_modules
            sites += insertion_points(model, sublayer, parallel, given, skip=self.modules_to_save or ())
        model_width = _model_hidden_size(model)
        for name, module, placement in sites:
            if placement == "parallel":  # parallel_residual reads the residual argument, the hidden state
                check_parallel_width(name, module, "Adapter", model_width)
        for name, module, placement in sites:
            layer = module if isinstance(module, BottleneckLayer) else BottleneckLayer(module)
            weight = next(module.parameters())
            # Half-precision bases get fp32 bottlenecks (as LoRA does): tiny, and far better optimised.
            dtype = adapter_dtype(weight)
            bottleneck = self.build_bottleneck(hidden_size(module, model_width), weight.device, dtype)
            layer.add_adapter(adapter_name, bottleneck, placement, self.resolved_scaling())
            if layer is not module:
                replace_module(model, name, layer)
