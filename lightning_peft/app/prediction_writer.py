"""PredictionWriter: stream what ``predict_step`` returns to a file, one row per input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Write predictions as rows: ``predict_step`` returns a list of dicts, one per input, e.g.
    ``{"text": ..., "label": "positive", "probability": 0.97}`` (:class:`~lightning_peft.app.tasks.SequenceClassificationModule`)
    or ``{"prompt": ..., "response": ...}`` (:class:`~lightning_peft.app.tasks.CausalLMModule`).

    The file's extension picks the format: ``.jsonl`` (one JSON object per line), ``.tsv`` or ``.csv``
    (a header row from the first row's keys). Rows are written as batches finish, in the order of the
    predict dataloader. Under DDP each process writes its own share to ``<name>.rank<N><ext>``. A
    ``predict_step`` that returns anything else (e.g. tensors) is kept and saved with ``torch.save`` to
    ``<name>.pt`` when predict ends. ``lightning-peft predict`` adds one of these writing to
    ``<log_dir>/predictions.jsonl`` unless the config has its own writer.

    Example::

        trainer = L.Trainer(callbacks=[PEFTCallback(lora, target="model"), PredictionWriter("labels.tsv")])
        trainer.predict(module, datamodule, ckpt_path="best.ckpt", return_predictions=False)

    Args:
        output_path: The file to write; ``None``: ``predictions.jsonl`` in the trainer's log directory.
    """

    FORMATS = (".jsonl", ".tsv", ".csv")

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if output_path is not None and Path(output_path).suffix.lower() not in self.FORMATS:
            raise ValueError(f"PredictionWriter output_path {output_path!r}: use one of {self.FORMATS}.")
        self.output_path = output_path
        self.path: Path | None = None
        self._handle: TextIO | None = None
        self._table: Any = None
        self._other: list[Any] = []
        self.rows_written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        log_dir = trainer.log_dir  # collective under DDP: every rank calls it
        path = (
            Path(self.output_path)
            if self.output_path
            else Path(log_dir or trainer.default_root_dir) / "predictions.jsonl"
        )
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        self.path = path

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Open across hooks (rows are streamed batch by batch); closed in on_predict_epoch_end.
        self._handle = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._table, self._other, self.rows_written = None, [], 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not (isinstance(prediction, list) and all(isinstance(row, dict) for row in prediction)):
            self._other.append(prediction)
            return
        assert self._handle is not None
        for row in prediction:
            self._write(row)
        self.rows_written += len(prediction)
        self._handle.flush()

    def _write(self, row: dict[str, Any]) -> None:
        suffix = self.path.suffix.lower()
        if suffix not in (".tsv", ".csv"):
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        if self._table is None:
            self._table = csv.DictWriter(
                self._handle, fieldnames=list(row), delimiter="\t" if suffix == ".tsv" else ","
            )
            self._table.writeheader()
        self._table.writerow(row)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._other:
            other = self.path.with_suffix(".pt")
            torch.save(self._other, other)
            rank_zero_info(
                f"lightning-peft: predictions ({len(self._other)} batches, not rows) saved to {other}"
            )
        if self.rows_written:
            rank_zero_info(f"lightning-peft: {self.rows_written} predictions written to {self.path}")
        else:
            self.path.unlink(missing_ok=True)
