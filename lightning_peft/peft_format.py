"""Adapter directories in the Hugging Face ``peft`` layout.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(adapter tensors only). Keys are the model's state-dict keys prefixed with
``base_model.model.``, without the adapter name and with ``modules_to_save``
copies under the original module's name, e.g.::

    model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    classifier.modules_to_save.default.weight             ->  base_model.model.classifier.weight
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.atomic_io import write_directory
from lightning_peft.core import (
    _require_record,
    adapter_state_dict,
    adapter_state_keys,
    clean_key,
    discard_adapter,
    inject,
    injection_record,
    unwrap,
)
from lightning_peft.methods.base import AdapterLayer, adapter_layers, method_for_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_TASK_SUFFIXES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def to_peft_key(key: str, adapter_name: str) -> str:
    """Our state-dict key -> the key peft writes (adapter name dropped, modules_to_save folded).

    Only the segment naming the adapter inside an adapter container (``lora_A.<name>``) is dropped, so an
    adapter named like a module path segment (``"0"``, ``"default"``) never removes part of the module path.
    """
    key = key.replace(f".modules_to_save.{adapter_name}.", ".")
    containers = _adapter_attrs()
    parts = key.split(".")
    kept = [
        p for i, p in enumerate(parts) if not (p == adapter_name and i > 0 and parts[i - 1] in containers)
    ]
    return PEFT_PREFIX + ".".join(kept)


def _adapter_attrs() -> set[str]:
    """Names of every adapter container attribute (``lora_A``, ``lora_magnitude_vector``, ...) of every method."""
    attrs: set[str] = set()
    pending = [AdapterLayer]
    while pending:
        cls = pending.pop()
        attrs.update(cls.adapter_attrs)
        pending += cls.__subclasses__()
    return attrs


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_SUFFIXES.items() if cls.endswith(suffix)), None)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (no base weights).

    The directory is written whole beside itself and swapped in (see :mod:`lightning_peft.atomic_io`), so a
    save killed at any instant leaves the old adapter or the new one, complete; in a directory that holds other
    files too, each file is replaced atomically (weights, then config).

    Args:
        model: The model the adapter was injected into (for a PEFTCallback, the ``target`` submodule).
        directory: Created if missing.
        adapter_name: Which adapter; the active one by default.

    Returns:
        The directory path.
    """
    model = unwrap(model)
    record = _require_record(model)
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
    model_config = getattr(model, "config", None)
    config.update(
        task_type=_task_type(model),
        base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None,
        inference_mode=True,
    )
    tensors = {
        to_peft_key(k, name): v.detach().cpu().contiguous().clone()
        for k, v in method.to_peft_state_dict(model, name, state).items()
    }
    tensors = method.to_peft_tensors(model, name, tensors)
    # Weights first: where the directory cannot be swapped whole, a kill between the two leaves the old config.
    write_directory(
        directory,
        {
            WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            CONFIG_NAME: lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True)),
        },
        carried=("README.md",),
        superseded=(LEGACY_WEIGHTS_NAME,),
    )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    return json.loads(path.read_text())


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Inject the method described in ``directory`` (ours or written by peft) and load its weights.

    Args:
        model: The base model the adapter was trained on.
        directory: An adapter directory.
        adapter_name: Name to give the adapter in this model.
        is_trainable: Keep the adapter's parameters trainable (to continue training); frozen by default.

    Raises:
        ValueError: the files miss some of the adapter's tensors or hold tensors it does not have.
    """
    outer, model = model, unwrap(model)
    config = read_adapter_config(directory)
    if "peft_type" not in config:
        raise ValueError(f"{Path(directory) / CONFIG_NAME} has no 'peft_type'; it is not an adapter config.")
    weights_path = Path(directory) / WEIGHTS_NAME
    if weights_path.is_file():
        tensors = load_file(weights_path)
    elif (legacy := Path(directory) / LEGACY_WEIGHTS_NAME).is_file():
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{weights_path} not found.")
    method = method_for_peft_type(config["peft_type"]).from_peft_config(config)
    record = injection_record(model)
    previous_active = record.active if record is not None else None
    wrappers_before = {id(layer) for _, layer in adapter_layers(model)}
    inject(model, method, adapter_name)
    tensors = method.from_peft_tensors(model, adapter_name, tensors)
    expected = {to_peft_key(k, adapter_name): k for k in adapter_state_keys(model, adapter_name)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = model.state_dict()
    mismatched = sorted(
        f"{k} {tuple(tensors[k].shape)} vs {tuple(shapes[expected[k]].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != shapes[expected[k]].shape
    )
    if missing or unexpected or mismatched:
        # Refused: take the adapter out again, so the model is as it was before the call.
        discard_adapter(model, adapter_name, wrappers_before, previous_active)
        raise ValueError(
            f"Adapter files in {directory} do not fit the injected {method.name}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
            f"wrong shape (file vs model) {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}. "
            "Was it trained on a different base model or with other target_modules?"
        )
    state = {expected[k]: v for k, v in tensors.items()}
    model.load_state_dict(state, strict=False)
    if not is_trainable:
        model.requires_grad_(False)
    return outer
