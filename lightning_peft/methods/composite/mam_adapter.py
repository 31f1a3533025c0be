"""MAM adapter (He et al. 2022, https://arxiv.org/abs/2110.04366): a prefix on attention, a parallel adapter on FFN.

He et al. read prefix tuning, adapters and LoRA as one family of changes to hidden states and compare where
the change is made, how it joins the sublayer and how large it is. Their "mix-and-match" adapter takes what worked
best at each place: a short prefix (``l = 30``) on the attention sublayer, and a large, scaled *parallel* adapter
on the feed-forward sublayer (bottleneck 512 on their 1024-wide models, output scale ``s = 4``). The
feed-forward sublayer uses the larger share of the budget, where extra capacity helped most.

Here it is the union (:mod:`lightning_peft.methods.composite.compose`) of two existing methods, not new modules:
:class:`~lightning_peft.methods.PrefixTuning` (Li & Liang's reparametrised prefix, which needs no attention code)
and :class:`~lightning_peft.methods.Adapter` in ``"parallel"`` style on the feed-forward only.

Output at init: the parallel adapter adds exactly 0 (its up-projection starts at 0), but the prefix is random, so,
as with :class:`~lightning_peft.methods.PrefixTuning`, the model at step 0 is the base model reading a random
prefix, not the base model itself. MAM cannot merge (a prefix is not a weight change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.methods.adapter import Adapter
from lightning_peft.methods.composite.compose import ComposedMethod
from lightning_peft.methods.prompt.prefix_tuning import PrefixTuning


@register_method
@dataclass(kw_only=True)
class MAMAdapter(ComposedMethod):
    """Prefix tuning on every attention layer plus a scaled parallel bottleneck beside every feed-forward.

    Defaults follow He et al. and AdapterHub's ``MAMConfig``: ``prefix_length=30``, a prefix MLP 800 wide,
    ``reduction_factor=2`` (a 1024-wide model gets He et al.'s 512-wide bottleneck, 384 for 768-wide models), and
    ``scaling=4``. On wide decoders (4096) a larger ``reduction_factor`` (e.g. 8, again 512) keeps the adapter
    small. The prefix MLP is needed for training only; saved prefixes can be reduced to their output with
    :func:`~lightning_peft.methods.prompt.virtual_tokens.freeze_prompt_encoder`.

    Example:
        >>> [type(m).__name__ for m in MAMAdapter(modules_to_save=["classifier"]).members()]
        ['PrefixTuning', 'Adapter']

    Args:
        prefix_length: Prefix length per attention layer (PrefixTuning's ``num_virtual_tokens``).
        encoder_hidden_size: Width of the prefix's reparametrisation MLP; ``None``: the model's hidden size.
        reduction_factor: Hidden size divided by the parallel adapter's bottleneck size.
        scaling: Multiplier of the parallel adapter's output (``s`` in He et al.).
        non_linearity: Activation inside the bottleneck (a transformers ``ACT2FN`` name).
        dropout: Dropout on the bottleneck's input.
        feed_forward_modules: For models without a default layout: the feed-forward modules (``target_modules``
            syntax) whose input the parallel adapter reads, e.g. ``["mlp"]``.
        modules_to_save: Modules trained in full, e.g. ``["classifier"]`` for a new classification head.
    """

    peft_type: ClassVar[str] = "MAM_ADAPTER"

    prefix_length: int = 30
    encoder_hidden_size: int | None = 800
    reduction_factor: float = 2
    scaling: float = 4.0
    non_linearity: str = "relu"
    dropout: float = 0.0
    feed_forward_modules: list[str] | str | None = None

    def validate(self) -> None:
        n = self.prefix_length
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"MAMAdapter prefix_length={n!r} must be an integer >= 1 (He et al.: 30).")
        super().validate()

    def members(self) -> list[PEFTMethod]:
        return [
            PrefixTuning(
                num_virtual_tokens=self.prefix_length,
                encoder_hidden_size=self.encoder_hidden_size,
                modules_to_save=self.modules_to_save,
            ),
            Adapter(  # last: it wraps each whole feed-forward module
                style="parallel",
                sublayers=["feed_forward"],
                reduction_factor=self.reduction_factor,
                scaling=self.scaling,
                non_linearity=self.non_linearity,
                dropout=self.dropout,
                feed_forward_modules=self.feed_forward_modules,
                modules_to_save=self.modules_to_save,
            ),
        ]
