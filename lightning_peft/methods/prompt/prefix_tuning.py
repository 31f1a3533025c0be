"""Prefix Tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) and P-Tuning v2 (Liu et al. 2022,
https://arxiv.org/abs/2110.07602).

Both give every attention layer ``n`` trained keys and values that each query attends to before the real
tokens ("deep" prompts), handed to the model as its key/value cache so that its own attention code (grouped-query
heads, rotary embeddings on the real tokens, masks) runs unchanged. Li & Liang found optimising the prefix
directly unstable and reparametrise it through an MLP, ``P = MLP(E)``, ``E: (n, d)``; P-Tuning v2 trains the
per-layer prefixes directly and targets classification and token-level tasks with encoder models.

Both can start from the activations of real words (Li & Liang, sec. 7.2): the prefix is then the model's own
keys and values for an initialisation text, and at step 0 the adapted model computes exactly what the base
model computes on that text followed by the input.

The flat prefix ``(n, L * 2 * n_kv_heads * head_dim)`` is what :func:`~lightning_peft.save_adapter` writes as
peft's ``prompt_embeddings``. On an encoder-decoder (T5, BART) the prefix goes where peft puts it: into the decoder's
self-attention, in peft's layout (:func:`~lightning_peft.methods.prompt.virtual_tokens.decoder_pairs`); the encoder
reads no prefix and the cross-attention reads the encoder's output only. Methods that combine a prefix with other modules (MAM adapter, UniPELT) can inject
a :class:`PrefixTuning` under their adapter name, or reuse :class:`PrefixEncoder` and
:func:`~lightning_peft.methods.prompt.virtual_tokens.prefix_key_values`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.methods.prompt.hooks import is_encoder_decoder
from lightning_peft.methods.prompt.prompting import (
    PromptLearningMethod,
    embedding_weight,
    prefix_geometry,
    tokenize_init_text,
)
from lightning_peft.methods.prompt.virtual_tokens import (
    Kind,
    VirtualTokens,
    VirtualTokenSpec,
    decoder_pairs,
    flatten_key_values,
)


class PrefixEncoder(nn.Module):
    """``n`` embeddings -> (optionally) ``Linear(d, h) - Tanh - Linear(h, width)`` -> the flat prefix ``(n, width)``."""

    def __init__(
        self,
        num_virtual_tokens: int,
        width: int,
        token_dim: int,
        hidden_size: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.transform: nn.Sequential | None = None
        if hidden_size is None:  # P-Tuning v2: the prefix itself is the parameter
            self.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(hidden_size, width, **factory),
            )

    def forward(self) -> torch.Tensor:
        prefix = self.embedding.weight  # (n, d) or (n, width)
        return prefix if self.transform is None else self.transform(prefix)  # (n, width)

    @torch.no_grad()
    def fit_output(self, target: torch.Tensor) -> None:
        """Make ``forward()`` return ``target``: exactly for the flat prefix, and for the MLP when ``h + 1 >= n``.

        The MLP's last layer is solved by least squares on the hidden features ``[tanh(E W1 + b1), 1]`` (full row
        rank for distinct random embeddings), so the reparametrisation is kept and starts at the target.
        """
        if self.transform is None:
            self.embedding.weight.copy_(target)
            return
        first, last = self.transform[0], self.transform[2]
        hidden = torch.tanh(first(self.embedding.weight)).double()  # (n, h)
        features = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)  # (n, h + 1)
        solution = torch.linalg.pinv(features) @ target.double()  # (h + 1, width)
        last.weight.copy_(solution[:-1].T)
        last.bias.copy_(solution[-1])


@dataclass(kw_only=True)
class _PrefixMethod(PromptLearningMethod):
    """Shared by Prefix Tuning and P-Tuning v2: cache geometry, real-word initialisation, peft format."""

    kind: ClassVar[Kind] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    #: Whether the prefix goes through the reparametrisation MLP (peft's ``prefix_projection``).
    prefix_projection: ClassVar[bool] = True
    #: Whether the prefix can go to an encoder-decoder's decoder (UniPELT's per-layer gates cannot follow it there).
    encoder_decoders: ClassVar[bool] = True

    num_layers: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    num_transformer_submodules: int | None = None
    # The saved prefix replaces any initialisation: loading needs no tokenizer.
    init_only_fields: ClassVar[dict[str, Any]] = {"init_text": None, "tokenizer_name_or_path": None}

    def validate(self) -> None:
        super().validate()
        if bool(self.init_text) != bool(self.tokenizer_name_or_path):
            raise ValueError(
                f"{self.name}: init_text and tokenizer_name_or_path go together (real-word init)."
            )
        for field_name in ("num_layers", "num_key_value_heads", "head_dim"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{self.name} {field_name}={value!r} must be >= 1 (or None: read from the config)."
                )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{self.name} num_transformer_submodules={self.num_transformer_submodules!r} (peft's field): leave "
                "it None: 2 on encoder-decoders (peft's SEQ_2_SEQ_LM layout), 1 on other models."
            )

    def encoder_hidden(self, token_dim: int) -> int | None:
        raise NotImplementedError

    def make_spec(self, host: nn.Module, embedding: nn.Module) -> VirtualTokenSpec:
        layers, kv_heads, head_dim = prefix_geometry(
            host, self.num_layers, self.num_key_value_heads, self.head_dim, self.name
        )
        spec = VirtualTokenSpec(self.kind, self.num_virtual_tokens, layers, kv_heads, head_dim)
        if is_encoder_decoder(host):
            return self._decoder_spec(host, spec)
        if self.num_transformer_submodules == 2:
            raise ValueError(
                f"{self.name} num_transformer_submodules=2 is peft's encoder-decoder layout; "
                f"{type(host).__name__} is not an encoder-decoder: leave it None."
            )
        return spec

    def _decoder_spec(self, host: nn.Module, spec: VirtualTokenSpec) -> VirtualTokenSpec:
        """The decoder's self-attention reads the prefix: its layers, heads and widths checked against the model."""
        model = type(host).__name__
        if self.num_transformer_submodules == 1:
            raise ValueError(
                f"{self.name} num_transformer_submodules=1 on the encoder-decoder {model}: peft then hands one plain "
                "cache to the decoder's self- and cross-attention, so the cross-attention attends over the prefix "
                "and the decoder's own keys too. Only peft's SEQ_2_SEQ_LM layout (2, the default) is supported: "
                "leave it None."
            )
        if not self.encoder_decoders:
            raise ValueError(
                f"{self.name} on the encoder-decoder {model}: its per-layer prefix gates need one attention module "
                "per layer, and an encoder-decoder has encoder, decoder and cross-attention modules for each "
                "layer index. Use PrefixTuning or MAMAdapter (the prefix in the decoder), or LoRA."
            )
        if self.init_text:
            raise ValueError(
                f"{self.name} init_text on the encoder-decoder {model}: real-word initialisation is implemented for "
                "decoder-only and encoder models. Leave init_text and tokenizer_name_or_path unset."
            )
        get_decoder = getattr(host, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        found = (
            hf.attention_modules(decoder, exclude=lambda m: isinstance(m, AdapterLayer)) if decoder else []
        )
        indices = sorted({hf.layer_index(m) for m in found})
        if not indices or indices != list(range(len(indices))):
            raise ValueError(
                f"{self.name} on the encoder-decoder {model}: the prefix goes to the decoder's self-attention, but "
                f"{'it has no get_decoder()' if decoder is None else f'its decoder has attention layers {indices}'}"
                " (expected modules with layer_idx 0..L-1 that take the cache). Use PromptTuning/PTuning or LoRA."
            )
        for module in found:
            heads = _first_int(module, ("num_key_value_heads", "num_heads", "n_heads"))
            width = _first_int(module, ("head_dim", "key_value_proj_dim"))
            if (heads or spec.num_kv_heads, width or spec.head_dim) != (spec.num_kv_heads, spec.head_dim):
                raise ValueError(
                    f"{self.name} on {model}: decoder layer {hf.layer_index(module)}'s {type(module).__name__} has "
                    f"{heads} heads of {width} channels, but the prefix is laid out for {spec.num_kv_heads} heads of "
                    f"{spec.head_dim} (the config's hidden size / attention heads, as peft reads them). Pass "
                    f"{self.name}(num_key_value_heads={heads}, head_dim={width})."
                )
        if len(indices) > spec.num_layers:
            raise ValueError(
                f"{self.name} on {model}: its decoder has {len(indices)} layers but the prefix {spec.num_layers} "
                f"key/value pairs (num_layers, the encoder's count as peft reads it). Pass num_layers={len(indices)}."
            )
        pairs = decoder_pairs(spec.num_layers, len(indices))
        return replace(spec, layer_pairs=pairs, num_transformer_submodules=2)

    def build_encoder(
        self, host: nn.Module, embedding: nn.Module, spec: VirtualTokenSpec, dtype: torch.dtype
    ) -> nn.Module:
        weight = embedding_weight(embedding, self.name)
        token_dim = weight.shape[1]
        encoder = PrefixEncoder(
            self.num_virtual_tokens,
            spec.width,
            token_dim,
            self.encoder_hidden(token_dim),
            weight.device,
            dtype,
        )
        if self.init_text:
            ids = tokenize_init_text(self.init_text, self.tokenizer_name_or_path, self.num_virtual_tokens)  # type: ignore[arg-type]
            encoder.fit_output(
                real_word_prefix(host, torch.tensor(ids, device=weight.device), spec).to(dtype)
            )
        return encoder

    def peft_config_fields(self) -> dict[str, Any]:
        return {
            "prefix_projection": self.prefix_projection,
            "encoder_hidden_size": getattr(self, "encoder_hidden_size", None),
            "init_weights": None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod:
        # One peft type for both: prefix_projection tells them apart.
        target = PrefixTuning if config.get("prefix_projection") else PTuningV2
        if cls is not target:
            return target.from_peft_config(config)
        return super().from_peft_config(config)


def _first_int(module: nn.Module, names: tuple[str, ...]) -> int | None:
    return next(
        (v for n in names if isinstance(v := getattr(module, n, None), int) and not isinstance(v, bool)), None
    )


@torch.no_grad()
def real_word_prefix(host: nn.Module, token_ids: torch.Tensor, spec: VirtualTokenSpec) -> torch.Tensor:
    """The flat prefix ``(n, width)`` holding the model's own keys/values for ``token_ids`` (positions 0..n-1)."""
    embedding = host.get_input_embeddings()
    prompts_were = embedding.disabled if isinstance(embedding, VirtualTokens) else None
    if prompts_were is not None:  # another soft-prompt adapter must not shift the words
        embedding.disabled = True
    was_training = host.training
    host.eval()
    cache = hf.new_cache(getattr(host, "config", None))
    inputs = {"input_ids": token_ids.unsqueeze(0), "use_cache": True}
    hf.set_call_cache(host, inputs, cache)
    try:
        host(**inputs)
    finally:
        host.train(was_training)
        if prompts_were is not None:
            embedding.disabled = prompts_were
    key_values = [hf.cache_key_values(cache, i) for i in range(spec.num_layers)]
    expected = (1, spec.num_kv_heads, len(token_ids), spec.head_dim)
    if any(tuple(t.shape) != expected for kv in key_values for t in kv):
        raise ValueError(
            f"Real-word initialisation: the model's caches have shape {tuple(key_values[0][0].shape)}, the prefix "
            f"expects {expected}; check num_layers/num_key_value_heads/head_dim."
        )
    return flatten_key_values(key_values)


@register_method
@dataclass(kw_only=True)
class PrefixTuning(_PrefixMethod):
    """Per-layer key/value prefixes through the reparametrisation MLP of Li & Liang.

    ``E: (n, d)`` -> ``Linear(d, h)`` -> ``Tanh`` -> ``Linear(h, L * 2 * n_kv_heads * head_dim)``, reshaped to each
    layer's ``(B, n_kv_heads, n, head_dim)`` keys and values (grouped-query attention: the key/value heads).

    Example:
        >>> PrefixTuning(num_virtual_tokens=30, encoder_hidden_size=512).kind
        'prefix'

    Args:
        num_virtual_tokens: Prefix length ``n`` per layer.
        encoder_hidden_size: Hidden width ``h`` of the MLP; ``None`` uses the model's hidden size ``d``.
        num_layers: Attention layers; ``None`` reads the model config (as do the next two).
        num_key_value_heads: Key/value heads per layer.
        head_dim: Channels per head.
        init_text: Initialise the prefix with the model's activations on this text (real-word init; the MLP's last
            layer is fitted to them, exactly when ``h + 1 >= n``).
        tokenizer_name_or_path: Tokenizer for ``init_text``.
        modules_to_save: Modules trained in full, e.g. ``["classifier"]``.
    """

    encoder_hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(
                f"PrefixTuning encoder_hidden_size={self.encoder_hidden_size!r} must be >= 1 (or None)."
            )

    def encoder_hidden(self, token_dim: int) -> int | None:
        return self.encoder_hidden_size or token_dim


@dataclass(kw_only=True)
class PTuningV2(_PrefixMethod):
    """Deep prompts: trained key/value prefixes at every layer, without reparametrisation (P-Tuning v2).

    Saved as peft's ``PREFIX_TUNING`` with ``prefix_projection=False`` (the same computation).

    Example:
        >>> PTuningV2(num_virtual_tokens=16, modules_to_save=["classifier"]).modules_to_save
        ['classifier']

    Args:
        num_virtual_tokens: Prefix length ``n`` per layer.
        num_layers: Attention layers; ``None`` reads the model config (as do the next two).
        num_key_value_heads: Key/value heads per layer.
        head_dim: Channels per head.
        init_text: Initialise the prefix with the model's activations on this text (real-word init).
        tokenizer_name_or_path: Tokenizer for ``init_text``.
        modules_to_save: Modules trained in full, e.g. ``["classifier"]`` for a classification head.
    """

    prefix_projection: ClassVar[bool] = False

    def encoder_hidden(self, token_dim: int) -> int | None:
        return None
