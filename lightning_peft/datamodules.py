"""Text-classification data for the ``lightning-peft`` command line, embedded so the quickstart runs offline.

The embedded data set (``lightning_peft/data/sentiment_{train,validation,test}.tsv``) holds 308 short
English sentences (reviews of food, films, books, products, travel and services) written for this
project and labelled 1 (positive) or 0 (negative); each split is balanced. Your own data uses the same
format: a TSV file with a ``label`` and a ``text`` column (header row first).
"""

from __future__ import annotations

import csv
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lightning_peft.tasks import pretrained_kwargs, resolve_model_path

SPLITS = ("train", "validation", "test")


def embedded_split_path(split: str) -> Path:
    """Path of one split of the embedded sentiment data set (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the embedded data set has {SPLITS}.")
    return Path(str(files("lightning_peft") / "data" / f"sentiment_{split}.tsv"))


def read_tsv(path: str | Path) -> list[tuple[str, int]]:
    """``(text, label)`` pairs from a TSV file with ``label`` and ``text`` columns.

    Raises:
        ValueError: the header lacks one of the columns, or a label is not an integer.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"label", "text"} <= set(reader.fieldnames):
            raise ValueError(
                f"{path}: expected a header row with 'label' and 'text' columns, got {reader.fieldnames}."
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((row["text"], int(row["label"])))
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: label {row['label']!r} is not an integer.") from None
        return rows


class TextClassificationDataModule(LightningDataModule):
    """Labelled sentences from TSV files, tokenized per batch (dynamic padding) with a Hugging Face tokenizer.

    By default it serves the embedded sentiment data set; ``predict`` runs over the test split.

    Args:
        train_file: TSV with ``label`` and ``text`` columns; ``None`` uses the embedded training split.
        val_file: Same, for validation.
        test_file: Same, for test and predict.
        tokenizer_name_or_path: Tokenizer folder or hub name. ``None`` takes the LightningModule's
            ``model_name_or_path`` when it has one (so model and tokenizer cannot disagree), else the
            embedded all-MiniLM-L6-v2.
        max_length: Truncate inputs to this many tokens. ``None`` takes the LightningModule's
            ``max_length`` when it has one, else 64.
        batch_size: Sentences per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        tokenizer_name_or_path: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.files = {
            "train": Path(train_file) if train_file else embedded_split_path("train"),
            "validation": Path(val_file) if val_file else embedded_split_path("validation"),
            "test": Path(test_file) if test_file else embedded_split_path("test"),
        }
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.datasets: dict[str, list[tuple[str, int]]] = {}

    def _module_attribute(self, name: str) -> Any:
        trainer = getattr(self, "trainer", None)
        return getattr(getattr(trainer, "lightning_module", None), name, None)

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            path = self.tokenizer_name_or_path or self._module_attribute("model_name_or_path")
            path = resolve_model_path(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path, **pretrained_kwargs(path))
        if self.max_length is None:
            self.max_length = self._module_attribute("max_length") or 64
        for split, path in self.files.items():
            if split not in self.datasets:
                self.datasets[split] = read_tsv(path)

    def collate(self, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*rows, strict=True)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )  # input_ids, attention_mask, ...: (B, T) with T = longest sentence in the batch
        return {**batch, "labels": torch.tensor(labels, dtype=torch.long)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
