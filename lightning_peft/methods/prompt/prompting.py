"""The soft-prompt methods' base: the model contract, injection, and the peft file format.

Prompt Tuning and P-Tuning prepend ``n`` trained vectors to the input embeddings; Prefix Tuning and P-Tuning v2
give every attention layer ``n`` trained keys and values through the model's key/value cache. Neither changes a weight,
so no attention code is copied and no model needs a subclass: :class:`PromptLearningMethod` wraps the input
embedding in a :class:`~lightning_peft.methods.prompt.virtual_tokens.VirtualTokens` layer that owns the prompt encoder,
and :mod:`lightning_peft.methods.prompt.hooks` rewrites each call (masks, labels, positions, caches, outputs; the
decisions are documented there).

Contract for a custom ``nn.Module`` (transformers models satisfy it):

* ``get_input_embeddings()`` returns its token embedding module, with a ``(vocab, dim)`` ``weight``;
* ``forward`` takes its inputs as keyword arguments ``input_ids`` or ``inputs_embeds`` ``(B, T, dim)`` (prompt
  methods call it with ``inputs_embeds``) and, when the caller gives them, ``attention_mask`` ``(B, T)`` with 1
  for real tokens, ``position_ids``, ``token_type_ids``, ``labels``;
* encoder-decoders: ``get_encoder()`` whose ``forward`` takes ``inputs_embeds`` (prompts go before its input) and,
  for prefixes, ``get_decoder()`` whose self-attention layers read the self-attention part of an encoder-decoder cache;
* prefix methods: ``forward`` accepts the cache (a transformers ``Cache``, under the name the installed release uses:
  :mod:`lightning_peft.core.transformers_compat`), attention layer ``i`` calls
  ``cache.update(key, value, i)`` with ``(B, n_kv_heads, T, head_dim)`` tensors and attends over the
  keys it returns, and the model's ``config`` has ``num_hidden_layers`` and ``num_attention_heads`` (plus
  ``num_key_value_heads``/``head_dim`` where they differ from the defaults) - or the method is given
  ``num_layers``, ``num_key_value_heads``, ``head_dim``.

What is missing is named in the error, at injection or, for a model that ignores the cache, at the first call.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.adapter_layer import PEFT_PREFIX, AdapterLayer, adapter_dtype, to_peft_key
from lightning_peft.core.contract import PEFTMethod
from lightning_peft.core.targeting import replace_module
from lightning_peft.methods.prompt.hooks import (
    CHECKPOINTING_ERROR,
    checkpointing,
    install_hooks,
    is_encoder_decoder,
)
from lightning_peft.methods.prompt.virtual_tokens import (
    Kind,
    VirtualTokens,
    VirtualTokenSpec,
    virtual_tokens_layer,
)


def find_host(model: nn.Module, method: str) -> nn.Module:
    """The outermost module of ``model`` with ``get_input_embeddings()``: the module whose calls are rewritten."""
    for _, module in model.named_modules():
        get_embeddings = getattr(module, "get_input_embeddings", None)
        if not callable(get_embeddings):
            continue
        try:
            if get_embeddings() is not None:
                return module
        except NotImplementedError:
            continue
    raise ValueError(
        f"{method} needs a model that exposes its token embedding: neither {type(model).__name__} nor any of its "
        "submodules has a get_input_embeddings() method returning a module. Add `def get_input_embeddings(self): "
        "return self.<embedding>` to the model (the contract is in lightning_peft.methods.prompt.prompting)."
    )


def check_forward_accepts(host: nn.Module, names: tuple[str, ...], method: str) -> None:
    params = inspect.signature(host.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"{method} rewrites the inputs of {type(host).__name__}.forward, which does not accept {missing}. It "
            f"must take {list(names)} as keyword arguments (the contract is in lightning_peft.methods.prompt.prompting)."
        )


def embedding_weight(embedding: nn.Module, method: str) -> torch.Tensor:
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{method}: the input embedding {type(embedding).__name__} has no 2-D (vocab, dim) `weight`; "
            "get_input_embeddings() must return the token embedding table (e.g. an nn.Embedding)."
        )
    return weight


def prefix_geometry(
    host: nn.Module, num_layers: int | None, num_kv_heads: int | None, head_dim: int | None, method: str
) -> tuple[int, int, int]:
    """``(layers, n_kv_heads, head_dim)`` of the attention caches, from the overrides or the model's config."""
    config = getattr(host, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def read(*names: str) -> Any:
        return next((v for n in names if (v := getattr(config, n, None)) is not None), None)

    layers = num_layers or read("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = read("num_attention_heads", "n_head", "num_heads", "n_heads")
    kv_heads = num_kv_heads or read("num_key_value_heads") or heads  # grouped-query attention: fewer kv heads
    hidden = read("hidden_size", "n_embd", "d_model", "dim")
    dim = head_dim or read("head_dim") or (hidden // heads if hidden and heads else None)
    found = {"num_layers": layers, "num_key_value_heads": kv_heads, "head_dim": dim}
    missing = [name for name, value in found.items() if not value]
    if missing:
        raise ValueError(
            f"{method} builds one key/value prefix per attention layer but cannot tell {missing} of "
            f"{type(host).__name__}: its `config` lacks num_hidden_layers / num_attention_heads / hidden_size. "
            f"Pass them to the method, e.g. {method}(num_layers=..., num_key_value_heads=..., head_dim=...)."
        )
    return int(layers), int(kv_heads), int(dim)


def tokenize_init_text(text: str, tokenizer_name_or_path: str, num_virtual_tokens: int) -> list[int]:
    """Token ids of ``text``, cut or repeated to ``num_virtual_tokens`` (peft's TEXT initialisation)."""
    from transformers import AutoTokenizer

    # Never code from the tokenizer's directory (auto_map): only tokenizers transformers itself implements.
    ids = AutoTokenizer.from_pretrained(tokenizer_name_or_path, trust_remote_code=False)(text)["input_ids"]
    if not ids:
        raise ValueError(f"The initialisation text {text!r} has no tokens.")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


@dataclass(kw_only=True)
class PromptLearningMethod(PEFTMethod):
    """Base of the soft-prompt methods; subclasses build the prompt encoder.

    Every parameter of an encoder takes part in every forward, so DDP needs no ``find_unused_parameters``.

    Args:
        num_virtual_tokens: Number ``n`` of virtual tokens (prompt length, or prefix length per layer).
        modules_to_save: Modules trained in full, e.g. ``["classifier"]`` for a new classification head.
    """

    #: The one definition of what the method's virtual tokens are; its adapters' specs record it.
    kind: ClassVar[Kind] = "prompt"
    modifies_inputs: ClassVar[bool] = True

    @property
    def rewrites_inputs_per_row(self) -> bool:  # type: ignore[override]
        return (
            self.kind == "prompt"
        )  # prompts are rows of the input; a prefix is one cache for the whole batch

    num_virtual_tokens: int = 20

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"{self.name} num_virtual_tokens={n!r} must be an integer >= 1 (typical: 8 to 100)."
            )

    # --- what subclasses define -----------------------------------------------------------------------------
    def make_spec(self, host: nn.Module, embedding: nn.Module) -> VirtualTokenSpec:
        return VirtualTokenSpec(self.kind, self.num_virtual_tokens)

    def build_encoder(
        self, host: nn.Module, embedding: nn.Module, spec: VirtualTokenSpec, dtype: torch.dtype
    ) -> nn.Module:
        """A module whose ``forward()`` returns the ``(n, dim)`` prompts or the ``(n, spec.width)`` flat prefix."""
        raise NotImplementedError

    def peft_config_fields(self) -> dict[str, Any]:
        """Method-specific ``adapter_config.json`` fields, named as in peft."""
        return {}

    # --- injection ------------------------------------------------------------------------------------------
    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        host = find_host(model, self.name)
        if is_encoder_decoder(host):
            self._check_encoder_decoder(host)
        if self.kind == "prefix":
            hf.check_cache_api(host, self.name)
            if hf.cache_argument(host) is None:
                raise ValueError(
                    f"{self.name} hands the prefix to {type(host).__name__}.forward as its key/value cache, but it "
                    f"does not accept a cache argument ({' or '.join(hf.CACHE_ARGUMENTS)}). Add one that the "
                    "attention layers read (the contract is in lightning_peft.methods.prompt.prompting), or use "
                    "PromptTuning/PTuning for this model."
                )
            check_forward_accepts(host, ("attention_mask",), self.name)
            # transformers' attention layers read the cache by layer_idx; a custom module may read it its own way.
            if isinstance(host, PreTrainedModel) and not hf.attention_modules(
                host, exclude=lambda m: isinstance(m, AdapterLayer)
            ):
                raise ValueError(
                    f"{self.name}: {type(host).__name__}'s attention layers do not read a key/value cache (no "
                    "attention module with a layer_idx takes one), so the prefix would never be attended to. Use "
                    "PromptTuning/PTuning or LoRA for this model."
                )
        else:
            check_forward_accepts(host, ("inputs_embeds",), self.name)
        if self.kind == "prefix" and checkpointing(host):
            raise ValueError(CHECKPOINTING_ERROR.format(method=self.name))
        self._check_positions(host)
        embedding = host.get_input_embeddings()
        layer = embedding if isinstance(embedding, VirtualTokens) else None
        base = layer.base_layer if layer is not None else embedding
        weight = embedding_weight(base, self.name)
        # Half-precision bases get fp32 prompts (as peft's autocast_adapter_dtype): tiny, and far better optimised.
        dtype = adapter_dtype(weight)
        spec = self.make_spec(host, base)
        encoder = self.build_encoder(host, base, spec, dtype)
        if layer is None:
            layer = VirtualTokens(embedding)
            replace_module(model, next(n for n, m in model.named_modules() if m is embedding), layer)
        layer.add_adapter(adapter_name, encoder, spec)
        install_hooks(host)

    def _check_encoder_decoder(self, host: nn.Module) -> None:
        """Prompts go before the encoder's token input, prefixes to the decoder; non-token encoders are refused.

        peft's seq2seq soft prompts pass token ids to the encoder (input_ids or inputs_embeds), for prefixes too: a
        speech encoder (Whisper's reads audio features) cannot take them, in peft or here.
        """
        encoder = host.get_encoder() if callable(getattr(host, "get_encoder", None)) else None
        params = inspect.signature(encoder.forward).parameters if encoder is not None else {}
        if "inputs_embeds" not in params:
            what = (
                "model has no get_encoder()"
                if encoder is None
                else f"encoder {type(encoder).__name__} takes no inputs_embeds"
            )
            where = (
                "prompts go before the encoder's token input"
                if self.kind == "prompt"
                else "peft's encoder-decoder prefix format runs the encoder on token ids"
            )
            raise ValueError(
                f"{self.name} on the encoder-decoder {type(host).__name__}: {where}, but its {what} (Whisper's "
                "encoder reads audio features, not tokens). Use LoRA, IA3 or an Adapter for this model."
            )

    def _check_positions(self, host: nn.Module) -> None:
        """Virtual tokens take positions of a learned (absolute) position table: they must leave room for input."""
        table = hf.learned_positions(host)
        if table is not None and self.num_virtual_tokens >= table[0]:
            raise ValueError(
                f"{self.name} num_virtual_tokens={self.num_virtual_tokens} fills all {table[0]} positions of "
                f"{type(host).__name__} ({table[1]}), leaving none for the input. Use fewer virtual tokens: "
                f"inputs must fit in {table[0]} - num_virtual_tokens (e.g. data.max_length)."
            )

    # --- the Hugging Face peft file format ------------------------------------------------------------------
    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        _, layer = virtual_tokens_layer(model)
        spec = layer.specs[adapter_name]
        config = getattr(find_host(model, self.name), "config", None)
        if spec.kind == "prefix":  # peft reads the cache geometry from these (grouped-query: the kv heads)
            token_dim, heads, layers = spec.num_kv_heads * spec.head_dim, spec.num_kv_heads, spec.num_layers
        else:
            token_dim = embedding_weight(layer.base_layer, self.name).shape[1]
            heads = getattr(config, "num_attention_heads", None)
            layers = getattr(config, "num_hidden_layers", None)
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_transformer_submodules": spec.num_transformer_submodules,
            "token_dim": token_dim,
            "num_attention_heads": heads,
            "num_layers": layers,
            "modules_to_save": self.modules_to_save,
            **self.peft_config_fields(),
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PEFTMethod:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("modules_to_save"):  # peft lists its task defaults (classifier, score) twice
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        return cls(**kwargs).for_loading()

    def to_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft saves the encoder's output as ``prompt_embeddings``, and other modules under ``base_model.``."""
        _, layer = virtual_tokens_layer(model)
        encoder_keys = f".{VirtualTokens.adapter_attrs[0]}."
        # peft wraps the model itself for prompt learning: "base_model.classifier.weight", not "base_model.model."
        out = {
            "base_model." + k.removeprefix(PEFT_PREFIX): v
            for k, v in tensors.items()
            if encoder_keys not in k
        }
        with torch.no_grad():
            out["prompt_embeddings"] = layer.virtual_tokens(adapter_name).detach().cpu().contiguous().clone()
        return out

    def from_peft_tensors(
        self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_peft_tensors`: the encoder becomes the saved output, a plain embedding table."""
        name, layer = virtual_tokens_layer(model)
        out = {}
        for key, value in tensors.items():
            if key == "prompt_embeddings":
                n = layer.specs[adapter_name].num_virtual_tokens
                if value.shape[0] == 2 * n and is_encoder_decoder(find_host(model, self.name)):
                    # peft's SEQ_2_SEQ_LM default (num_transformer_submodules=2) stores n rows for the decoder
                    # too; its prompt-tuning and P-tuning forward and generate() read only the first n.
                    value = value[:n]
                trainable = any(p.requires_grad for p in layer.prompt_encoder[adapter_name].parameters())
                layer.freeze_encoder(adapter_name)
                layer.prompt_encoder[adapter_name].requires_grad_(trainable)
                out[to_peft_key(f"{name}.prompt_encoder.{adapter_name}.embedding.weight", adapter_name)] = (
                    value
                )
            elif key.startswith("base_model.") and not key.startswith(PEFT_PREFIX):
                out[PEFT_PREFIX + key.removeprefix("base_model.")] = value
            else:
                out[key] = value
        return out
