"""Rewriting each call of a model for its soft-prompt adapter: two forward hooks on the *host*.

The host is the outermost module with ``get_input_embeddings()`` (e.g. ``LlamaForCausalLM``). Its pre-hook reads
the active adapter from the :class:`~lightning_peft.methods.prompt.virtual_tokens.VirtualTokens` layer and, given
``input_ids``/``inputs_embeds``, ``attention_mask``, ``labels``, ``position_ids``, ``token_type_ids``:

* prompt kind: prepends the ``n`` prompts to the input embeddings, pads token-level ``labels`` with -100 and
  ``token_type_ids`` with 0;
* prefix kind: writes each layer's ``n`` keys/values into the cache argument (a new dynamic cache, or the
  empty one ``generate`` passes); the model's own attention then attends to them first, with its own grouped-query
  heads and rotary embeddings (applied to the real tokens only, as for any cached keys);
* both: extend ``attention_mask`` with ``n`` ones and shift ``position_ids`` by ``n``.

Positions: the virtual tokens take the first ``n`` positions and real tokens are shifted by ``n``, which is what a
model does by itself when it reads a cache of length ``n``, and what Hugging Face ``peft`` computes. Explicit
``position_ids`` (e.g. counted over a left-padded mask, as ``generate`` does) are shifted the same way, so left-
and right-padded batches give the outputs of unpadded sequences. (peft drops them for prompt methods.)

Outputs: token-level outputs (``logits``, ``last_hidden_state``, ``hidden_states``, ``start/end_logits``, and
the query axis of ``attentions``) *drop* the virtual positions for all four methods, so they line up with
``input_ids`` and ``labels``; peft keeps them in prompt methods' logits (ours are ``peft_logits[:, n:]``). The key
axis of ``attentions`` and the returned cache keep them: that is where the prompt acts. The ``loss`` is the
model's own over the extended sequence, as in peft: for a causal LM with a prompt method it includes predicting
the first real token from the last virtual one. As in peft, prompts come before an encoder's ``[CLS]``, so a
pooler that reads position 0 (BERT's) reads the first virtual token.

Encoder-decoders (T5, BART), as peft: prompts go before the *encoder's* input (a pre-hook on the encoder, so
``generate()``, which runs the encoder by itself, gets them too); a prefix goes into the *decoder's*
self-attention cache only - the encoder reads no cache, and the cross-attention keys are recomputed from the
encoder's output (peft empties that part of the cache) - and ``decoder_attention_mask`` gets ``n`` ones.

The call record: the pre-hook describes what it did to a call in a :class:`_Call` and returns the call's keyword
arguments as a :class:`_CallKwargs` carrying it. torch unpacks that dict into ``forward`` (which sees plain
arguments) and hands the same object to the post-hook, so each call's record travels with the call itself: nested
calls, recomputation and threads (``DataParallel`` replicas) each see their own, and nothing outlives the call.

Generation: a call with no cache (or an empty one) gets the virtual tokens; the host's :class:`PromptHooks`
remembers (weakly) every cache a call wrote the prefix to or returned, and a call continuing from such a cache
only extends the mask and shifts positions, since the cache already holds the virtual tokens. A non-empty cache
the hooks did not see is refused. The post-hook also checks that every attention layer read the prefix, so a model
that ignores the cache fails loudly.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.core import transformers_compat as hf
from lightning_peft.methods.prompt.virtual_tokens import VirtualTokens, VirtualTokenSpec

_HOOKS_ATTR = "_lightning_peft_prompt_hooks"
_TOKEN_LEVEL_2D = ("start_logits", "end_logits")
CHECKPOINTING_ERROR = (
    "{method} hands the prefix to the attention layers in the key/value cache, which transformers drops under gradient "
    "checkpointing. Disable gradient checkpointing, or use PromptTuning/PTuning."
)


@dataclass(frozen=True)
class PrefixRecord:
    """What a cache holds: this adapter's prefix, written by a call whose padding mask was ``input_mask``."""

    adapter_name: str
    num_virtual_tokens: int
    input_mask: (
        torch.Tensor | None
    )  # (B, T): which inputs of the writing call were real tokens (UniPELT's gates)


@dataclass
class _Call:
    """What the pre-hook did to one call, for its post-hook."""

    adapter_name: str
    spec: VirtualTokenSpec
    length: int  # query length after rewriting
    prepended: bool  # prompts were prepended: outputs hold n virtual positions to drop
    input_mask: torch.Tensor | None = None  # the caller's padding mask (before the n ones)
    prefix_cache: Any = None  # the cache the prefix was written to
    drop_cache: bool = False  # that cache is ours and the caller asked for none (use_cache=False)


class _CallKwargs(dict):
    """A call's keyword arguments as the pre-hook rewrote them, carrying the call's record (``None``: no adapter)."""

    def __init__(self, kwargs: dict, call: _Call | None) -> None:
        super().__init__(kwargs)
        self.call = call


class PromptHooks:
    """The hooks of one host, and the caches holding its virtual tokens (weakly: a cache lives as its caller keeps it)."""

    def __init__(self) -> None:
        self.handles: tuple[Any, ...] = ()
        self.caches: weakref.WeakKeyDictionary[Any, PrefixRecord] = weakref.WeakKeyDictionary()

    def remove(self, host: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        object.__delattr__(host, _HOOKS_ATTR)

    def holds_virtual_tokens(self, cache: Any, adapter_name: str, n: int) -> bool:
        """Whether ``cache`` continues a call that already got this adapter's virtual tokens."""
        if cache is None or not hf.is_cache(cache) or hf.cache_length(cache) == 0:
            return False
        record = self.caches.get(cache)
        if record is None or (record.adapter_name, record.num_virtual_tokens) != (adapter_name, n):
            held = "none" if record is None else f"('{record.adapter_name}', {record.num_virtual_tokens})"
            raise ValueError(
                "The cache holds tokens but was not produced with this soft-prompt adapter "
                f"('{adapter_name}', {n} virtual tokens; the cache holds {held}): its positions would not line "
                "up with the virtual tokens. Start from no cache (or an empty one), as generate() does."
            )
        return True


def hooks_of(host: nn.Module) -> PromptHooks | None:
    return getattr(host, _HOOKS_ATTR, None)


def prefix_record(host: nn.Module, cache: Any) -> PrefixRecord | None:
    """The prefix ``cache`` holds from a call of ``host`` (``None``: none of this host's adapters wrote it)."""
    hooks = hooks_of(host)
    return None if hooks is None or cache is None else hooks.caches.get(cache)


def install_hooks(host: nn.Module) -> None:
    """Register the hooks once; they remove themselves once the adapter layer is gone (``unload``)."""
    if hooks_of(host) is not None:
        return
    hooks = PromptHooks()
    handles = [
        host.register_forward_pre_hook(_before_call, with_kwargs=True),
        host.register_forward_hook(_after_forward, with_kwargs=True),
    ]
    if is_encoder_decoder(host):
        handles.append(host.get_encoder().register_forward_pre_hook(_encoder_hook(host), with_kwargs=True))
    hooks.handles = tuple(handles)
    object.__setattr__(host, _HOOKS_ATTR, hooks)


def is_encoder_decoder(host: nn.Module) -> bool:
    return bool(getattr(getattr(host, "config", None), "is_encoder_decoder", False))


def checkpointing(host: nn.Module) -> bool:
    return hf.activation_checkpointing(host)


def _active_prompt(host: nn.Module) -> tuple[VirtualTokens, str | tuple[str, ...]] | None:
    """The virtual-token layer and its active adapter; ``None`` when none is active. Unloaded: the hooks go."""
    layer = host.get_input_embeddings()
    if not isinstance(layer, VirtualTokens):
        if (hooks := hooks_of(host)) is not None:
            hooks.remove(host)
        return None
    source = layer.prompt_source()  # the active adapter, or one per row inside mixed_batch
    return None if source is None else (layer, source)


def _keyword_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Name positional arguments (``model(ids)``) so the rewrite sees every input."""
    positional = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    named = min(len(args), len(positional))
    kwargs.update(zip(positional[:named], args[:named], strict=True))
    return args[named:], kwargs


def _before_call(host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Rewrite one call of ``host`` for its active adapter; the record of what was done travels with the kwargs."""
    active = _active_prompt(host)
    if active is None:
        return None if hooks_of(host) is None else (args, _CallKwargs(kwargs, None))
    layer, adapter_name = active
    spec = layer.spec(adapter_name)
    if spec.kind == "prefix" and host.training and checkpointing(host):
        raise RuntimeError(CHECKPOINTING_ERROR.format(method="The prefix adapter"))
    args, kwargs = _keyword_arguments(host, args, dict(kwargs))
    if not is_encoder_decoder(host):
        call = rewrite_inputs(layer, adapter_name, kwargs, host)
    elif spec.kind == "prefix":
        call = _rewrite_decoder_prefix(layer, adapter_name, kwargs, host)
    else:  # the encoder's pre-hook prepends the prompts; the cross-attention's mask gets the n positions here
        call = _widen_cross_attention_mask(kwargs, spec.num_virtual_tokens)
    return args, _CallKwargs(kwargs, call)


def _widen_cross_attention_mask(kwargs: dict, n: int) -> None:
    """Widen the padding mask the decoder's cross-attention reads by the ``n`` prompt positions of the encoder."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None:  # generate(): the encoder already ran (with the prompts), on the caller's mask
        states = encoded[0] if isinstance(encoded, (tuple, list)) else encoded.last_hidden_state
        if mask.shape[1] != states.shape[1] - n:
            return
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)


def _encoder_hook(host: nn.Module) -> Any:
    host_ref = weakref.ref(host)

    def before_encoder(encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Prepend the prompts to the encoder's input; widen its mask unless the host already did."""
        host = host_ref()
        active = _active_prompt(host) if host is not None else None
        if active is None or active[0].spec(active[1]).kind != "prompt":
            return None
        layer, adapter_name = active
        args, kwargs = _keyword_arguments(encoder, args, dict(kwargs))
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            raise ValueError("Soft-prompt methods need input_ids or inputs_embeds in the encoder's call.")
        batch, length = (input_ids if input_ids is not None else embeds).shape[:2]
        n = layer.spec(adapter_name).num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] == length:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        _prepend_prompts(layer, adapter_name, kwargs, batch, length)
        return args, kwargs

    return before_encoder


def _check_mask(mask: torch.Tensor | None, name: str) -> None:
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"Soft-prompt methods extend a 2-D {name} (B, T); got shape {tuple(mask.shape)}. "
            "Pass the 2-D padding mask and let the model build its attention mask."
        )


def _check_positions(host: nn.Module, n: int, seen: int, length: int) -> None:
    """``seen`` positions (the virtual tokens and what the cache holds) + ``length`` must fit a learned table."""
    if (limit := _position_limit(host)) is not None and seen + length > limit:
        total = seen + length
        raise ValueError(
            f"{n} virtual tokens + {total - n} input tokens = {total} positions, but {type(host).__name__} has "
            f"{limit} learned positions. Shorten inputs to {limit - n} tokens (data.max_length) or use fewer "
            "virtual tokens."
        )


def rewrite_inputs(layer: VirtualTokens, adapter_name: str, kwargs: dict, host: nn.Module) -> _Call:
    """Give one call of ``host`` (its ``kwargs``, changed in place) the adapter's virtual tokens."""
    config = getattr(host, "config", None)
    spec = layer.spec(adapter_name)
    n = spec.num_virtual_tokens
    input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if input_ids is None and embeds is None:
        raise ValueError("Soft-prompt methods need input_ids or inputs_embeds in the call.")
    batch, length = (input_ids if input_ids is not None else embeds).shape[:2]
    cache = hf.call_cache(kwargs)
    continuing = hooks_of(host).holds_virtual_tokens(cache, adapter_name, n)
    _check_positions(host, n, hf.cache_length(cache) if continuing else n, length)
    call = _Call(adapter_name, spec, length, prepended=spec.kind == "prompt" and not continuing)

    mask = kwargs.get("attention_mask")
    _check_mask(mask, "attention_mask")
    if mask is None and spec.kind == "prefix":  # encoders size their mask from it: make the prefix visible
        seen = hf.cache_length(cache) - n if continuing else 0  # what the caller has seen: without the prefix
        device = (input_ids if input_ids is not None else embeds).device
        mask = torch.ones(batch, seen + length, dtype=torch.long, device=device)
    call.input_mask = mask
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + T)
    if (positions := kwargs.get("position_ids")) is not None:
        kwargs["position_ids"] = _shift_positions(positions, mask, n, call.prepended, batch)

    if call.prepended:
        _prepend_prompts(layer, adapter_name, kwargs, batch, length)
        call.length = n + length
    elif spec.kind == "prefix" and not continuing:
        if cache is None:
            cache = hf.new_cache(config)
            call.drop_cache = not _wants_cache(config, kwargs)
        dtype = embeds.dtype if embeds is not None else layer.weight.dtype
        _write_prefix(cache, layer.prefix(adapter_name, batch, dtype))
        _record_prefix(host, cache, call)
        hf.set_call_cache(host, kwargs, cache)
    return call


def _rewrite_decoder_prefix(layer: VirtualTokens, adapter_name: str, kwargs: dict, host: nn.Module) -> _Call:
    """An encoder-decoder's call: the prefix goes into the decoder's self-attention cache (peft's seq2seq prefix)."""
    spec = layer.spec(adapter_name)
    n = spec.num_virtual_tokens
    decoder_input = next(
        (
            kwargs[k]
            for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")
            if kwargs.get(k) is not None
        ),
        None,
    )
    if decoder_input is None:
        raise ValueError(
            f"{type(host).__name__}: the prefix goes to the decoder, which needs decoder_input_ids, "
            "decoder_inputs_embeds or labels in the call."
        )
    batch, length = decoder_input.shape[:2]
    cache = hf.call_cache(kwargs)
    continuing = hooks_of(host).holds_virtual_tokens(cache, adapter_name, n)
    _check_positions(host, n, hf.cache_length(cache) if continuing else n, length)
    call = _Call(adapter_name, spec, length, prepended=False)
    mask = kwargs.get("decoder_attention_mask")
    _check_mask(mask, "decoder_attention_mask")
    call.input_mask = mask
    if mask is not None:  # peft widens it too: the decoder's queries see the n prefix positions
        kwargs["decoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if continuing:
        return call
    if cache is None:
        cache = hf.new_encoder_decoder_cache()
        call.drop_cache = not _wants_cache(getattr(host, "config", None), kwargs)
    decoder_cache = hf.decoder_self_attention_cache(cache)
    if decoder_cache is None:
        raise ValueError(
            f"{type(host).__name__} was given a {type(cache).__name__}; the prefix goes into the decoder's "
            "self-attention part of an encoder-decoder cache. Pass an empty encoder-decoder cache, or none."
        )
    embeds = kwargs.get("decoder_inputs_embeds")
    dtype = embeds.dtype if embeds is not None else layer.weight.dtype
    _write_prefix(decoder_cache, layer.prefix(adapter_name, batch, dtype))
    hf.recompute_cross_attention(cache)  # as peft: the cross-attention reads the encoder's output only
    _record_prefix(host, cache, call)
    hf.set_call_cache(host, kwargs, cache)
    return call


def _record_prefix(host: nn.Module, cache: Any, call: _Call) -> None:
    """Remember that ``cache`` holds the prefix: later calls continue from it, UniPELT's gates read the mask."""
    call.prefix_cache = cache
    hooks_of(host).caches[cache] = PrefixRecord(
        call.adapter_name, call.spec.num_virtual_tokens, call.input_mask
    )


def _wants_cache(config: Any, kwargs: dict) -> bool:
    use_cache = kwargs.get("use_cache")  # transformers defaults it to config.use_cache
    return bool(getattr(config, "use_cache", False) if use_cache is None else use_cache)


def _write_prefix(cache: Any, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for index, (key, value) in enumerate(key_values):
        cache.update(key, value, index)  # (B, n_kv_heads, n, head_dim) per attention layer


_POSITION_LIMITS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def _position_limit(host: nn.Module) -> int | None:
    """The host's learned position table size (``None``: rotary/relative positions), found once per model."""
    if host not in _POSITION_LIMITS:
        table = hf.learned_positions(host)
        _POSITION_LIMITS[host] = table[0] if table is not None else None
    return _POSITION_LIMITS[host]


def _prepend_prompts(layer: VirtualTokens, adapter_name: str, kwargs: dict, batch: int, length: int) -> None:
    n = layer.spec(adapter_name).num_virtual_tokens
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = layer(kwargs.pop("input_ids"))
    kwargs.pop("input_ids", None)
    # (B, n, d) ++ (B, T, d) -> (B, n + T, d)
    kwargs["inputs_embeds"] = torch.cat([layer.prompts(adapter_name, batch, embeds.dtype), embeds], dim=1)
    if (token_types := kwargs.get("token_type_ids")) is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], n), token_types], 1)
    labels = kwargs.get("labels")
    # Only token-level labels (B, T) of class indices; a sequence's label(s) are left alone.
    if (
        labels is not None
        and labels.dim() == 2
        and labels.shape[1] == length
        and not labels.is_floating_point()
    ):
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)


def _shift_positions(
    positions: torch.Tensor, mask: torch.Tensor | None, n: int, prepend: bool, batch: int
) -> torch.Tensor:
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2:
        raise ValueError(f"Soft-prompt methods shift 2-D position_ids (B, T); got {tuple(positions.shape)}.")
    shifted = positions + n
    if not prepend:
        return shifted
    # The prompts take the n positions from each row's first real token on (RoBERTa counts from padding_idx + 1).
    positions = positions.expand(batch, -1)
    first_real = (mask != 0).int().argmax(dim=1, keepdim=True) if mask is not None else None
    first = positions[:, :1] if first_real is None else positions.gather(1, first_real)  # (B, 1)
    prompt_positions = first + torch.arange(n, device=positions.device, dtype=positions.dtype)  # (B, n)
    return torch.cat([prompt_positions, shifted.expand(batch, -1)], dim=1)


def _after_forward(host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if not isinstance(kwargs, _CallKwargs):
        raise RuntimeError(
            f"A forward pre-hook registered on {type(host).__name__} after the soft-prompt adapter's replaced the "
            "call's keyword arguments, so the adapter cannot tell what it did to the call. Register that hook "
            "before injecting (or with prepend=True), or return the same dict from it."
        )
    call = kwargs.call
    if call is None:
        return None
    hooks = hooks_of(host)
    n = call.spec.num_virtual_tokens
    if call.prefix_cache is not None:
        _check_prefix_used(host, call)
    if call.prepended:
        output = drop_virtual_positions(output, n, call.length)
    cache = hf.output_cache(output)
    if cache is not None:
        if call.drop_cache and hasattr(output, "keys"):
            hf.set_output_cache(output, None)
        elif hf.is_cache(cache) and hooks is not None and cache not in hooks.caches:
            hooks.caches[cache] = PrefixRecord(call.adapter_name, n, call.input_mask)  # it holds the prompts
    return output


def _check_prefix_used(host: nn.Module, call: _Call) -> None:
    cache, spec = call.prefix_cache, call.spec
    expected = spec.num_virtual_tokens + call.length
    layers = len(spec.cache_layers)
    seen = [hf.cache_length(cache, i) for i in range(layers)]
    if any(s != expected for s in seen):
        raise RuntimeError(
            f"{type(host).__name__} did not use the prefix in every attention layer: the cache's layers hold "
            f"{seen} tokens after the call, expected {expected} ({spec.num_virtual_tokens} prefix + "
            f"{call.length} inputs) in each of {layers} layers. Prefix methods need attention layers that "
            "call cache.update(key, value, layer_idx) (DistilBERT's do not), and no gradient "
            "checkpointing (transformers then drops the cache). Use PromptTuning/PTuning for this model."
        )


def drop_virtual_positions(output: Any, n: int, length: int) -> Any:
    """Remove the ``n`` leading virtual positions from the token-level parts of a model output."""

    def cut(value: Any, min_dim: int = 3) -> Any:  # (B, n + T, ...) -> (B, T, ...)
        if isinstance(value, torch.Tensor):
            return value[:, n:] if value.dim() >= min_dim and value.shape[1] == length else value
        if isinstance(value, tuple) and not hasattr(value, "keys"):
            return tuple(cut(v, min_dim) for v in value)
        return value

    def cut_queries(value: Any) -> Any:  # (B, heads, n + T, keys) -> (B, heads, T, keys)
        if isinstance(value, torch.Tensor):
            return value[:, :, n:] if value.dim() == 4 and value.shape[2] == length else value
        return tuple(cut_queries(v) for v in value) if isinstance(value, tuple) else value

    if not hasattr(output, "keys"):  # a tensor or a tuple (return_dict=False, or a custom model)
        return cut(output)
    for key in list(output.keys()):
        value = output[key]
        if hf.is_cache_field(key) or value is None:
            continue
        output[key] = (
            cut_queries(value)
            if key.endswith("attentions")
            else cut(value, 2 if key in _TOKEN_LEVEL_2D else 3)
        )
    return output
