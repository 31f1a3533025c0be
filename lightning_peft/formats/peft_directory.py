"""Adapter directories in the Hugging Face ``peft`` layout.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(adapter tensors only). Keys are the model's state-dict keys prefixed with
``base_model.model.``, without the adapter name and with ``modules_to_save``
copies under the original module's name, e.g.::

    model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    classifier.modules_to_save.default.weight             ->  base_model.model.classifier.weight
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_peft.methods  # noqa: F401  (registers the built-in methods' peft types)
from lightning_peft.core.adapter_layer import adapter_layers, to_peft_key
from lightning_peft.core.contract import method_for_peft_type, restorable_base_changes
from lightning_peft.core.injection import (
    adapter_state_dict,
    adapter_state_keys,
    clean_key,
    discard_adapter,
    inject,
    injection_record,
    require_record,
    unwrap,
)
from lightning_peft.core.targeting import check_pattern
from lightning_peft.formats.atomic_io import describe_interrupted, write_directory

CONFIG_NAME = "adapter_config.json"
#: The key of a method's own settings, kept in the weights file's metadata (e.g. TrainableTokens' expected rows).
OWN_SETTINGS_KEY = "lightning_peft"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

_TASK_SUFFIXES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


#: The head modules peft's task models add to ``modules_to_save`` and then expect in the weights file.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _task_type(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str | None:
    """peft's task type for ``model``, or None where peft's task model would look for a head the file lacks.

    peft's SEQ_CLS / TOKEN_CLS / QUESTION_ANS models wrap the model's head (``classifier``, ``score``,
    ``qa_outputs``) as a module to save and fail to load a file without its weights (KeyError). An adapter that
    leaves the head frozen (not in ``modules_to_save``) is written without a task type: peft loads it as a plain
    PeftModel, with the base model's head, which is what this adapter was trained with. Soft-prompt adapters keep
    the task type: peft prepends their prompts only inside its task models.
    """
    cls = type(model).__name__
    task = next((task for suffix, task in _TASK_SUFFIXES.items() if cls.endswith(suffix)), None)
    heads = [
        name
        for name, _ in model.named_modules()
        if any(name == head or name.endswith("." + head) for head in _TASK_HEADS.get(task, ()))
    ]
    missing = [h for h in heads if not any(k.startswith(f"base_model.model.{h}.") for k in tensors)]
    if missing and "num_virtual_tokens" not in config:
        return None
    return task


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    allow_non_finite: bool = False,
) -> Path:
    """Write one adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (no base weights).

    The directory is written whole beside itself and swapped in (see :mod:`lightning_peft.formats.atomic_io`), so a
    save killed at any instant leaves the old adapter or the new one, complete; in a directory that holds other
    files too, each file is replaced atomically (weights, then config).

    Args:
        model: The model the adapter was injected into (for a PEFTCallback, the ``target`` submodule).
        directory: Created if missing.
        adapter_name: Which adapter; the active one by default.
        allow_non_finite: Write tensors holding NaN or infinity (refused by default: the run diverged).

    Returns:
        The directory path.
    """
    model = unwrap(model)
    record = require_record(model)
    name = adapter_name or record.active
    method = record.methods[name]
    state = adapter_state_dict(model, name)
    expected = adapter_state_keys(model, name)
    if not state or len(state) != len(expected):
        found = {clean_key(k) for k in state}
        raise RuntimeError(
            f"save_adapter found {len(state)} of the {len(expected)} tensors of adapter '{name}' in "
            f"{type(model).__name__}.state_dict() (missing e.g. {[k for k in expected if k not in found][:3]}); "
            "nothing was written. The model is wrapped in a way lightning-peft cannot see through: pass the "
            "module the adapter was injected into."
        )
    directory = Path(directory)
    config = method.to_peft_config(model, name)
    # Settings of ours that peft's config class lacks ride in the weights file's metadata, which peft ignores (an
    # unknown adapter_config.json key makes peft warn that the file needs a newer peft).
    own = config.pop(OWN_SETTINGS_KEY, None)
    metadata = {"format": "pt", **({OWN_SETTINGS_KEY: json.dumps(own, sort_keys=True)} if own else {})}
    tensors = {
        to_peft_key(k, name): v.detach().cpu().contiguous().clone()
        for k, v in method.to_peft_state_dict(model, name, state).items()
    }
    tensors = method.to_peft_tensors(model, name, tensors)
    model_config = getattr(model, "config", None)
    config.update(
        task_type=_task_type(model, tensors, config),
        base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None,
        inference_mode=True,
    )
    if not allow_non_finite:
        refuse_non_finite(
            tensors, f"save_adapter({directory})", "nothing was written; allow_non_finite=True writes them."
        )
    # Weights first: where the directory cannot be swapped whole, a kill between the two leaves the old config.
    write_directory(
        directory,
        {
            WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata=metadata),
            CONFIG_NAME: lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True)),
        },
        carried=("README.md",),
        superseded=(LEGACY_WEIGHTS_NAME,),
    )
    return directory


#: Keys peft writes that describe the file or only initialise a new adapter: accepted with any value.
PEFT_METADATA_KEYS = frozenset(
    {
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
        "peft_version", "fan_in_fan_out", "qalora_group_size", "megatron_core", "ensure_weight_tying",
        "runtime_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "tokenizer_kwargs",
        "tokenizer_name_or_path", "prompt_tuning_init_text", "token_dim", "num_attention_heads", "num_layers",
        "num_transformer_submodules",
    }
)  # fmt: skip
#: Keys of peft features lightning-peft does not have: accepted only unset (null, false, empty), since a set one
#: changes what the adapter computes.
PEFT_UNSUPPORTED_KEYS = frozenset(
    {
        "layers_to_transform", "layers_pattern", "layer_replication", "use_qalora", "alora_invocation_tokens",
        "target_parameters", "use_bdlora", "megatron_config", "arrow_config",
        "monteclora_config", "velora_config", "kasa_config", "lora_bias",
    }
)  # fmt: skip
#: Keys peft writes that some method of ours reads.
PEFT_METHOD_KEYS = frozenset(
    {
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "bias",
        "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "target_r", "init_r",
        "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step", "feedforward_modules",
        "init_ia3_weights", "num_virtual_tokens", "prompt_tuning_init", "encoder_hidden_size",
        "encoder_num_layers", "encoder_dropout", "encoder_reparameterization_type", "prefix_projection",
        "init_weights", "methods", "trainable_token_indices",
    }
)  # fmt: skip


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``directory/adapter_config.json``; any other content is an error naming the file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}."
            f"{describe_interrupted(Path(directory))}"
        )
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not valid UTF-8 JSON ({error}); write it again with save_adapter."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of adapter settings.")
    return config


def check_config_keys(path: Path, config: dict[str, Any], method_cls: type) -> None:
    """Refuse keys no method reads (typos, with the nearest known key) and set keys of peft features we lack."""
    known = (
        PEFT_METADATA_KEYS | PEFT_UNSUPPORTED_KEYS | PEFT_METHOD_KEYS | {f.name for f in fields(method_cls)}
    )
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := get_close_matches(k, known, n=1)) else repr(k)
                 for k in unknown]  # fmt: skip
        raise ValueError(
            f"{path}: unknown keys {', '.join(hints)} for {config.get('peft_type')}; an ignored key would silently "
            "change nothing. Correct or remove them."
        )
    for where, pattern in _patterns(config):
        check_pattern(pattern, f"{path}: {where}")
    # A method with a field of that name implements the feature (LoRA's target_parameters).
    own = {f.name for f in fields(method_cls)}
    used = sorted(k for k in PEFT_UNSUPPORTED_KEYS - own if config.get(k) not in (None, False, [], {}))
    if used:
        raise ValueError(
            f"{path} sets {used} ({', '.join(repr(config[k]) for k in used)}): peft features lightning-peft does "
            "not implement, which change what the adapter computes. Load it with peft, or retrain without them."
        )


def _patterns(config: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every regular expression in a config (nested method configs too): string target/exclude modules and the
    keys of rank/alpha patterns."""
    if isinstance(config, dict):
        for key, value in config.items():
            at = f"{where}{key}"
            if key in ("target_modules", "exclude_modules") and isinstance(value, str):
                yield at, value
            elif key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
                yield from ((f"{at}[{k!r}]", k) for k in value if isinstance(k, str))
            else:
                yield from _patterns(value, f"{at}.")
    elif isinstance(config, list):
        for i, item in enumerate(config):
            yield from _patterns(item, f"{where.rstrip('.')}[{i}].")


class _MetaAllocations(TorchFunctionMode):
    """New tensors go to the meta device even where a layer names its device (``torch.device("meta")`` only
    fills in a missing one): a dry-run injection that allocates nothing."""

    _FACTORIES = frozenset(
        {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.eye}
    )

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _injected_and_undone(
    model: nn.Module, method: Any, adapter_name: str, directory: Path, then: Any, meta: bool = False
) -> None:
    """Inject ``method`` and call ``then()``; if either raises (or ``meta``: always), take the adapter out again
    and put back what it changed, so the model is as it was. On ``meta`` new tensors live on the meta device
    (nothing allocated) and a failure to inject there is left to the real injection to report."""
    record = injection_record(model)
    previous_active = record.active if record is not None else None
    wrappers_before = {id(layer) for _, layer in adapter_layers(model)}
    versions = {id(t): t._version for t in _base_tensors(model)}
    with restorable_base_changes() as changes:

        def undo() -> None:
            record = injection_record(model)
            if record is not None and adapter_name in record.methods:
                discard_adapter(model, adapter_name, wrappers_before, previous_active)
            changes.restore()
            changed = [
                t for t in _base_tensors(model) if t._version != versions.get(id(t)) and t not in changes
            ]
            if changed:  # a method wrote into the base without announcing it: say so rather than hide it
                raise RuntimeError(
                    f"The refused load of {directory} changed {len(changed)} base tensors in place that could not "
                    f"be restored ({method.name} does not call about_to_change_base); reload the base model."
                )

        try:
            with _MetaAllocations() if meta else contextlib.nullcontext():
                inject(model, method, adapter_name)
        except Exception:
            undo()
            if meta:
                return
            raise
        try:
            then()
        except Exception:
            undo()
            raise
        if meta:
            undo()


def _shape_mismatches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """``"key (file shape) vs (model shape)"`` for every key in both whose shapes differ."""
    return sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )


def _refuse_shapes(
    model: nn.Module, method: Any, adapter_name: str, tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    """Compare the file's tensors with the (meta) adapter's, for the keys stored as they live."""
    live = {clean_key(n): t for n, t in (*model.named_parameters(), *model.named_buffers())}
    expected = {
        to_peft_key(k, adapter_name): live[k] for k in adapter_state_keys(model, adapter_name) if k in live
    }
    mismatched = _shape_mismatches(tensors, expected)
    if mismatched:
        raise ValueError(
            f"Adapter files in {directory} do not fit the injected {method.name}: wrong shape (file vs config "
            f"and model) {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}. Was it trained on a different "
            "base model, or does its config disagree with its weights?"
        )


def _base_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _load_into(
    model: nn.Module, method: Any, adapter_name: str, tensors: dict[str, torch.Tensor], directory: Path
) -> None:
    tensors = method.from_peft_tensors(model, adapter_name, tensors)
    expected = {to_peft_key(k, adapter_name): k for k in adapter_state_keys(model, adapter_name)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    state = model.state_dict()
    mismatched = _shape_mismatches(tensors, {k: state[v] for k, v in expected.items()})
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Adapter files in {directory} do not fit the injected {method.name}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
            f"wrong shape (file vs model) {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}. "
            "Was it trained on a different base model or with other target_modules?"
        )
    model.load_state_dict({expected[k]: v for k, v in tensors.items()}, strict=False)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file in ``directory`` (safetensors, else peft's legacy ``.bin``), as saved.

    A file that cannot be read raises ``ValueError`` naming it; a directory with neither raises
    ``FileNotFoundError`` (saying so if a save was interrupted there).
    """
    weights_path = directory / WEIGHTS_NAME
    if weights_path.is_file():
        try:
            return load_file(weights_path)
        except Exception as error:  # safetensors raises its own error types for truncated or garbage files
            raise ValueError(
                f"{weights_path} cannot be read ({type(error).__name__}: {error}): the file is truncated or not "
                "safetensors. Save the adapter again."
            ) from None
    if (legacy := directory / LEGACY_WEIGHTS_NAME).is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{legacy} cannot be read as tensors ({type(error).__name__}: {error})."
            ) from None
    raise FileNotFoundError(f"{weights_path} not found.{describe_interrupted(directory)}")


def own_settings(directory: Path) -> dict[str, Any]:
    """The settings :func:`save_adapter` kept in the weights file's metadata (none in peft's or legacy files)."""
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        return {}
    with safe_open(weights_path, framework="pt") as file:
        text = (file.metadata() or {}).get(OWN_SETTINGS_KEY)
    try:
        settings = json.loads(text) if text is not None else {}
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(
            f"{weights_path}: its {OWN_SETTINGS_KEY!r} metadata is not a JSON object; save it again."
        )
    return settings


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (FSDP's ShardedTensor, DTensor); the tensor itself otherwise."""
    if callable(getattr(tensor, "local_tensor", None)):
        return tensor.local_tensor()
    if callable(getattr(tensor, "to_local", None)):
        return tensor.to_local()
    return tensor


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: str, opt_out: str) -> None:
    """Raise ``ValueError`` naming the tensors in ``tensors`` that hold NaN or infinity (``opt_out``: how to
    proceed anyway)."""
    bad = sorted(
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())
    )
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} adapter tensors hold NaN or infinity, e.g. {bad[:3]}: the run that wrote them "
            f"diverged. Use an earlier checkpoint or adapter (lower the learning rate, check the data); {opt_out}"
        )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_non_finite: bool = False,
) -> nn.Module:
    """Inject the method described in ``directory`` (ours or written by peft) and load its weights.

    Args:
        model: The base model the adapter was trained on.
        directory: An adapter directory.
        adapter_name: Name to give the adapter in this model.
        is_trainable: Keep the adapter's parameters trainable (to continue training); frozen by default.
        allow_non_finite: Load tensors holding NaN or infinity (refused by default: a diverged run wrote them).

    Raises:
        ValueError: the files miss some of the adapter's tensors or hold tensors it does not have.
    """
    outer, model = model, unwrap(model)
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = read_adapter_config(directory)
    if not isinstance(config.get("peft_type"), str):
        raise ValueError(f"{config_path} has no 'peft_type' string; it is not an adapter config.")
    method_cls = method_for_peft_type(config["peft_type"])
    check_config_keys(config_path, config, method_cls)
    tensors = read_tensors(directory)
    if own := own_settings(directory):
        config = {**config, **own}
        check_config_keys(directory / WEIGHTS_NAME, config, method_cls)
    if not allow_non_finite:
        refuse_non_finite(tensors, str(directory), "allow_non_finite=True loads them anyway.")
    try:
        method = method_cls.from_peft_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    # A dry run on the meta device first: the adapter's shapes, compared with the file's before anything is
    # allocated (a config claiming r=10**9 over a file of r=4 must not reach the allocator).
    dry_run = lambda: _refuse_shapes(model, method, adapter_name, tensors, directory)  # noqa: E731
    _injected_and_undone(model, method, adapter_name, directory, dry_run, meta=True)
    load = lambda: _load_into(model, method, adapter_name, tensors, directory)  # noqa: E731
    _injected_and_undone(model, method, adapter_name, directory, load)
    if not is_trainable:
        model.requires_grad_(False)
    return outer
