"""The ``lightning-peft`` command line: a LightningCLI with a configurable :class:`PEFTCallback`.

Usage::

    lightning-peft fit      --config configs/quickstart.yaml
    lightning-peft validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/.../best.ckpt
    lightning-peft fit      --config configs/lora.yaml --peft.method.init_args.r 16 --trainer.max_epochs 3

The YAML chooses the method by class path::

    peft:
      method:
        class_path: lightning_peft.methods.LoRA
        init_args: {r: 8, target_modules: [query, value], modules_to_save: [classifier]}
      target: model

Full fine-tuning (the reference a PEFT method is compared with) is the same command with no method::

    peft:
      method: null       # the default; also `peft: null`, or on the command line `--peft.method null`

Then no :class:`PEFTCallback` is added, as with a plain LightningCLI: every parameter trains (``optimizer:``
is built from all of them), checkpoints are ordinary full checkpoints, nothing is exported after ``fit``, and
the run still reports "full fine-tuning (no PEFT method) trains N of N parameters (100.0000%)".

``model:`` and ``data:`` accept any LightningModule / LightningDataModule by class path and default to
:class:`~lightning_peft.app.tasks.SequenceClassificationModule` and
:class:`~lightning_peft.app.datamodules.TextClassificationDataModule`.

A config that names a class that does not exist or a key that a class does not take stops before anything
is built, with the offending key and the closest valid names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from types import MethodType
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace, get_loader, lazy_instance, set_loader, set_parsing_settings
from jsonargparse.typing import class_from_function
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    SaveConfigCallback,
    instantiate_class,
)
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch.optim import Optimizer

import lightning_peft.methods as methods
from lightning_peft.app.checkpoints import load_adapter_checkpoint
from lightning_peft.app.curves import plot_curves
from lightning_peft.app.datamodules import FileDataModule, TextClassificationDataModule
from lightning_peft.app.prediction_writer import PredictionWriter
from lightning_peft.app.tasks import SequenceClassificationModule
from lightning_peft.core.contract import PEFTMethod
from lightning_peft.core.injection import state_dict_key
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.integrations.callback import PEFTCallback, report_parameter_counts

PEFT_KEY = "peft"
YAML_MODE = "lightning_peft_yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently:
    a second ``trainer:`` would replace the first whole)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"the key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "the second would silently replace the first. Merge them into one.",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _strict_yaml_load(stream: str) -> Any:
    if isinstance(stream, str) and ":" in stream:
        yaml.load(
            stream, Loader=_UniqueKeyLoader
        )  # only to refuse duplicates; the value comes from jsonargparse
    return _JSONARGPARSE_YAML(stream)


_JSONARGPARSE_YAML = get_loader("yaml")
set_loader(YAML_MODE, _strict_yaml_load, exceptions=(yaml.YAMLError,))


class PEFTArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors end with the closest valid names instead of a page of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        try:
            hints = _hints(parser, message)
        except Exception:  # hints are a courtesy: never let them hide the error itself
            hints = []
        message = message.rstrip() + "".join(f"\n{hint}" for hint in hints)
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message}\ntip: list every option with `{prog} --help`.\n")
        self.exit(2)


def _method_error(error: BaseException) -> str | None:
    """The message of the error a PEFT method raised about its own hyperparameters, if that is what ``error``
    (or an exception it chains) is; ``None`` otherwise."""
    seen: set[int] = set()
    current: BaseException | None = error
    methods_dir = str(Path(PEFTMethod.__module__.replace(".", "/")).parent)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        if frames and methods_dir in Path(frames[-1].filename).as_posix():
            return str(current)
        # jsonargparse's union error lists each member's error as text ("Errors:\n  - ..."); the chain holds
        # only the last one tried, which in some releases is the `None` member's.
        text = str(current)
        listed = re.search(r"Errors:\n(.*?)\nGiven value type", text, flags=re.S)
        if listed and PEFTMethod.__name__ in text:
            reasons = [
                line.strip()[2:]
                for line in listed.group(1).splitlines()
                if line.strip().startswith("- ") and "NoneType" not in line
            ]
            if len(reasons) == 1:
                return reasons[0]
        current = current.__cause__ or current.__context__
    return None


def _hints(parser: LightningArgumentParser, message: str) -> list[str]:
    """Did-you-mean lines for the errors users hit most: a class that does not exist, a key that is not taken."""
    hints = []
    for path, module_name, attribute in re.findall(
        r"class_path '([\w.]+)':\s+module '([\w.]+)' has no attribute '(\w+)'", message
    ):
        try:
            names = [
                n for n, obj in vars(importlib.import_module(module_name)).items() if isinstance(obj, type)
            ]
        except ImportError:
            names = []
        close = difflib.get_close_matches(attribute, names, n=3, cutoff=0.5)
        if close:
            hints.append(
                f"'{path}' does not exist; did you mean {', '.join(f'{module_name}.{c}' for c in close)}?"
            )
    unknown_class = ("has no attribute", "subclass of PEFTMethod", "not accessible")
    if f'"{PEFT_KEY}.method"' in message and any(problem in message for problem in unknown_class):
        hints.append(
            f"PEFT methods: {', '.join(_peft_methods())} (class_path lightning_peft.methods.<name>)."
        )
    for path, option in re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message):
        accepted = _init_args(path)
        close = difflib.get_close_matches(option, accepted, n=3, cutoff=0.5)
        guess = f" Did you mean {', '.join(close)}?" if close and "did you mean" not in message else ""
        hints.append(f"{path.rsplit('.', 1)[-1]} takes: {', '.join(accepted)}.{guess}")
    keys = _option_keys(parser)
    unknown = re.findall(r"unrecognized arguments: (.*)", message)
    unknown = [a.lstrip("-").split("=")[0] for part in unknown for a in part.split() if a.startswith("--")]
    unknown += [
        f"{g}.{o}" for g, o in re.findall(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
    ]
    unknown += re.findall(r"^Option '([\w.]+)' is not accepted", message, flags=re.M)
    for key in unknown:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            hints.append(f"'{key}' is not an option; did you mean {', '.join(close)}?")
    return hints


def _option_keys(parser: Any) -> list[str]:
    """Every option key of a parser and of its subcommands' parsers (``trainer.max_epochs``, ...)."""
    keys = []
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and all(hasattr(p, "_actions") for p in choices.values()):
            keys += [key for sub in choices.values() for key in _option_keys(sub)]
        elif action.dest not in (None, "help", "config"):
            keys.append(action.dest)
    return sorted(set(keys))


def _peft_methods() -> list[str]:
    return sorted(
        name for name, obj in vars(methods).items()
        if isinstance(obj, type) and issubclass(obj, PEFTMethod) and obj is not PEFTMethod
    )  # fmt: skip


def _init_args(class_path: str) -> list[str]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return []
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _scalars(metrics: Any) -> dict[str, float]:
    """The scalar metrics, without the per-batch ``*_step`` copies (their ``*_epoch`` twins summarise them)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if (not hasattr(v, "numel") or v.numel() == 1) and not k.endswith("_step")
    }


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _checkpoint_run(ckpt_path: str | None, trainer: Trainer) -> Path | None:
    """The run folder of ``ckpt_path`` when it is a sibling version of the folder the logger would log to
    (``.../lightning_logs/version_0/checkpoints/best.ckpt`` while predict would start ``version_1``)."""
    if not ckpt_path or trainer.logger is None or trainer.log_dir is None:
        return None
    checkpoint = Path(ckpt_path)
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not checkpoint.is_file():
        return None
    log_dir = Path(trainer.log_dir)
    return run if log_dir != run and log_dir.parent.resolve() == run.parent.resolve() else None


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>-1<suffix>``, ``-2``, ... : the first that does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _has_test_split(datamodule: LightningDataModule | None, model: LightningModule) -> bool:
    """The module has a ``test_step`` and the data a test split (a file for :class:`FileDataModule`, which
    refuses a split without one; else an overridden ``test_dataloader``)."""
    if not is_overridden("test_step", model):
        return False
    if isinstance(datamodule, FileDataModule):
        return datamodule.files["test"] is not None
    if datamodule is not None:
        return is_overridden("test_dataloader", datamodule)
    return is_overridden("test_dataloader", model)


class FullFineTuning(Callback):
    """What the CLI adds instead of a :class:`PEFTCallback` when ``peft.method`` is null: it changes nothing.

    Every parameter keeps ``requires_grad``, optimizers and checkpoints are Lightning's own. It only reports
    the parameter count the way :class:`PEFTCallback` does (the line the benchmarks parse, and the
    ``peft/*_params`` metrics), so full fine-tuning runs line up with PEFT runs in logs and tables.
    """

    def __init__(self) -> None:
        self.parameter_counts: dict[str, float] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.parameter_counts = report_parameter_counts(
            trainer, pl_module, "full fine-tuning (no PEFT method)"
        )


def peft_section(
    method: PEFTMethod | None = None,
    target: str | None = None,
    adapter_only_checkpoints: bool = True,
    merge_on_fit_end: bool = False,
    adapter_name: str = "default",
) -> Callback:
    """Inject a PEFT method into a LightningModule, train only its parameters, checkpoint only them.

    ``method: null`` (or no ``peft:`` at all) is full fine-tuning: no PEFTCallback, every parameter trains,
    full checkpoints.

    Args:
        method: The method and its hyperparameters (class_path: lightning_peft.methods.<name>); null: full
            fine-tuning, every parameter trains (the other peft options are then unused).
        target: Dotted path of the submodule to adapt (e.g. model); null adapts the whole module.
        adapter_only_checkpoints: Write only adapter weights (and their optimizer state) to checkpoints.
        merge_on_fit_end: Fold the adapter into the base weights when ``fit`` ends (mergeable methods only).
        adapter_name: Name of the adapter inside the model.

    Returns:
        A :class:`PEFTCallback`, or a :class:`FullFineTuning` when ``method`` is null.

    Raises:
        ValueError: ``merge_on_fit_end`` without a method (there is no adapter to merge).
    """
    if method is None:
        if merge_on_fit_end:
            raise ValueError(
                f"{PEFT_KEY}.merge_on_fit_end is true but {PEFT_KEY}.method is null (full fine-tuning): there is "
                "no adapter to merge. Choose a method or set merge_on_fit_end: false."
            )
        return FullFineTuning()
    return PEFTCallback(method, target, adapter_only_checkpoints, merge_on_fit_end, adapter_name)


# The `peft:` group of the parser: PEFTCallback's options, with a method that may be null. jsonargparse also
# registers the class in this module under this name; instantiating it calls peft_section.
peft_section_class = class_from_function(peft_section, func_return=Callback)


class PEFTLightningCLI(LightningCLI):
    """LightningCLI that adds ``peft:`` (a :class:`PEFTCallback`) and builds ``optimizer:`` lazily.

    Why the optimizer machinery is overridden: with a top-level ``optimizer:`` / ``lr_scheduler:`` in
    the config, LightningCLI instantiates the optimizer right after parsing, from
    ``model.parameters()``, and patches ``configure_optimizers`` to return that ready object. At that
    moment no adapter exists yet (PEFTCallback injects in ``configure_model``, during ``fit``), so the
    optimizer holds only base weights that are then frozen, the adapters are never stepped, and a model
    built in ``configure_model`` has no parameters at all yet (Lightning issue #19110 is the same root
    cause). Here :meth:`_add_configure_optimizers_method_to_model` resolves the same configuration but
    defers instantiation: the patched ``configure_optimizers`` builds the optimizer, then the scheduler,
    from the parameters that require grad *when Lightning calls it*, i.e. after injection and after the
    strategy has wrapped the model. The result is then shaped by :meth:`LightningCLI.configure_optimizers`
    as usual (so ``ReduceLROnPlateau`` with ``monitor`` keeps working).

    After ``fit`` the trained adapter is also written in the Hugging Face ``peft`` layout to
    ``<log_dir>/adapter`` (loadable with :func:`lightning_peft.load_adapter` or ``peft``).

    ``peft.method: null`` is full fine-tuning: a :class:`FullFineTuning` callback takes the PEFTCallback's
    place, so the optimizer gets every parameter, checkpoints are full, and after ``fit`` there is no adapter
    to export (the run says so and points at the best checkpoint).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # PEFTMethod subclasses are dataclasses; jsonargparse turns class_path/init_args off for pure
        # dataclasses unless asked, and `peft.method: {class_path: lightning_peft.methods.LoRA}` needs it.
        set_parsing_settings(subclasses_enabled=[PEFTMethod])
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", PEFTArgumentParser)
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            reason = _method_error(error)
            if reason is None:
                raise
            # A bad hyperparameter is the user's input, not a bug: one line, not jsonargparse's traceback.
            print(f"lightning-peft {self.subcommand}: {PEFT_KEY}.method: {reason}", file=sys.stderr)
            raise SystemExit(2) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(peft_section_class, PEFT_KEY)  # method null: full fine-tuning
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit: after training, test the best checkpoint when the data has a test split (other commands: unused).",
        )
        parser.set_defaults(
            {
                "model": lazy_instance(SequenceClassificationModule),
                "data": lazy_instance(TextClassificationDataModule),
            }
        )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        if not self.auto_configure_optimizers:
            return
        parser = self._parser(subcommand)
        optimizer_init = self._automatic_init(parser._optimizers, Optimizer)
        if not optimizer_init:
            return  # no `optimizer:` given: the LightningModule's own configure_optimizers is used
        lr_scheduler_init = self._automatic_init(parser._lr_schedulers, LRSchedulerTypeTuple)
        shape_result = self.configure_optimizers

        def configure_optimizers(module: LightningModule) -> Any:
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    "The config's `optimizer:` found no trainable parameters when configure_optimizers ran. "
                    "Check that `peft.method` targets modules of the model (e.g. target_modules=[query, value]), "
                    "or, with `peft.method: null`, that the model does not freeze its own parameters."
                )
            # Optimizers that must tell LoRA's A from B (LoRA+, LoRA-FA) read it from the model's layers: they get the
            # module itself (they take its trainable tensors); every other optimizer gets the trainable tensors.
            module_name, _, class_name = optimizer_init["class_path"].rpartition(".")
            optimizer_class = getattr(importlib.import_module(module_name), class_name)
            takes_module = getattr(optimizer_class, "takes_module", False) is True
            optimizer = instantiate_class(module if takes_module else params, optimizer_init)
            lr_scheduler = instantiate_class(optimizer, lr_scheduler_init) if lr_scheduler_init else None
            return shape_result(module, optimizer, lr_scheduler)

        # On the instance, as LightningCLI does; PEFTCallback wraps whatever is there.
        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)

    def _automatic_init(
        self, register: dict[str, tuple[type | tuple[type, ...], str]], base: type | tuple[type, ...]
    ) -> dict[str, Any] | None:
        """The ``{class_path, init_args}`` of the single AUTOMATIC optimizer/scheduler entry, if one was given.

        Raises:
            ValueError: more than one AUTOMATIC entry of this kind (LightningCLI refuses that too).
        """
        keys = [
            key
            for key, (classes, link_to) in register.items()
            if link_to == "AUTOMATIC"
            and any(issubclass(c, base) for c in (classes if isinstance(classes, tuple) else (classes,)))
        ]
        if not keys:
            return None
        if len(keys) > 1:
            raise ValueError(
                f"{type(self).__name__} supports one automatic optimizer and one lr_scheduler, found {keys}; "
                "link the extra ones yourself and implement configure_optimizers in the LightningModule."
            )
        init = self._get(self.config_init, keys[0])
        classes = register[keys[0]][0]
        if init and not isinstance(classes, tuple):  # one fixed class: the config holds only its init args
            init_args = init.as_dict() if isinstance(init, Namespace) else dict(init)
            init = {"class_path": f"{classes.__module__}.{classes.__name__}", "init_args": init_args}
        return init or None

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # What was typed, to tell "no method given" from an explicit `--peft.method null` below.
        self._typed = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(
            args, (dict, Namespace)
        ) else None  # fmt: skip
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """``peft: null`` means what ``peft.method: null`` means: full fine-tuning (the other options at default).
        ``fit`` with neither a config file nor a method is refused: it would fully fine-tune the default model."""
        config = self.config.get(str(self.subcommand), self.config)
        if PEFT_KEY in config and config[PEFT_KEY] is None:
            config[PEFT_KEY] = self._parser(self.subcommand).get_defaults()[PEFT_KEY]
        typed = getattr(self, "_typed", None)
        if (
            self.subcommand == "fit"
            and typed is not None
            and not config.get("config")
            and not any(a.split("=")[0] in ("--peft", "--peft.method") for a in typed)
        ):
            print(
                "lightning-peft fit: no config and no PEFT method given, which would fully fine-tune the default "
                "model. Start from a ready config, e.g.\n"
                "  lightning-peft fit --config configs/quickstart.yaml     (LoRA on the embedded MiniLM)\n"
                "(every method has one in configs/), or name one: --peft.method LoRA. Full fine-tuning: "
                "--peft.method null, or --config configs/full_finetune.yaml.",
                file=sys.stderr,
            )
            raise SystemExit(2)

    def before_predict(self) -> None:
        """Unless the config has a prediction writer, add one: rows go to ``predictions.jsonl`` beside the
        checkpoint's run (``<run>/checkpoints/x.ckpt`` -> ``<run>/predictions.jsonl``) when the logger would
        otherwise start a new version folder next to it, else to ``<log_dir>/predictions.jsonl``. An earlier
        file there is kept: the new one is ``predictions-1.jsonl``, ``-2``, ...

        Rows written beside the checkpoint's run leave the logger nothing to hold (predict logs no metrics): it and
        the config file are dropped for the run, so no new ``version_N`` folder holding only a config appears."""
        _quiet_checkpoint_state_notice()
        if any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            return
        config = self.config.get(str(self.subcommand), self.config)
        run = _checkpoint_run(config.get("ckpt_path"), self.trainer)
        if run is not None:
            self.trainer.loggers = []
            self.trainer.callbacks[:] = [
                c for c in self.trainer.callbacks if not isinstance(c, SaveConfigCallback)
            ]
        self.trainer.callbacks.append(
            PredictionWriter(None if run is None else str(_free_name(run / "predictions.jsonl")))
        )

    def before_validate(self) -> None:
        _quiet_checkpoint_state_notice()

    def before_test(self) -> None:
        _quiet_checkpoint_state_notice()

    def predict(self, **kwargs: Any) -> None:
        """Run ``trainer.predict`` and keep what it returns in ``self.predictions`` (the writer saved it too)."""
        self.predictions = self.trainer.predict(**kwargs)

    def after_fit(self) -> None:
        """Export the adapters (last step and best checkpoint), test on the test split if there is one, then
        print a one-screen summary and draw ``curves.png`` from ``metrics.csv``."""
        callback = next((c for c in self.trainer.callbacks if isinstance(c, PEFTCallback)), None)
        full = next((c for c in self.trainer.callbacks if isinstance(c, FullFineTuning)), None)
        if (callback is None and full is None) or self.trainer.interrupted:
            return
        log_dir = self.trainer.log_dir  # collective under DDP: every rank calls it
        # Kept here: the test run below replaces trainer.callback_metrics (as trainer.test after fit always does).
        self.fit_metrics = fit_metrics = _scalars(self.trainer.callback_metrics)
        strategy = self.trainer.strategy
        unsharded = isinstance(strategy, SingleDeviceStrategy) or (
            isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        )
        written: list[tuple[str, str]] = []
        if callback is not None and not unsharded:
            # Sharded weights (FSDP, ModelParallel, DeepSpeed) must be gathered first; the checkpoint has them.
            rank_zero_info(
                f"lightning-peft: {type(strategy).__name__} shards the adapter, so it is not exported "
                "after fit; load the checkpoint into an unsharded model and call lightning_peft.save_adapter."
            )
        elif callback is not None and log_dir is not None:
            written = (
                self._export_adapters(callback, Path(log_dir)) or []
            )  # before testing loads the best weights
        test_metrics, tested_on = self._test_after_fit()  # every rank: test is collective
        self.test_metrics = test_metrics
        self._summarise(callback or full, log_dir, fit_metrics, test_metrics, tested_on, written)

    @rank_zero_only
    def _export_adapters(self, callback: PEFTCallback, log_dir: Path) -> list[tuple[str, str]]:
        """Write ``adapter/`` (the last step's) and ``adapter_best/`` (the best checkpoint's); what was written."""
        written = [
            (
                f"{save_adapter(callback.target_module(self.model), log_dir / 'adapter').name}/",
                "the last step's adapter (peft layout)",
            )
        ]
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best:
            directory = self._export_checkpoint_adapter(callback, best, log_dir / "adapter_best")
            written.append((f"{directory.name}/", "the best checkpoint's adapter"))
        return written

    def _test_after_fit(self) -> tuple[dict[str, float], str]:
        """``trainer.test`` on the best checkpoint (else the last weights) when the data has a test split and the
        module a ``test_step``; its metrics and which weights they are of (``{}, ""`` when nothing ran)."""
        config = self.config.get(str(self.subcommand), self.config)
        if not config.get("test_after_fit", True) or not _has_test_split(self.datamodule, self.model):
            return {}, ""
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        results = self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False
        )
        return (_scalars(results[0]) if results else {}), ("the best checkpoint" if best else "the last step")

    @rank_zero_only
    def _summarise(
        self,
        counter: Any,
        log_dir: str | None,
        fit_metrics: dict[str, float],
        test_metrics: dict[str, float],
        tested_on: str,
        written: list[tuple[str, str]],
    ) -> None:
        """One screen: what trained, the best and last metrics, the test metrics, and where everything is."""
        trainer = self.trainer
        counts = getattr(counter, "parameter_counts", {})
        what = "full fine-tuning" if isinstance(counter, FullFineTuning) else counter.method.name
        lines = [f"lightning-peft: fit finished: {trainer.current_epoch} epochs, {trainer.global_step} steps"]
        if counts:
            lines.append(
                f"  trained     {what}: {int(counts['trainable']):,} of {int(counts['total']):,} parameters "
                f"({counts['trainable_percent']:.2f}%)"
            )
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "")
        score = getattr(checkpoint, "best_model_score", None)
        if best and score is not None and getattr(checkpoint, "monitor", None):
            lines.append(f"  best        {checkpoint.monitor}={float(score):.4f}  ({Path(best).name})")
        if fit_metrics:
            lines.append(f"  last        {_format(fit_metrics)}")
        if test_metrics:
            lines.append(f"  test        {_format(test_metrics)}  (weights of {tested_on})")
        where = Path(log_dir) if log_dir is not None else Path(trainer.default_root_dir)
        lines.append(f"  written to  {where}/")
        if best:
            checkpoints = sorted({Path(best).name, *(p.name for p in Path(best).parent.glob("last*.ckpt"))})
            lines.append(f"    {_relative(Path(best).parent, where)}/  {', '.join(checkpoints)}")
        lines += [f"    {name:<13} {meaning}" for name, meaning in written]
        if isinstance(counter, FullFineTuning):
            lines.append("    (full fine-tuning: no adapter to export; the checkpoints hold the whole model)")
        metrics_csv = where / "metrics.csv"
        if metrics_csv.is_file():
            lines.append(f"    metrics.csv   {self._curves_line(metrics_csv)}")
        rank_zero_info("\n".join(lines))

    @staticmethod
    def _curves_line(metrics_csv: Path) -> str:
        try:
            png, names = plot_curves(metrics_csv)
        except ModuleNotFoundError:
            return "(pip install 'lightning-peft[plot]' to get curves.png drawn from it)"
        except ValueError as error:  # nothing logged: say why there is no picture
            return f"(no curves.png: {error})"
        return f"and {png.name} ({', '.join(names)})"

    def _export_checkpoint_adapter(self, callback: PEFTCallback, checkpoint: str, directory: Path) -> Path:
        """``save_adapter`` of the weights in ``checkpoint``; the model keeps its own (last-step) weights."""
        keys = {state_dict_key(self.model, k) for k in callback.checkpoint_keys(self.model)}
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in keys}
        try:
            load_adapter_checkpoint(self.model, callback, checkpoint)
            return save_adapter(callback.target_module(self.model), directory)
        finally:
            self.model.load_state_dict(current, strict=False)


#: Notices other packages print on every run that ask nothing of a lightning-peft user (the command line only;
#: the library leaves a user's own script as it is). Real warnings are kept.
_NOTICES = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # CSVLogger is the intended default here
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning's own pytree helper
)
_TIPS = ("💡 Tip:",)  # Lightning's advertisement for its cloud logger


def _quiet_checkpoint_state_notice() -> None:
    """validate/test/predict from a checkpoint of another run: ModelCheckpoint warns that it will not restore its
    best-k bookkeeping, which only a resumed ``fit`` uses (so the notice stays on for fit)."""
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")


def _drop_tips(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_TIPS)


def _quiet_third_party_notices() -> None:
    for pattern in _NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_tips not in tips.filters:
        tips.addFilter(_drop_tips)


def cli_main(args: ArgsType = None) -> PEFTLightningCLI:
    """Build and run the command line in-process.

    Args:
        args: Command-line style arguments (``["fit", "--config", "x.yaml"]``) or a config dict;
            ``None`` reads ``sys.argv``.

    Returns:
        The CLI object: ``.trainer``, ``.model`` and ``.datamodule`` are the objects that ran.
    """
    # jsonargparse's notice about LightningCLI's own use of a renamed method is noise for our users.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    _quiet_third_party_notices()
    return PEFTLightningCLI(
        model_class=None,  # any LightningModule, by class_path
        datamodule_class=None,  # any LightningDataModule, by class_path
        args=args,
        parser_kwargs={"parser_mode": YAML_MODE},
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-peft`` console script (returns nothing: the script exits with 0)."""
    cli_main(args)


if __name__ == "__main__":
    main()
