"""Hot-swapping a LoRA adapter: another adapter directory's weights copied into the live parameters, in place.

As peft's ``hotswap_adapter``: the adapter keeps its name, modules and parameter objects, so a model already
wrapped by ``torch.compile`` runs the new adapter without recompiling. Two things would otherwise change what
dynamo guards on, and :func:`prepare_model_for_compiled_hotswap` (called once, before compiling) removes both:

* the scale ``alpha / r`` is a Python float per layer, which dynamo bakes into the graph: it becomes a 0-d tensor,
  a graph input whose value changes in place;
* a different rank is a different shape: ``A`` and ``B`` are zero-padded to a declared maximum rank, and a smaller
  adapter is copied into the leading rows/columns with zeros after them (they add exactly nothing).

A swap is refused, before anything changes, when the new adapter targets other modules, has a rank above the
prepared one, or differs in what the weights do not carry (dropout, DoRA, bias training, token rows).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers, to_peft_key
from lightning_peft.core.contract import method_for_peft_type
from lightning_peft.core.injection import adapter_state_keys, clean_key, is_compiled, require_record, unwrap
from lightning_peft.core.targeting import pattern_value
from lightning_peft.formats.peft_directory import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_config_keys,
    own_settings,
    read_adapter_config,
    read_tensors,
    refuse_non_finite,
)
from lightning_peft.methods.lora.layers import LoraConv, LoraEmbedding, LoraLayer
from lightning_peft.methods.lora.lora import LoRA

#: Per container of a LoRA layer: which dimension of its tensor is the rank (A: rows; B: columns).
_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}
#: LoRA settings the weights do not carry: a swap between adapters that differ in them is refused.
_MUST_MATCH = ("dropout", "use_dora", "bias", "trainable_token_indices")


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, adapter_name: str | None = None
) -> nn.Module:
    """Make LoRA adapter ``adapter_name`` (the active one by default) hot-swappable under ``torch.compile``.

    Call it after injecting or loading the first adapter and before ``torch.compile`` (and before building the
    optimizer: padding replaces the ``A``/``B`` parameters). Each layer's scale becomes a 0-d tensor; with
    ``target_rank``, ``A`` and ``B`` are zero-padded to that rank (outputs unchanged: the padding adds zeros), so
    :func:`hotswap_adapter` can load any adapter of rank ``<= target_rank`` on the same modules without a
    recompile. Saving afterwards writes the padded adapter (rank ``target_rank``, scale per layer unchanged).

    Raises:
        ValueError: the model is already compiled, the adapter is not LoRA, is merged, has a layer of rank above
            ``target_rank``, or sits on a grouped convolution (its rank is split per group); nothing is changed.
    """
    if _compiled_on_the_way(model):
        raise ValueError(
            "prepare_model_for_compiled_hotswap was called on a torch.compile'd model: changing the adapter's "
            "shapes now would recompile it. Call it before torch.compile(model)."
        )
    model = unwrap(model)
    name, layers = _lora_layers(model, adapter_name, "prepare_model_for_compiled_hotswap")
    if target_rank is not None:
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1:
            raise ValueError(
                f"target_rank={target_rank!r}: pass the largest rank to swap in, a positive int."
            )
        too_large = {n: _rank(layer, name) for n, layer in layers if _rank(layer, name) > target_rank}
        if too_large:
            raise ValueError(
                f"target_rank={target_rank} is below the rank of adapter '{name}' on {_first(too_large)}; padding "
                "cannot shrink an adapter. Pass target_rank >= the largest rank of every adapter to swap in. "
                "Nothing was changed."
            )
        grouped = [
            n
            for n, layer in layers
            if isinstance(layer, LoraConv)
            and layer.base_layer.groups > 1
            and _rank(layer, name) != target_rank
        ]
        if grouped:
            raise ValueError(
                f"Adapter '{name}' on grouped convolutions {grouped[:3]} splits its rank per group; zero-padding it "
                "is not supported. Pass target_rank equal to its rank (or leave it out). Nothing was changed."
            )
    for _, layer in layers:
        if target_rank is not None:
            _pad(layer, name, target_rank)
        scaling = layer.scaling[name]
        if not torch.is_tensor(scaling):
            device = next(iter(_rank_tensors(layer, name).values())).device
            layer.scaling[name] = torch.tensor(float(scaling), dtype=torch.float32, device=device)
    record = require_record(model)
    record.methods[name] = _describing_method(record.methods[name], layers, name)
    return model


def hotswap_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Replace LoRA adapter ``adapter_name``'s weights and scales with those of the adapter in ``directory``.

    The adapter keeps its name, its modules and its parameter objects (values are copied in place), so a
    ``torch.compile``'d model keeps its compiled graphs: after :func:`prepare_model_for_compiled_hotswap` it runs
    the new adapter without recompiling. Without that preparation the swap works too, but a new scale recompiles,
    and a new adapter must not have a higher rank.

    Args:
        model: The model holding the adapter (compiled or not).
        directory: An adapter directory (ours or peft's) of a LoRA adapter on the same modules.
        adapter_name: The adapter to overwrite.

    Raises:
        ValueError: the new adapter targets other modules, has a rank above the prepared one, differs in
            dropout/DoRA/bias/token rows, or its files are broken; the model is left unchanged.
    """
    outer, model = model, unwrap(model)
    directory = Path(directory)
    name, layers = _lora_layers(model, adapter_name, "hotswap_adapter")
    current = require_record(model).methods[name]
    new = _read_lora(directory)
    differing = [k for k in _MUST_MATCH if getattr(new, k) != getattr(current, k)]
    if differing:
        raise ValueError(
            f"Cannot hot-swap {directory} into adapter '{name}': it differs in "
            f"{', '.join(f'{k} ({getattr(new, k)!r} vs {getattr(current, k)!r})' for k in differing)}, which the "
            "weights do not carry and a compiled model has fixed. Load it as a separate adapter "
            "(lightning_peft.load_adapter(model, directory, adapter_name=...)). Nothing was changed."
        )
    live = _live_tensors(model, name)
    tensors = current.from_peft_tensors(model, name, _read_checked(directory))
    expected = {to_peft_key(k, name): k for k in live}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Cannot hot-swap {directory} into adapter '{name}': it targets other modules (missing "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''}). Hot-swapping keeps the adapter's modules; load it as a "
            "separate adapter instead. Nothing was changed."
        )
    scalings = _new_scalings(new, layers, name, tensors, directory)
    plan = []  # (live tensor, new tensor, rank dimension or None)
    for peft_key, key in expected.items():
        target, value = live[key], tensors[peft_key]
        rank_dim = _rank_dim_of(key, name)
        fits = value.shape == target.shape or (
            rank_dim is not None
            and value.dim() == target.dim()
            and all(
                v == t or (d == rank_dim and v <= t)
                for d, (v, t) in enumerate(zip(value.shape, target.shape, strict=True))
            )
        )
        if not fits:
            raise ValueError(
                f"Cannot hot-swap {directory} into adapter '{name}': {peft_key} has shape {tuple(value.shape)}, the "
                f"live tensor {tuple(target.shape)}. A rank above the live one needs "
                "prepare_model_for_compiled_hotswap(model, target_rank=<the largest rank>) before torch.compile. "
                "Nothing was changed."
            )
        plan.append((target, value, rank_dim))
    with torch.no_grad():
        for target, value, rank_dim in plan:
            if value.shape == target.shape:
                target.copy_(value)
            else:
                target.zero_()
                target.narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)
        for (_, layer), scaling in zip(layers, scalings, strict=True):
            if torch.is_tensor(layer.scaling[name]):
                layer.scaling[name].fill_(scaling)  # in place: a compiled graph reads the new value
            else:
                layer.scaling[name] = scaling
    record = require_record(model)
    record.methods[name] = _describing_method(new, layers, name)
    return outer


# --- helpers ---------------------------------------------------------------------------------------------------
def _compiled_on_the_way(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it is a ``torch.compile`` wrapper."""
    return any(is_compiled(m) for m in [model, *model.modules()])


def _lora_layers(
    model: nn.Module, adapter_name: str | None, caller: str
) -> tuple[str, list[tuple[str, LoraLayer]]]:
    """The adapter's name and its LoRA layers (name, layer), after refusing what cannot be swapped."""
    record = require_record(model)
    name = adapter_name or record.active
    if name not in record.methods:
        raise ValueError(f"{caller}: unknown adapter '{name}'; this model has {sorted(record.methods)}.")
    method = record.methods[name]
    if not isinstance(method, LoRA) or method.peft_type != "LORA":
        raise ValueError(
            f"{caller}: adapter '{name}' is {method.name}; hot-swapping supports LoRA adapters only (as in peft)."
        )
    layers = [
        (n, layer) for n, layer in adapter_layers(model) if isinstance(layer, LoraLayer) and name in layer.r
    ]
    if not layers:
        raise ValueError(f"{caller}: adapter '{name}' has no LoRA layer in this model.")
    merged = [n for n, layer in layers if name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"{caller}: adapter '{name}' is merged into {merged[:3]}; changing its weights now would corrupt the "
            "base weights on unmerge. Call lightning_peft.unmerge(model) first. Nothing was changed."
        )
    return name, layers


def _rank_tensors(layer: LoraLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """``container -> tensor`` for the adapter's rank-carrying tensors (A and B)."""
    if isinstance(layer, LoraEmbedding):
        return {c: getattr(layer, c)[adapter_name] for c in ("lora_embedding_A", "lora_embedding_B")}
    return {c: getattr(layer, c)[adapter_name].weight for c in ("lora_A", "lora_B")}


def _rank(layer: LoraLayer, adapter_name: str) -> int:
    """The adapter's rank on ``layer`` as its tensors hold it (the padded rank once padded)."""
    container, tensor = next(iter(_rank_tensors(layer, adapter_name).items()))
    return tensor.shape[_RANK_DIM[container]]


def _pad(layer: LoraLayer, adapter_name: str, rank: int) -> None:
    """Zero-pad A's rows and B's columns (B's input channels on a convolution) to ``rank``."""
    if _rank(layer, adapter_name) == rank:
        return
    for container, tensor in _rank_tensors(layer, adapter_name).items():
        dim = _RANK_DIM[container]
        shape = list(tensor.shape)
        shape[dim] = rank
        padded = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor.detach())
        parameter = nn.Parameter(padded, requires_grad=tensor.requires_grad)
        if isinstance(layer, LoraEmbedding):
            getattr(layer, container)[adapter_name] = parameter
            continue
        module = getattr(layer, container)[adapter_name]
        module.weight = parameter
        # Keep the module's own description of its shape true (repr, and code sizing from it).
        if isinstance(module, nn.Linear):
            if dim == 0:
                module.out_features = rank
            else:
                module.in_features = rank
        elif dim == 0:
            module.out_channels = rank
        else:
            module.in_channels = rank
    layer.r[adapter_name] = rank


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _describing_method(method: LoRA, layers: list[tuple[str, LoraLayer]], adapter_name: str) -> LoRA:
    """``method`` with rank and alpha (patterns) that describe the layers as they now are: the padded rank, and
    per layer the alpha giving its current scale. What :func:`~lightning_peft.save_adapter` then writes loads
    (ours or in peft) into exactly these outputs."""
    ranks = {n: _rank(layer, adapter_name) for n, layer in layers}
    scales = {n: float(layer.scaling[adapter_name]) for n, layer in layers}
    stated = {
        n: (
            int(pattern_value(n, method.rank_pattern, method.r)),
            float(pattern_value(n, method.alpha_pattern, method.alpha)),
        )
        for n in ranks
    }
    if all(
        ranks[n] == r and math.isclose(scales[n], _scale(a, r, method.use_rslora), rel_tol=1e-12)
        for n, (r, a) in stated.items()
    ):
        return method
    alphas = {n: scales[n] * (math.sqrt(ranks[n]) if method.use_rslora else ranks[n]) for n in ranks}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    escaped = {n: n.replace(".", r"\.") for n in ranks}
    return dataclasses.replace(
        method,
        r=r,
        alpha=alpha,
        rank_pattern={escaped[n]: v for n, v in ranks.items() if v != r},
        alpha_pattern={escaped[n]: v for n, v in alphas.items() if v != alpha},
    )


def _read_lora(directory: Path) -> LoRA:
    """The LoRA method described by ``directory``'s config (and the settings kept in its weights file)."""
    config = read_adapter_config(directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory / CONFIG_NAME}: peft_type {config.get('peft_type')!r}; hot-swapping loads LoRA adapters only."
        )
    method_cls = method_for_peft_type("LORA")
    check_config_keys(directory / CONFIG_NAME, config, method_cls)
    if own := own_settings(directory):
        config = {**config, **own}
        check_config_keys(directory / WEIGHTS_NAME, config, method_cls)
    try:
        return method_cls.from_peft_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / CONFIG_NAME}: {error}") from None


def _read_checked(directory: Path) -> dict[str, torch.Tensor]:
    tensors = read_tensors(directory)
    refuse_non_finite(tensors, str(directory), "hot-swap a finite adapter.")
    return tensors


def _live_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters and buffers by canonical state-dict key."""
    found = {clean_key(n): t for n, t in (*model.named_parameters(), *model.named_buffers())}
    return {k: found[k] for k in adapter_state_keys(model, adapter_name) if k in found}


def _rank_dim_of(key: str, adapter_name: str) -> int | None:
    """The rank dimension of the tensor under ``key`` (an A or B), None for any other adapter tensor."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _RANK_DIM and parts[i + 1] == adapter_name:
            return _RANK_DIM[part]
    return None


def _new_scalings(
    new: LoRA,
    layers: list[tuple[str, LoraLayer]],
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    directory: Path,
) -> list[float]:
    """Each layer's scale under the new config, after checking that the file's rank is the config's rank."""
    scalings = []
    for layer_name, layer in layers:
        r = int(pattern_value(layer_name, new.rank_pattern, new.r))
        alpha = float(pattern_value(layer_name, new.alpha_pattern, new.alpha))
        container = next(iter(_rank_tensors(layer, adapter_name)))
        suffix = ".weight" if container in ("lora_A", "lora_B") else ""
        key = to_peft_key(f"{layer_name}.{container}.{adapter_name}{suffix}", adapter_name)
        if key in tensors and tensors[key].shape[_RANK_DIM[container]] != r:
            raise ValueError(
                f"{directory}: {key} has rank {tensors[key].shape[_RANK_DIM[container]]} but its config says r={r} "
                "for that module, so its scale is unknown. Save the adapter again. Nothing was changed."
            )
        scalings.append(_scale(alpha, r, new.use_rslora))
    return scalings


def _first(items: dict[str, int]) -> str:
    return ", ".join(f"{n} (r={r})" for n, r in list(items.items())[:3])
