"""Turn an adapter-only Lightning checkpoint into files for serving: a peft adapter directory, and a merged model.

Usage::

    python -m lightning_peft.app.export --config configs/sft_tiny_llama.yaml \\
        --ckpt_path runs/sft_tiny_llama/.../checkpoints/last.ckpt --out exported [--merged]

The same YAML used for training rebuilds the LightningModule and the :class:`~lightning_peft.PEFTCallback`
(extra ``--key value`` options override it, as on the ``lightning-peft`` command line); the checkpoint
supplies the adapter weights, read with ``torch.load(weights_only=True)``. Written:

* ``<out>/adapter``: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
  :func:`lightning_peft.load_adapter` or ``peft.PeftModel.from_pretrained``.
* ``<out>/merged`` (with ``--merged``, mergeable methods only): the adapted ``transformers`` model with the
  adapter folded into its weights, written with ``save_pretrained`` (plus the module's tokenizer, if it has
  one that can be saved), loadable with ``AutoModel*.from_pretrained`` and no lightning-peft at all.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule

from lightning_peft.app.checkpoints import load_adapter_checkpoint
from lightning_peft.app.cli import PEFTLightningCLI
from lightning_peft.core.injection import inject, injection_record, merge_and_unload
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.integrations.callback import PEFTCallback


def build_from_config(
    config: str | os.PathLike, overrides: Sequence[str] = ()
) -> tuple[LightningModule, PEFTCallback]:
    """The LightningModule (model built) and PEFTCallback of a lightning-peft YAML, with the adapter injected.

    Args:
        config: The YAML used for training.
        overrides: Extra command-line options, e.g. ``["--model.init_args.dtype", "float32"]``.

    Raises:
        ValueError: the config has no ``peft:`` callback.
    """
    cli = build_cli(config, overrides)
    return cli.model, next(c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback))


def build_cli(config: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """The config's command line, instantiated but not run: ``.model`` built with its adapter injected,
    ``.datamodule`` (its tokenizer and prompt format), ``.trainer`` with the PEFTCallback.

    Raises:
        ValueError: the config has no ``peft:`` callback.
    """
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    # run=False: parse and instantiate only. The logger is off so that nothing is written under the run folder.
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv has some: here sys.argv is this command's own.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = PEFTLightningCLI(
            model_class=None,
            datamodule_class=None,
            args=["--config", str(config), "--trainer.logger", "false", *overrides],
            run=False,
        )
    callback = next((c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback)), None)
    if callback is None:
        raise ValueError(f"{config} configures no PEFTCallback (`peft:`); nothing to export.")
    module = cli.model
    module.configure_model()  # builds the model where the module does so lazily (the base, from init_seed)
    target = callback.target_module(module)
    record = injection_record(target)
    if record is None or callback.adapter_name not in record.methods:
        inject(target, callback.method, callback.adapter_name)
    return cli


def export(
    config: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    merged: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``<out>/adapter`` and, with ``merged=True``, ``<out>/merged``; returns the written directories.

    Raises:
        lightning_peft.core.contract.NotMergeableError: ``merged=True`` for a method that cannot merge.
    """
    module, callback = build_from_config(config, overrides)
    load_adapter_checkpoint(module, callback, ckpt_path)
    module.eval()
    target = callback.target_module(module)
    out = Path(out)
    written = {"adapter": save_adapter(target, out / "adapter", callback.adapter_name)}
    if merged:
        plain = merge_and_unload(target)
        if not hasattr(plain, "save_pretrained"):
            raise ValueError(
                f"--merged needs a transformers model (with save_pretrained); {type(plain).__name__} has none. "
                "Set peft.target to the attribute holding the transformers model (e.g. target: model)."
            )
        plain.save_pretrained(out / "merged")
        tokenizer = _tokenizer(module)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "merged")
        written["merged"] = out / "merged"
    return written


def _tokenizer(module: LightningModule) -> Any:
    try:
        tokenizer = getattr(module, "tokenizer", None)
    except (ValueError, OSError):  # a module that has none configured
        return None
    return tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a subcommand that rebuilds a run from its config: ``--config``, and every other
    ``--key value`` left over for the config (as on the lightning-peft command line)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Other --key value options override the config, as on the lightning-peft command line.",
    )
    parser.add_argument(
        "--config", required=True, help="The lightning-peft YAML the checkpoint was trained with."
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "lightning-peft export") -> dict[str, Path]:
    parser = config_parser(
        prog,
        "Export an adapter-only checkpoint to a peft adapter directory (and a merged transformers model).",
    )
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint written by that run.")
    parser.add_argument("--out", required=True, help="Output folder: <out>/adapter and <out>/merged.")
    parser.add_argument(
        "--merged", action="store_true", help="Also save the merged full model (save_pretrained)."
    )
    args, overrides = parser.parse_known_args(argv)
    written = export(args.config, args.ckpt_path, args.out, merged=args.merged, overrides=overrides)
    for kind, path in written.items():
        print(f"lightning-peft export: {kind} written to {path}")
    return written


if __name__ == "__main__":
    main()
