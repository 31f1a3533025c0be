"""Trainable tokens: train chosen rows of an embedding (e.g. a chat template's new special tokens), nothing else.

Each adapted layer keeps its weight frozen and holds, per adapter, ``trainable_tokens_delta``: the trained *values*
of the chosen rows (``(n, dim)``, named like peft's, which stores values there too, not differences). Storing
values rather than differences is what keeps a resized vocabulary well defined: ``resize_token_embeddings`` fills
new rows randomly, so a difference added to them would depend on the seed of the base the adapter is loaded into;
a replaced row does not. The forward runs the base layer and swaps in the chosen rows' outputs:

* embeddings: tokens whose id is chosen take their trained row (a gather of ``(B, T)`` rows, not a copy of the
  ``(vocab, dim)`` matrix per step);
* output heads (``nn.Linear``): the chosen logits are recomputed from the trained rows (``x @ rows^T``).

Weights an output head shares with the input embedding (``tie_word_embeddings``) follow the same trained rows:
the head gets a tied layer that holds no tensors of its own, as in peft, whose files then name the same rows under
both modules. Merging writes the rows into the base weight and unmerging writes back what was there, bit for bit.
The adapter records the number of rows its targets had (in the weights file's metadata, which peft ignores), so
that a base with another vocabulary size is refused on load instead of giving a silently different model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.core.adapter_layer import PEFT_PREFIX, AdapterLayer, adapter_dtype, adapter_layers
from lightning_peft.core.contract import PEFTMethod, register_method
from lightning_peft.core.targeting import find_targets, name_matches, replace_module

#: The adapter_config.json key whose settings lightning-peft keeps in the weights file's metadata instead (see
#: lightning_peft.formats.peft_directory.OWN_SETTINGS_KEY).
OWN_SETTINGS_KEY = "lightning_peft"


class TrainableTokensLayer(AdapterLayer):
    """An ``nn.Embedding`` or ``nn.Linear`` whose chosen rows are replaced by trained values per adapter.

    Args:
        base_layer: The frozen layer; its ``weight`` is ``(rows, dim)`` (vocabulary first for both types).
        tied_to: The layer of the module whose weight ``base_layer`` shares (a tied output head): this layer then
            uses that layer's rows, indices and merge state, and holds nothing of its own.
    """

    adapter_attrs = ("trainable_tokens_delta",)
    adapter_settings = ("token_indices", "_rows_before_merge")

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        # A tuple, not an attribute module: the tied layer must not appear twice in named_modules().
        self._tied_to = (tied_to,) if tied_to is not None else ()
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self._rows_before_merge: dict[str, torch.Tensor] = {}
        else:
            # The same objects: the state dict names the rows under both modules (peft's layout), merging either
            # layer merges both, and one delete removes them from both.
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
            self._rows_before_merge = tied_to._rows_before_merge
            self.merged_adapters = tied_to.merged_adapters

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied_to[0] if self._tied_to else None

    def add_adapter(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:  # type: ignore[override]
        if self.tied_to is None:
            weight = self.base_layer.weight
            rows = weight.detach()[self._index(adapter_name, weight.device, token_indices)]  # (n, dim)
            values = rows.clone() if init_weights else torch.randn_like(rows)
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.to(adapter_dtype(weight)))
            self.token_indices[adapter_name] = list(token_indices)
        self.active_adapters = [*self.active_adapters, adapter_name]

    def _index(
        self, adapter_name: str, device: torch.device, indices: list[int] | None = None
    ) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name] if indices is None else indices, device=device)

    # --- forward ------------------------------------------------------------------------------------------------
    def adapted_forward(
        self, adapter_names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        base = self.base_layer
        if (
            type(base).forward is nn.Embedding.forward
            and base.max_norm is None
            and not base.scale_grad_by_freq
        ):
            return self._embedding_forward(adapter_names, x)
        if type(base).forward is nn.Linear.forward:
            return self._head_forward(adapter_names, x)
        # A subclass with its own forward (Gemma3's scaled embedding) or renormalising options: run that forward
        # on the weight with the rows replaced, a (rows, dim) copy per call.
        weight = base.weight
        for name in adapter_names:
            rows = self.trainable_tokens_delta[name].to(weight.dtype)
            weight = weight.index_copy(0, self._index(name, weight.device), rows)
        return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)

    def _embedding_forward(self, adapter_names: list[str], ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)  # (..., dim)
        for name in adapter_names:
            index = self._index(name, ids.device)  # (n,)
            order = torch.argsort(index)
            chosen = index[order]  # sorted, for searchsorted
            slot = torch.searchsorted(chosen, ids).clamp(max=len(chosen) - 1)  # (...,)
            hit = chosen[slot] == ids  # (...,) whether each token is a chosen one
            rows = self.trainable_tokens_delta[name][order[slot]].to(out.dtype)  # (..., dim)
            padding_idx = self.base_layer.padding_idx
            if padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
                rows = torch.where((ids == padding_idx).unsqueeze(-1), rows.detach(), rows)
            out = torch.where(hit.unsqueeze(-1), rows, out)
        return out

    def _head_forward(self, adapter_names: list[str], x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., rows)
        bias = self.base_layer.bias
        for name in adapter_names:
            index = self._index(name, x.device)
            rows = self.trainable_tokens_delta[name].to(x.dtype)
            # (..., dim) @ (dim, n) -> (..., n): the chosen logits, from the trained rows
            logits = F.linear(x, rows, None if bias is None else bias[index])
            out = out.index_copy(out.dim() - 1, index, logits.to(out.dtype))
        return out

    # --- merging ------------------------------------------------------------------------------------------------
    def check_merge(self, adapter_name: str) -> None:
        if self.tied_to is not None:
            return self.tied_to.check_merge(adapter_name)
        self.check_finite(
            self.trainable_tokens_delta[adapter_name], adapter_name, type(self.base_layer).__name__
        )

    def merge_adapter(self, adapter_name: str) -> None:
        if self.tied_to is not None:  # the weight is the tied layer's: merging it there merges both
            return self.tied_to.merge_adapter(adapter_name)
        self.check_merge(adapter_name)
        weight = self.base_layer.weight
        index = self._index(adapter_name, weight.device)
        with torch.no_grad():
            self._rows_before_merge[adapter_name] = weight[index].clone()
            weight.index_copy_(0, index, self.trainable_tokens_delta[adapter_name].to(weight.dtype))

    def unmerge_adapter(self, adapter_name: str) -> None:
        if self.tied_to is not None:
            return self.tied_to.unmerge_adapter(adapter_name)
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.index_copy_(
                0, self._index(adapter_name, weight.device), self._rows_before_merge.pop(adapter_name)
            )


def _rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


@register_method
@dataclass(kw_only=True)
class TrainableTokens(PEFTMethod):
    """Train the embedding rows of chosen token ids and nothing else (peft's ``TrainableTokensConfig``).

    Typical use: tokens added for a chat template, after ``tokenizer.add_special_tokens`` and
    ``model.resize_token_embeddings(len(tokenizer))``; an output head tied to the embedding follows the same rows.

    Example:
        >>> from lightning_peft import count_parameters, inject
        >>> from lightning_peft.testing.models import tiny_llama
        >>> model = inject(tiny_llama(), TrainableTokens(token_indices=[5, 9]))
        >>> count_parameters(model)["trainable"]  # two rows of 64
        128

    Args:
        token_indices: The token ids whose rows are trained (distinct, non-negative).
        target_modules: ``nn.Embedding`` (or ``nn.Linear`` output head) modules, same syntax as other methods.
            ``None``: the model's input embedding (``get_input_embeddings()``, else modules named ``embed_tokens``).
            A head with its own, untied weight is trained only where it is targeted (e.g.
            ``["embed_tokens", "lm_head"]``); a head tied to a target always follows it.
        init_weights: Start the trained rows from the base's (``True``: the model is unchanged at init) or from
            ``N(0, 1)`` (``False``, as peft's option).
        num_embeddings: The number of rows the targets must have. ``None``: whatever the base has, recorded when
            the adapter is saved; a loaded adapter sets it, so a base with another vocabulary size is refused.
        modules_to_save: Modules trained in full.

    Raises:
        ValueError: bad ``token_indices`` (at construction), or at injection an index beyond a target's rows,
            targets of different row counts, or a target whose rows differ from ``num_embeddings``.
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    mergeable: ClassVar[bool] = True

    token_indices: list[int]
    target_modules: list[str] | str | None = None
    init_weights: bool = True
    num_embeddings: int | None = None

    def validate(self) -> None:
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)) or not indices:
            raise ValueError(
                f"TrainableTokens: token_indices={indices!r}; give a non-empty list of token ids, e.g. "
                "tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])."
            )
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ValueError(f"TrainableTokens: token_indices must be non-negative ints; got {bad[:5]}.")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise ValueError(
                f"TrainableTokens: token_indices repeats {repeated[:5]}; each row is trained once, list it once."
            )
        if self.num_embeddings is not None:
            if not isinstance(self.num_embeddings, int) or self.num_embeddings <= 0:
                raise ValueError(
                    f"TrainableTokens: num_embeddings={self.num_embeddings!r}; give a positive int."
                )
            if max(indices) >= self.num_embeddings:
                raise ValueError(
                    f"TrainableTokens: token index {max(indices)} is out of range for num_embeddings="
                    f"{self.num_embeddings} (valid: 0..{self.num_embeddings - 1})."
                )

    def inject_layers(self, model: nn.Module, adapter_name: str) -> None:
        groups = self._tied_groups(model, self._targets(model))
        saved = [
            n
            for group in groups
            for n, _ in group[1:]
            if self.modules_to_save and name_matches(n, self.modules_to_save)
        ]
        if saved:
            raise ValueError(
                f"TrainableTokens: {saved[0]} is in modules_to_save but shares its weight with a target, whose chosen "
                "rows it follows; a full trained copy would untie it. Leave it out of modules_to_save."
            )
        sizes = {name: _rows(_base(module)) for group in groups for name, module in group}
        self._check_rows(sizes)
        for (name, module), *followers in groups:
            leader = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
            leader.add_adapter(adapter_name, list(self.token_indices), self.init_weights)
            if leader is not module:
                replace_module(model, name, leader)
            for follower_name, follower in followers:
                if not isinstance(follower, TrainableTokensLayer):
                    follower = TrainableTokensLayer(follower, tied_to=leader)
                    replace_module(model, follower_name, follower)
                follower.add_adapter(adapter_name, list(self.token_indices))

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        spec = self.target_modules
        if spec is None:
            get_input = getattr(model, "get_input_embeddings", None)
            try:
                embedding = get_input() if callable(get_input) else None
            except NotImplementedError:  # transformers models without a token input (CNNs)
                embedding = None
            table = embedding
            while isinstance(table, AdapterLayer):  # another method's wrapper (prompt tuning's VirtualTokens)
                table = table.base_layer
            if embedding is not None and not isinstance(table, nn.Embedding):
                raise ValueError(
                    f"TrainableTokens trains rows of a token embedding table, but {type(model).__name__}'s input "
                    f"embedding is {type(table).__name__} (image patches or other non-token input). "
                    "Name an nn.Embedding in target_modules, or use LoRA for this model."
                )
            names = [n for n, m in model.named_modules() if embedding is not None and m is embedding]
            spec = names[:1] or ["embed_tokens"]
        targets = find_targets(
            model,
            spec,
            supported=(nn.Embedding, nn.Linear, TrainableTokensLayer),
            skip=self.modules_to_save or (),
            method="TrainableTokens",
        )
        for name, module in targets:
            weight = getattr(_base(module), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
                raise TypeError(
                    f"TrainableTokens: {name} ({type(_base(module)).__name__}) has no floating-point (rows, dim) "
                    "weight (a quantized layer?); target a full-precision embedding or output head."
                )
        return targets

    @staticmethod
    def _tied_groups(
        model: nn.Module, targets: list[tuple[str, nn.Module]]
    ) -> list[list[tuple[str, nn.Module]]]:
        """Targets grouped by the weight they share, each with every other module holding that weight: the first
        entry (an embedding where there is one) trains the rows, the others follow it."""
        other_wrapped = {id(layer.base_layer): n for n, layer in adapter_layers(model)
                         if not isinstance(layer, TrainableTokensLayer)}  # fmt: skip
        inner = {id(layer.base_layer) for _, layer in adapter_layers(model)}
        holders: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, module in model.named_modules():
            if id(module) in inner:
                if id(module) in other_wrapped and id(module._parameters.get("weight")) in {
                    id(_base(m).weight) for _, m in targets
                }:
                    raise ValueError(
                        f"TrainableTokens: {other_wrapped[id(module)]} shares its weight with a target but is "
                        "already wrapped by another adapter, so it could not follow the trained rows. Inject "
                        "TrainableTokens before that adapter, or leave that module out of it."
                    )
                continue
            weight = _base(module)._parameters.get("weight")
            if isinstance(module, TrainableTokensLayer) or (weight is not None and name):
                holders.setdefault(id(weight), []).append((name, module))
        groups: list[list[tuple[str, nn.Module]]] = []
        seen: set[int] = set()
        for _, module in targets:
            key = id(_base(module).weight)
            if key in seen:
                continue
            seen.add(key)
            group = holders[key]
            leaders = [(n, m) for n, m in group if isinstance(m, TrainableTokensLayer) and m.tied_to is None]
            leaders = leaders or [e for e in group if isinstance(_base(e[1]), nn.Embedding)] or group[:1]
            unsupported = [(n, m) for n, m in group if not isinstance(_base(m), (nn.Embedding, nn.Linear))]
            if unsupported:
                name, module = unsupported[0]
                raise TypeError(
                    f"TrainableTokens: {name} ({type(module).__name__}) shares its weight with {leaders[0][0]}, "
                    "and only nn.Embedding and nn.Linear layers can follow trained rows."
                )
            groups.append([leaders[0], *[e for e in group if e[0] != leaders[0][0]]])
        return groups

    def _check_rows(self, sizes: dict[str, int]) -> None:
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"TrainableTokens: the targets have different numbers of rows ({sizes}), so one token_indices "
                "list cannot mean the same tokens in each; target one vocabulary (e.g. embed_tokens and lm_head)."
            )
        name, rows = next(iter(sizes.items()))
        if self.num_embeddings is not None and rows != self.num_embeddings:
            raise ValueError(
                f"TrainableTokens: the adapter expects {self.num_embeddings} embedding rows, but {name} has {rows}. "
                f"Resize the base as it was when the adapter was trained (model.resize_token_embeddings("
                f"{self.num_embeddings})) before injecting or loading it."
            )
        out_of_range = [i for i in self.token_indices if i >= rows]
        if out_of_range:
            raise ValueError(
                f"TrainableTokens: token_indices {out_of_range[:5]} are out of range for {name} with {rows} rows "
                f"(valid: 0..{rows - 1}). Add the tokens and call model.resize_token_embeddings(len(tokenizer)) "
                "first."
            )

    # --- the Hugging Face peft file format ---------------------------------------------------------------------
    def to_peft_config(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        layers = {
            n: m
            for n, m in adapter_layers(model)
            if isinstance(m, TrainableTokensLayer) and m.tied_to is None and adapter_name in m.token_indices
        }
        config = {
            "peft_type": self.peft_type,
            # The trained layers' exact names, as one full-match regex as peft writes it (peft finds the tied heads
            # itself; a list naming an embedding would make it warn that tied adapters cannot be tied).
            "target_modules": "|".join(re.escape(n) for n in sorted(layers)),
            "token_indices": list(self.token_indices),
            "init_weights": self.init_weights,
            OWN_SETTINGS_KEY: {"num_embeddings": _rows(next(iter(layers.values())).base_layer)},
        }
        if self.modules_to_save:  # peft's TrainableTokensConfig has no such field: written only when used
            config["modules_to_save"] = list(self.modules_to_save)
        return config

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> TrainableTokens:
        if not config.get("token_indices"):
            raise ValueError(
                "adapter_config.json for TRAINABLE_TOKENS has no 'token_indices': which rows the file's tensors "
                "replace is unknown. Add the list used in training."
            )
        return super().from_peft_config(config)  # type: ignore[return-value]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensLayer) else module


# --- LoRA's ``trainable_token_indices`` (peft's option: token rows trained beside a LoRA adapter) ------------------
#: The segment peft's LoRA files put between an embedding's path and its rows (its wrapper's ``token_adapter``).
LORA_TOKEN_SEGMENT = "token_adapter."


def methods_for_lora_option(
    trainable_token_indices: list[int] | dict[str, list[int]],
) -> list[TrainableTokens]:
    """The :class:`TrainableTokens` that LoRA's ``trainable_token_indices`` describes, as peft reads it: a list
    trains those rows of the input embedding, a dict ``{module name: indices}`` those of each named module."""
    if isinstance(trainable_token_indices, dict):
        return [
            TrainableTokens(token_indices=list(v), target_modules=[k])
            for k, v in trainable_token_indices.items()
        ]
    return [TrainableTokens(token_indices=list(trainable_token_indices))]


def to_lora_layout(
    model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File tensors (peft keys) with the token rows as peft's LoRA files hold them: under ``<module>.token_adapter.``
    and only for the trained layers (a LoRA file leaves out the tied head's copy, which peft ties again on load)."""
    leaders, followers = _token_layers(model, adapter_name)
    out = dict(tensors)
    for name in followers:
        out.pop(f"{PEFT_PREFIX}{name}.trainable_tokens_delta", None)
    for name in leaders:
        key = f"{PEFT_PREFIX}{name}.trainable_tokens_delta"
        if key in out:
            out[f"{PEFT_PREFIX}{name}.{LORA_TOKEN_SEGMENT}trainable_tokens_delta"] = out.pop(key)
    return out


def from_lora_layout(
    model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_lora_layout`, after injection: the tied heads get their trained layer's rows back."""
    leaders, followers = _token_layers(model, adapter_name)
    out = dict(tensors)
    for name in leaders:
        key = f"{PEFT_PREFIX}{name}.{LORA_TOKEN_SEGMENT}trainable_tokens_delta"
        if key in out:
            out[f"{PEFT_PREFIX}{name}.trainable_tokens_delta"] = out.pop(key)
    for name, leader in followers.items():
        source = out.get(f"{PEFT_PREFIX}{leader}.trainable_tokens_delta")
        if source is not None:
            out[f"{PEFT_PREFIX}{name}.trainable_tokens_delta"] = source
    return out


def _token_layers(model: nn.Module, adapter_name: str) -> tuple[list[str], dict[str, str]]:
    """The trained token layers' names, and each tied head's name with the name of the layer it follows."""
    layers = {
        n: m
        for n, m in adapter_layers(model)
        if isinstance(m, TrainableTokensLayer) and adapter_name in m.token_indices
    }
    names = {id(m): n for n, m in layers.items()}
    leaders = [n for n, m in layers.items() if m.tied_to is None]
    followers = {n: names[id(m.tied_to)] for n, m in layers.items() if m.tied_to is not None}
    return leaders, followers
