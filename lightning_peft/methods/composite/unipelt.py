"""UniPELT (Mao et al. 2022, https://arxiv.org/abs/2110.07577): LoRA, prefix tuning and an adapter, each gated.

Which parameter-efficient method works best differs by task and by amount of data, and no single one wins
everywhere. UniPELT trains three at once and lets learned gates decide, per input, how much each contributes:

* LoRA on the attention's query and value projections, ``W x + g_L(x) * s * B A x``;
* prefix tuning on every attention layer, the layer's prefix keys and values scaled by ``g_P``;
* a sequential bottleneck adapter after the feed-forward sublayer (Pfeiffer placement, as AdapterHub's
  ``UniPELTConfig``; ``adapter_style="houlsby"`` adds one after attention too), ``h + g_A(h) * f(h)``;

each gate ``g = sigmoid(W x + b)`` computed from the input of the sublayer it acts on
(:mod:`lightning_peft.methods.composite.gating` has the details and the per-sequence prefix gate).

Here it is the union (:mod:`lightning_peft.methods.composite.compose`) of the existing LoRA, PrefixTuning and Adapter
methods, each given a gate through an optional hook of its own layer; no module is copied.

Output at init: LoRA's ``B`` and the adapter's up-projection start at 0, so those parts add exactly 0, but the
prefix is random: the model at step 0 is the base model reading a random prefix scaled by gates near 0.5. The gates'
own gradients are 0 at step 0 for LoRA and the adapter (their parts output 0) and flow once ``B`` and ``up`` move.
UniPELT cannot merge: its parts depend on the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.methods.composite.compose import ComposedMethod
from lightning_peft.methods.composite.gating import GatedAdapter, GatedLoRA, GatedPrefixTuning


@register_method
@dataclass(kw_only=True)
class UniPELT(ComposedMethod):
    """Gated LoRA + gated prefix tuning + gated sequential adapter, trained together.

    Defaults follow Mao et al. (prefix length 10, LoRA rank 8, adapter bottleneck ``d / 16``: 48 on BERT-base) and
    AdapterHub's ``UniPELTConfig``; ``lora_alpha = r`` gives the update scale 1 that AdapterHub's gated LoRA uses.

    Example:
        >>> [type(m).__name__ for m in UniPELT().members()]
        ['GatedLoRA', 'GatedPrefixTuning', 'GatedAdapter']

    Args:
        target_modules: LoRA's targets (names, a regex, or ``"all-linear"``); ``None``: the query and value
            projections of the Llama/Mistral/Qwen2, GPT-2 (fused ``c_attn``) and BERT/RoBERTa families.
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is multiplied by ``lora_alpha / lora_r`` and by its gate).
        lora_dropout: Dropout on LoRA's input.
        prefix_length: Prefix length per attention layer.
        encoder_hidden_size: Width of the prefix's reparametrisation MLP; ``None``: the model's hidden size.
        adapter_style: ``"pfeiffer"`` (after the feed-forward) or ``"houlsby"`` (after attention and feed-forward).
        reduction_factor: Hidden size divided by the adapter's bottleneck size.
        non_linearity: Activation inside the bottleneck (a transformers ``ACT2FN`` name).
        attention_modules: For models without a default layout (``"houlsby"`` only): modules whose output is the
            attention sublayer's output before the residual add.
        feed_forward_modules: The same for the feed-forward sublayer.
        modules_to_save: Modules trained in full, e.g. ``["classifier"]`` for a new classification head.
    """

    peft_type: ClassVar[str] = "UNIPELT"

    target_modules: list[str] | str | None = None
    lora_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    prefix_length: int = 10
    encoder_hidden_size: int | None = 512
    adapter_style: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    attention_modules: list[str] | str | None = None
    feed_forward_modules: list[str] | str | None = None

    def validate(self) -> None:
        n = self.prefix_length
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"UniPELT prefix_length={n!r} must be an integer >= 1 (Mao et al.: 10).")
        if self.adapter_style not in ("pfeiffer", "houlsby"):
            raise ValueError(
                f"UniPELT adapter_style={self.adapter_style!r}: UniPELT's adapter is sequential; use 'pfeiffer' "
                "(after the feed-forward) or 'houlsby' (after attention and feed-forward)."
            )
        super().validate()

    def members(self) -> list[PEFTMethod]:
        return [
            GatedLoRA(
                target_modules=self.target_modules,
                r=self.lora_r,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                modules_to_save=self.modules_to_save,
            ),
            GatedPrefixTuning(
                num_virtual_tokens=self.prefix_length,
                encoder_hidden_size=self.encoder_hidden_size,
                modules_to_save=self.modules_to_save,
            ),
            GatedAdapter(
                style=self.adapter_style,
                reduction_factor=self.reduction_factor,
                non_linearity=self.non_linearity,
                attention_modules=self.attention_modules,
                feed_forward_modules=self.feed_forward_modules,
                modules_to_save=self.modules_to_save,
            ),
        ]
