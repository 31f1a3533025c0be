"""The one seam between this project and the internals of ``transformers``.

``transformers``' public API (``AutoModel``, ``AutoTokenizer``, configs, ``generate``) is used directly. What is
*not* public - the name of the key/value cache argument, the cache classes and how their layers are reached, the
``layer_idx`` of attention modules, helper layers such as ``Conv1D`` - changes between releases, and is read only
here, so that the next rename is a change to this file alone:

* the cache argument of ``forward`` and of model outputs: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the
  old name is deprecated there, and ignored when both are passed - so a caller must never pass both);
* caches: ``DynamicCache(config=...)``, ``cache.layers[i].keys/values`` (``EncoderDecoderCache`` keeps the
  self-attention part in ``self_attention_cache``), ``cache.update(key, value, layer_idx)``,
  ``cache.get_seq_length(layer_idx)``;
* attention modules: the innermost modules with an integer ``layer_idx`` whose ``forward`` takes the cache;
* layers: ``Conv1D`` (GPT-2's transposed linear) and ``ACT2FN`` (activations by name).

:func:`check_cache_api` probes all of the cache contract at injection time: on a release newer than
:data:`NEWEST_KNOWN` the library keeps working while the contract holds, and otherwise refuses with an error that
names the installed version and what it could not find - never silently wrong outputs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ACT2FN",
    "CACHE_ARGUMENTS",
    "NEWEST_KNOWN",
    "OLDEST_SUPPORTED",
    "Conv1D",
    "attention_modules",
    "cache_argument",
    "cache_key_values",
    "cache_layer",
    "call_cache",
    "check_cache_api",
    "decoder_self_attention_cache",
    "module_cache",
    "new_cache",
    "new_encoder_decoder_cache",
    "output_cache",
    "recompute_cross_attention",
    "set_cache_key_values",
    "set_call_cache",
    "set_output_cache",
]

VERSION = Version(transformers.__version__)
#: The oldest release the test suite runs against (``constraints/oldest.txt``) and the newest it knows.
OLDEST_SUPPORTED = Version("5.4.0")
NEWEST_KNOWN = Version("5.24.0")
#: Spellings of the cache argument, newest first: 5.24 renamed ``past_key_values`` to ``cache``.
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values")
_DEFAULT_CACHE_ARGUMENT = "cache" if Version("5.24.0.dev0") <= VERSION else "past_key_values"


def _version_note() -> str:
    newer = f", newer than the newest release this version of lightning-peft knows ({NEWEST_KNOWN})"
    return f"transformers {VERSION}{newer if VERSION.release > NEWEST_KNOWN.release else ''}"


# --- the cache argument ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _parameters(forward: Callable) -> tuple[tuple[str, ...], bool]:
    """Named parameters of ``forward`` and whether it takes ``**kwargs`` (the signature follows ``__wrapped__``)."""
    params = inspect.signature(forward).parameters
    names = tuple(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    if not inspect.ismethod(forward) and names[:1] == ("self",):  # the class's function: drop `self`
        names = names[1:]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _forward_of(module: nn.Module) -> Callable:
    """The ``forward`` a call of ``module`` runs: one set on the instance, else its class's (cacheable)."""
    return module.__dict__.get("forward") or type(module).forward


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes the key/value cache, or ``None`` if it takes none by name.

    A ``forward`` that takes only ``**kwargs`` is given the installed release's spelling.
    """
    names, var_keyword = _parameters(_forward_of(module))
    found = next((name for name in CACHE_ARGUMENTS if name in names), None)
    return found if found is not None or not var_keyword else _DEFAULT_CACHE_ARGUMENT


def call_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache one call was given, under any spelling (``generate`` passes the installed release's)."""
    return next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)


def set_call_cache(module: nn.Module, kwargs: MutableMapping[str, Any], cache: Any) -> None:
    """Hand ``cache`` to a call of ``module`` under the one name its ``forward`` reads; every other spelling goes."""
    for name in CACHE_ARGUMENTS:
        kwargs.pop(name, None)
    kwargs[cache_argument(module) or _DEFAULT_CACHE_ARGUMENT] = cache


def module_cache(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """The cache a call of ``module`` (e.g. an attention layer) receives, by name or by position."""
    if (cache := call_cache(kwargs)) is not None:
        return cache
    names, _ = _parameters(_forward_of(module))
    for name in CACHE_ARGUMENTS:
        if name in names and names.index(name) < len(args):
            return args[names.index(name)]
    return None


def output_cache(output: Any) -> Any:
    """The cache a model returned: a field of its output under either spelling, or the cache in a tuple."""
    if hasattr(output, "keys"):
        keys = set(output.keys())
        return next((output[n] for n in CACHE_ARGUMENTS if n in keys), None)
    if isinstance(output, tuple):  # return_dict=False
        return next((v for v in output if hasattr(v, "get_seq_length")), None)
    return None


def set_output_cache(output: Any, cache: Any) -> None:
    """Replace the cache field of a model output, under the spelling the output uses.

    ``None`` removes the field, so the output is what a call without a cache returns (``generate`` reorders a cache
    for beam search wherever the field exists, even holding ``None``; ``ModelOutput`` refuses ``del``).
    """
    keys = set(output.keys())
    name = next((n for n in CACHE_ARGUMENTS if n in keys), None)
    if name is None:
        return
    if cache is not None:
        output[name] = cache
        return
    remove = (
        collections.OrderedDict.__delitem__
        if isinstance(output, collections.OrderedDict)
        else dict.__delitem__
    )
    remove(output, name)
    if name in getattr(output, "__dict__", {}):
        object.__setattr__(output, name, None)


def is_cache_field(key: str) -> bool:
    return key in CACHE_ARGUMENTS


# --- caches ---------------------------------------------------------------------------------------------------
def new_cache(config: Any = None) -> Any:
    """An empty ``DynamicCache`` for a model with ``config`` (sliding-window layers follow the config)."""
    from transformers import DynamicCache

    return DynamicCache(config=config) if hasattr(config, "get_text_config") else DynamicCache()


def new_encoder_decoder_cache() -> Any:
    """An empty ``EncoderDecoderCache``: the decoder's self-attention part and the cross-attention part."""
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def decoder_self_attention_cache(cache: Any) -> Any:
    """The decoder self-attention part of an ``EncoderDecoderCache`` (``None`` for any other cache)."""
    return getattr(cache, "self_attention_cache", None)


def recompute_cross_attention(cache: Any) -> None:
    """Make an ``EncoderDecoderCache``'s cross-attention layers recompute their keys/values on the next call."""
    for index in list(getattr(cache, "is_updated", {})):
        cache.is_updated[index] = False


def cache_layer(cache: Any, layer_idx: int) -> Any:
    """Layer ``layer_idx`` of a cache (its self-attention part for an ``EncoderDecoderCache``): ``.keys/.values``."""
    return getattr(cache, "self_attention_cache", cache).layers[layer_idx]


def cache_key_values(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache_layer(cache, layer_idx)
    return layer.keys, layer.values


def set_cache_key_values(cache: Any, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace what layer ``layer_idx`` of a cache holds (same shapes: e.g. the prefix scaled by a gate)."""
    layer = cache_layer(cache, layer_idx)
    layer.keys, layer.values = keys, values


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    return int(cache.get_seq_length(layer_idx))


def is_cache(value: Any) -> bool:
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


@functools.lru_cache(maxsize=1)
def _probe_cache() -> str | None:
    """What of the cache contract the installed release lacks (``None``: all of it holds)."""
    try:
        cache = new_cache()
    except Exception as error:
        return f"transformers.DynamicCache() could not be built ({type(error).__name__}: {error})"
    for attr in ("update", "get_seq_length", "layers"):
        if not hasattr(cache, attr):
            return f"DynamicCache has no `{attr}`"
    key, value = torch.zeros(1, 1, 2, 1), torch.ones(1, 1, 2, 1)
    try:
        cache.update(key, value, 0)
        keys, values = cache_key_values(cache, 0)
        length = cache_length(cache, 0)
    except Exception as error:
        return f"DynamicCache.update(key, value, layer_idx) / .layers[i].keys failed ({type(error).__name__}: {error})"
    if length != 2 or not torch.equal(keys, key) or not torch.equal(values, value):
        return "DynamicCache.layers[i].keys/values or get_seq_length(i) do not return what update() stored"
    return None


def check_cache_api(host: nn.Module | None, method: str) -> None:
    """Refuse, at injection, a release whose cache contract differs from the one the prefix methods rely on.

    Raises:
        RuntimeError: naming the installed transformers version and what is missing.
    """
    problem = _probe_cache()
    if problem is None and host is not None and cache_argument(host) is None:
        names, _ = _parameters(_forward_of(host))
        # A cache under a spelling this file does not know (not `use_cache`, the flag): a renamed argument.
        if any(n != "use_cache" and (n.endswith("cache") or n.endswith("key_values")) for n in names):
            problem = f"{type(host).__name__}.forward takes none of {list(CACHE_ARGUMENTS)} (it takes {list(names)})"
    if problem is not None:
        raise RuntimeError(
            f"{method} hands keys/values to the attention layers through transformers' cache, but with "
            f"{_version_note()}: {problem}. Install a transformers release between {OLDEST_SUPPORTED} and "
            f"{NEWEST_KNOWN} (e.g. pip install 'transformers=={NEWEST_KNOWN}'), or a lightning-peft that supports "
            "this one."
        )


# --- attention modules ----------------------------------------------------------------------------------------
def layer_index(module: nn.Module) -> int | None:
    index = getattr(module, "layer_idx", None)
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def attention_modules(
    host: nn.Module, exclude: Callable[[nn.Module], bool] = lambda m: False
) -> list[nn.Module]:
    """The modules of ``host`` that read a layer's cache: the innermost with a ``layer_idx`` that take the cache.

    Sorted by ``layer_idx``; ``exclude`` drops wrappers (e.g. adapter layers that forward their base's arguments).
    """
    candidates = {
        name: module
        for name, module in host.named_modules()
        if layer_index(module) is not None and not exclude(module) and _takes_cache_by_name(module)
    }
    innermost = [m for n, m in candidates.items() if not any(o.startswith(n + ".") for o in candidates)]
    return sorted(innermost, key=layer_index)


def _takes_cache_by_name(module: nn.Module) -> bool:
    names, _ = _parameters(_forward_of(module))
    return any(name in names for name in CACHE_ARGUMENTS)


# --- activation (gradient) checkpointing ----------------------------------------------------------------------
def set_activation_checkpointing(model: nn.Module, enabled: bool, use_reentrant: bool = True) -> bool:
    """Switch a transformers model's activation checkpointing; ``False`` if ``model`` has no such switch.

    transformers 5.24 renamed ``gradient_checkpointing_enable/disable`` to ``activation_checkpointing_*`` (the old
    names warn).
    """
    for prefix, options in (
        ("activation", "activation_checkpointing_kwargs"),
        ("gradient", "gradient_checkpointing_kwargs"),
    ):
        switch = getattr(model, f"{prefix}_checkpointing_{'enable' if enabled else 'disable'}", None)
        if callable(switch):
            switch(**({options: {"use_reentrant": use_reentrant}} if enabled else {}))
            return True
    return False


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether any part of ``model`` recomputes activations (transformers' per-layer flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def keep_in_fp32_modules(model: nn.Module) -> list[str]:
    """Module names a transformers model keeps in full precision (``_keep_in_fp32_modules``: T5's ``wo``, ...)."""
    names: list[str] = []
    for module in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            names += [n for n in getattr(module, attr, None) or () if n not in names]
    return names


def learned_positions(model: nn.Module) -> tuple[int, str] | None:
    """``(positions, module name)`` of a model's learned (absolute) position table (BERT, GPT-2, OPT, ...): the
    hard limit on sequence length. ``None`` for rotary/relative models, whose nominal maximum is no table."""
    config = getattr(model, "config", None)
    positions = next(
        (
            v
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(v := getattr(config, k, None), int)
        ),
        None,
    )
    if positions is None:
        return None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Embedding)
            and module.num_embeddings in (positions, positions + 2)  # OPT's table is offset by 2
            and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        ):
            return positions, name
    return None


@contextlib.contextmanager
def captured_load_reports() -> Iterator[list[logging.LogRecord]]:
    """Hold back the "LOAD REPORT" tables ``from_pretrained`` logs (transformers 5), for the caller to judge:
    a fresh task head is expected, anything else is re-emitted with :func:`emit_load_report`."""
    records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            records.append(record)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        yield records
    finally:
        logger.removeFilter(hold)


def emit_load_report(record: logging.LogRecord) -> None:
    logging.getLogger(record.name).handle(record)
