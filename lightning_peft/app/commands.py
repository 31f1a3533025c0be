"""The ``lightning-peft`` console script: Lightning's subcommands (``fit``, ``validate``, ``test``, ``predict``)
through :mod:`lightning_peft.app.cli`, plus ``export`` and ``generate``, and an overview for ``lightning-peft`` / ``--help``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a subcommand runs: the overview needs neither torch nor Lightning (~5 s)
    from lightning_peft.app import cli, export, generate  # noqa: F401

# The subcommand -> the module whose main() runs it (the names under TYPE_CHECKING above).
SUBCOMMANDS = {"export": "lightning_peft.app.export", "generate": "lightning_peft.app.generate"}
LIGHTNING_CLI = "lightning_peft.app.cli"  # fit, validate, test, predict

OVERVIEW = """\
usage: lightning-peft {fit,validate,test,predict,export,generate} [--config FILE] [--key value ...]

Parameter-efficient fine-tuning (LoRA, QLoRA, AdaLoRA, IA3, BitFit, prompt/prefix tuning, adapters, MAM,
UniPELT) of any LightningModule, with Lightning's Trainer, strategies and launchers.

  lightning-peft fit --config configs/quickstart.yaml     LoRA on the embedded MiniLM (offline, ~1 min on CPU)
  lightning-peft fit --config configs/<method>.yaml       every method has a ready config in configs/
  lightning-peft fit --config X --peft.method.init_args.r 16   any option can be overridden this way
  lightning-peft validate|test|predict --config X --ckpt_path CKPT
  lightning-peft export --config X --ckpt_path CKPT --out DIR [--merged]
                                                          peft adapter directory (and a merged model)
  lightning-peft generate --config X --ckpt_path CKPT --prompt "..."   answers with the adapter (causal LMs)
  lightning-peft fit --help                               every option: trainer, model, data, peft, optimizer

The peft: section holds PEFTCallback's options: method (class_path: lightning_peft.methods.LoRA, ... or null
for full fine-tuning), target, adapter_only_checkpoints, merge_on_fit_end, adapter_name.
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-peft`` (returns nothing: the script exits with 0)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(OVERVIEW, end="")
        return
    if args[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
        return
    # None: LightningCLI reads sys.argv itself (no "args and argv" warning)
    importlib.import_module(LIGHTNING_CLI).main(None if argv is None else args)


if __name__ == "__main__":
    main()
