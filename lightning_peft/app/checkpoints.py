"""Adapter-only Lightning checkpoints read back into a LightningModule: ``export``, ``generate`` and the
``adapter_best/`` that ``fit`` writes all go through :func:`load_adapter_checkpoint`."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningModule

from lightning_peft.core.injection import clean_key, state_dict_key
from lightning_peft.integrations.callback import PEFTCallback
from lightning_peft.integrations.deepspeed import adapter_tensors_from_checkpoint


def load_adapter_checkpoint(
    module: LightningModule, callback: PEFTCallback, ckpt_path: str | os.PathLike
) -> None:
    """Load the adapter tensors of a Lightning checkpoint (``weights_only=True``) into ``module``, checked first:
    nothing changes unless every adapter tensor is there with the module's shape. A directory is read as a
    DeepSpeed checkpoint (ZeRO-2/3, any number of ranks).

    Raises:
        KeyError: the checkpoint lacks some adapter tensors (another method, target or target_modules).
        ValueError: the checkpoint holds tensors the module does not have, or of another shape.
    """
    if os.path.isdir(ckpt_path):  # a DeepSpeed checkpoint: per-rank fp32 partitions, merged here
        checkpoint = {"state_dict": adapter_tensors_from_checkpoint(ckpt_path)}
    else:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # Checkpoint keys are written unwrapped (no ``_orig_mod.``): map them onto the live module's own keys.
    state = {state_dict_key(module, clean_key(k)): v for k, v in checkpoint.get("state_dict", {}).items()}
    # Adapter shapes that came from data (EVA's ranks) follow the checkpoint before anything is compared.
    prefix = callback._prefix()
    relative = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    callback.method.fit_to_checkpoint(callback.target_module(module), callback.adapter_name, relative)
    keys = [state_dict_key(module, k) for k in callback.adapter_keys(module)]
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(
            f"{ckpt_path} lacks {len(missing)} adapter tensors of {callback.method.name}, e.g. {missing[:5]}; it was "
            "written with another peft configuration. Export with the config it was trained with."
        )
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if unexpected or mismatched:
        raise ValueError(
            f"{ckpt_path} does not fit the model built from the config: unexpected {unexpected[:5]}, "
            f"wrong shape (checkpoint vs model) {mismatched[:5]}."
        )
    module.load_state_dict(state, strict=False)
