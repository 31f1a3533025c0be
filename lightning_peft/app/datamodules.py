"""Data modules for the ``lightning-peft`` command line: local files in, tokenized batches out.

Two tasks, one file layout (formats in :mod:`lightning_peft.app.data_files`: ``.jsonl``, ``.json``, ``.csv``,
``.tsv``, and ``.txt`` for predict inputs):

* :class:`TextClassificationDataModule`: a ``text`` and a ``label`` column. Labels are class ids
  (``0 .. num_labels-1``) or, when the model has ``label_names``, those names.
* :class:`SFTDataModule`: a ``prompt`` and a ``response`` column (predict needs only ``prompt``), for a causal LM;
  :class:`Seq2SeqDataModule`: the same files for an encoder-decoder (prompt -> encoder, response -> labels).

When no ``val_file`` is given, a seeded ``val_fraction`` of the training file becomes the validation split.
Files are read and checked in ``setup``, before the model is built and before any training step: a missing
file, a malformed line, an absent column or an unknown label value stops the run with the file and line.

Embedded data (so the quickstart runs offline):

* ``lightning_peft/app/data/sentiment_{train,validation,test}.tsv``: 308 short English sentences (reviews of
  food, films, books, products, travel and services) written for this project and labelled 1 (positive)
  or 0 (negative); each split is balanced.
* ``lightning_peft/app/data/sft_sample.jsonl``: 48 prompt/response pairs written for this project (short
  instructions: arithmetic, rewriting, lists, facts) for the SFT and seq2seq example configs.
"""

from __future__ import annotations

import random
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_peft.app.data_files import DataFileError, Record, read_records, string_values
from lightning_peft.app.tasks import resolve_model_path
from lightning_peft.app.tokenization import load_tokenizer

SPLITS = ("train", "validation", "test")
#: Label of positions that the loss ignores (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100
_STAGE_SPLITS = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("predict",),
}


def embedded_split_path(split: str) -> Path:
    """Path of one split of the embedded sentiment data set (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the embedded data set has {SPLITS}.")
    return Path(str(files("lightning_peft.app") / "data" / f"sentiment_{split}.tsv"))


def embedded_sft_path() -> Path:
    """Path of the embedded prompt/response sample (JSON Lines)."""
    return Path(str(files("lightning_peft.app") / "data" / "sft_sample.jsonl"))


class FileDataModule(LightningDataModule):
    """Shared mechanics: which file serves which split, the seeded validation split, tokenizer, loaders.

    Subclasses name their two columns (:meth:`columns`), turn a file's records into examples (:meth:`examples`)
    and batch them (:meth:`collate`).
    """

    default_max_length = 512

    def __init__(
        self,
        train_file: str | None,
        val_file: str | None,
        test_file: str | None,
        predict_file: str | None,
        val_fraction: float,
        split_seed: int,
        tokenizer_name_or_path: str | None,
        max_length: int | None,
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1).")
        self.files: dict[str, Path | None] = {
            "train": Path(train_file) if train_file else None,
            "validation": Path(val_file) if val_file else None,  # None: split off the training file
            "test": Path(test_file) if test_file else None,
            "predict": Path(predict_file) if predict_file else None,
        }
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.datasets: dict[str, list[Any]] = {}

    # --- what subclasses provide ------------------------------------------------------------------------------
    def columns(self) -> tuple[str, str]:
        """``(input, target)`` column names, e.g. text and label."""
        raise NotImplementedError

    def examples(self, records: list[Record], path: Path, split: str) -> list[Any]:
        raise NotImplementedError

    def collate(self, examples: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        """Both columns; ``predict`` needs only the input (and reads ``.txt`` files, a line per input)."""
        input_column, target_column = self.columns()
        return [input_column] if split == "predict" else [input_column, target_column]

    def module_attribute(self, name: str) -> Any:
        """An attribute of the LightningModule being trained (``None`` when there is none yet)."""
        return getattr(getattr(self.trainer, "lightning_module", None), name, None)

    def load_tokenizer(self) -> Any:
        if self.tokenizer_name_or_path is not None:
            return load_tokenizer(self.tokenizer_name_or_path)
        # The model's own tokenizer, so the two cannot disagree.
        module = getattr(self.trainer, "lightning_module", None)
        if module is not None and hasattr(type(module), "tokenizer"):
            return module.tokenizer
        return self.default_tokenizer()

    def default_tokenizer(self) -> Any:
        raise ValueError(
            f"{type(self).__name__} has no tokenizer: set tokenizer_name_or_path (a folder, a hub name, or "
            "'byte-level'), or train a LightningModule with a `tokenizer` attribute."
        )

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
        if self.max_length is None:
            self.max_length = self.module_attribute("max_length") or self.default_max_length
        for split in _STAGE_SPLITS.get(stage, ()):
            if split not in self.datasets:
                path, records = self.records(split)
                self.datasets[split] = self.examples(records, path, split)

    def records(self, split: str) -> tuple[Path, list[Record]]:
        """``(file, records)`` of a split: its own file, the seeded share of ``train_file`` for a validation
        split without ``val_file``, and for ``predict`` without ``predict_file`` the test, else validation split.

        Raises:
            ValueError: no file serves this split.
        """
        files = self.files
        if split == "predict" and files["predict"] is None:
            return self.records("test" if files["test"] is not None else "validation")
        split_off = split in ("train", "validation") and files["validation"] is None
        path = files["train"] if split_off else files[split]
        if path is None:
            raise ValueError(f"{type(self).__name__}: no file for the {split!r} split; set {split}_file.")
        role = "train_file" if split_off else {"validation": "val_file"}.get(split, f"{split}_file")
        line_column = self.columns()[0] if split == "predict" else None
        records = read_records(path, self.required_columns(split), text_column=line_column, role=role)
        if not split_off:
            return path, records
        # One file, two splits: a seeded shuffle, so every process and every run agrees on the partition.
        if len(records) < 2:
            raise DataFileError(
                f"{path}: {len(records)} record; need at least 2 to split off a validation set."
            )
        order = list(range(len(records)))
        random.Random(self.split_seed).shuffle(order)
        n_val = min(len(records) - 1, max(1, round(self.val_fraction * len(records))))
        chosen = order[:n_val] if split == "validation" else order[n_val:]
        return path, [records[i] for i in sorted(chosen)]

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
        return self._loader("predict", shuffle=False)


class TextClassificationDataModule(FileDataModule):
    """Labelled texts, tokenized per batch (padded to the longest text of the batch, truncated to ``max_length``).

    With no files at all it serves the embedded sentiment data set (train, validation and test splits).
    ``predict`` reads ``predict_file`` (labels optional; ``.txt``: one text per line), else the test split,
    else the validation split.

    Args:
        train_file: ``.jsonl``/``.json``/``.csv``/``.tsv`` with a text and a label column; ``None`` uses the
            embedded sentiment data (and its validation/test splits when those files are ``None`` too).
        val_file: Same format; ``None`` splits ``val_fraction`` off ``train_file``.
        test_file: Same format, for ``test`` (and ``predict`` without ``predict_file``).
        predict_file: Texts to label; the label column is not needed.
        text_column: Name of the text column.
        label_column: Name of the label column.
        label_names: Class names (index = class id) that labels may be given as; ``None`` takes the model's
            ``label_names``. Any other label value is an error.
        val_fraction: Share of ``train_file`` held out for validation when there is no ``val_file``.
        split_seed: Seed of that split.
        tokenizer_name_or_path: Tokenizer folder or hub name; ``None`` takes the LightningModule's tokenizer
            (so model and tokenizer cannot disagree), else the embedded all-MiniLM-L6-v2's.
        max_length: Truncate inputs to this many tokens; ``None`` takes the LightningModule's ``max_length``,
            else 64.
        batch_size: Texts per batch.
        num_workers: DataLoader worker processes.
    """

    default_max_length = 64

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        tokenizer_name_or_path: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        if train_file is None:  # the embedded data set, split by split unless a file is given
            val_file = val_file or str(embedded_split_path("validation"))
            test_file = test_file or str(embedded_split_path("test"))
        super().__init__(
            train_file or str(embedded_split_path("train")), val_file, test_file, predict_file, val_fraction,
            split_seed, tokenizer_name_or_path, max_length, batch_size, num_workers,
        )  # fmt: skip
        self.text_column = text_column
        self.label_column = label_column
        self.label_names = label_names

    def default_tokenizer(self) -> Any:
        return load_tokenizer(resolve_model_path(None))

    def columns(self) -> tuple[str, str]:
        return self.text_column, self.label_column

    def examples(self, records: list[Record], path: Path, split: str) -> list[tuple[str, int]]:
        names = self.label_names if self.label_names is not None else self.module_attribute("label_names")
        num_labels = len(names) if names else self.module_attribute("num_labels")
        rows = []
        for line, record in records:
            (text,) = string_values(path, line, record, [self.text_column])
            if split == "predict":
                rows.append((text, -1))
                continue
            rows.append(
                (text, self._label_id(record[self.label_column], names, num_labels, f"{path}, line {line}"))
            )
        return rows

    def _label_id(self, value: Any, names: list[str] | None, num_labels: int | None, where: str) -> int:
        if names and isinstance(value, str) and value in names:
            return names.index(value)
        allowed = (
            f"one of {names} (or their ids 0..{len(names) - 1})" if names
            else f"a class id 0..{num_labels - 1}" if num_labels else "a class id (an integer >= 0)"
        )  # fmt: skip
        label_id = None
        if isinstance(value, int) and not isinstance(value, bool):
            label_id = value
        elif isinstance(value, str) and value.strip().isdigit():
            label_id = int(value)
        if label_id is None or label_id < 0 or (num_labels is not None and label_id >= num_labels):
            hint = (
                ""
                if names
                else " To use names as labels, set label_names (e.g. model.init_args.label_names)."
            )
            raise DataFileError(
                f"{where}: unknown label {value!r} in {self.label_column!r}; expected {allowed}.{hint}"
            )
        return label_id

    def collate(self, rows: list[tuple[str, int]]) -> dict[str, Any]:
        texts, labels = zip(*rows, strict=True)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )  # input_ids, attention_mask, ...: (B, T) with T = longest text in the batch
        return {**batch, "labels": torch.tensor(labels, dtype=torch.long), "text": list(texts)}


def encode_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    With a chat template (and ``use_chat_template``): the template applied to one user message with the
    generation prompt (e.g. ``<|assistant|>``) added. Without: the tokenizer's BOS (if it has one) followed
    by the prompt exactly as written.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = _chat_prompt(tokenizer, prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


def encode_example(
    tokenizer: Any, prompt: str, response: str, use_chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one prompt/response pair, labels -100 on every prompt token.

    With a chat template, the response part is what the template renders after the generation prompt
    (the response and the template's end-of-turn marker); without, the response and the EOS token.

    Raises:
        ValueError: the chat template renders the conversation with another beginning than the prompt alone,
            so the prompt tokens cannot be told apart.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        prompt_text = _chat_prompt(tokenizer, prompt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "The chat template renders prompt + response with another beginning than the prompt with "
                f"add_generation_prompt=True ({prompt_text[-40:]!r} vs {full_text[: len(prompt_text)][-40:]!r}); "
                "set use_chat_template: false or give a chat_template whose generation prompt is a prefix."
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = encode_prompt(tokenizer, prompt, use_chat_template=False)
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]  # the model learns to stop
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SFTDataModule(FileDataModule):
    """Prompt/response pairs for supervised fine-tuning of a causal LM (:class:`~lightning_peft.app.tasks.CausalLMModule`).

    Each pair becomes ``input_ids = prompt + response`` and ``labels`` = the same ids with -100 on the prompt
    (and on padding), so the loss covers the response only (see :func:`encode_example`). The prompt is
    formatted with the tokenizer's chat template when it has one (or ``chat_template`` is given) and
    ``use_chat_template`` is true; otherwise BOS + prompt + response + EOS, concatenated as written (end
    your prompts with the separator you want, e.g. a newline). Pairs are truncated to ``max_length`` tokens
    (from the right); a pair whose prompt alone fills ``max_length`` is dropped with a warning. Training
    batches are right-padded; ``predict`` batches hold the prompts only, left-padded for generation.

    With ``packing``, the train, validation and test pairs are packed into rows instead (padding-free SFT, see
    :func:`pack_examples`): greedily and in file order, as many whole pairs per row as fit in ``max_length``
    tokens. A row's ``position_ids`` restart at 0 with every pair, its batch has no ``attention_mask`` (so
    transformers' packed-sequence path keeps each pair's attention to itself) and the first label of every
    pair is -100 (no token predicts across a boundary). A packed batch then gives the same loss as the same
    pairs padded: the mean cross-entropy over every kept (response) token of the batch.
    :class:`~lightning_peft.app.tasks.CausalLMModule` checks at fit start that its model really isolates packed
    pairs and refuses soft-prompt methods. ``predict`` is never packed.

    Args:
        train_file: ``.jsonl``/``.json``/``.csv``/``.tsv`` with a prompt and a response column; ``None`` uses the
            embedded 48-pair sample (``lightning_peft/app/data/sft_sample.jsonl``).
        val_file: Same format; ``None`` splits ``val_fraction`` off ``train_file``.
        test_file: Same format, for ``test``.
        predict_file: Prompts to answer (``.txt``: one prompt per line); ``None`` uses the test split, else the
            validation split.
        prompt_column: Name of the prompt column.
        response_column: Name of the response column.
        use_chat_template: Format with the chat template when the tokenizer has one.
        chat_template: A Jinja chat template to set on the tokenizer (for tokenizers without one, such as
            the built-in byte-level tokenizer).
        val_fraction: Share of ``train_file`` held out for validation when there is no ``val_file``.
        split_seed: Seed of that split.
        tokenizer_name_or_path: Tokenizer folder, hub name or ``"byte-level"``; ``None`` takes the
            LightningModule's tokenizer.
        max_length: Longest sequence in tokens (with ``packing``: longest row); ``None`` takes the LightningModule's
            ``max_length``, else 512.
        batch_size: Pairs per batch (with ``packing``: rows per batch, each holding up to ``max_length`` tokens).
        num_workers: DataLoader worker processes.
        packing: Pack the train/validation/test pairs into rows of up to ``max_length`` tokens (no padding
            inside a row); for :class:`~lightning_peft.app.tasks.CausalLMModule` only.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        use_chat_template: bool = True,
        chat_template: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        tokenizer_name_or_path: str | None = None,
        max_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        packing: bool = False,
    ) -> None:
        super().__init__(
            train_file or str(embedded_sft_path()), val_file, test_file, predict_file, val_fraction, split_seed,
            tokenizer_name_or_path, max_length, batch_size, num_workers,
        )  # fmt: skip
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.use_chat_template = use_chat_template
        self.chat_template = chat_template
        self.packing = packing

    def load_tokenizer(self) -> Any:
        tokenizer = super().load_tokenizer()
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token to pad batches with; give it a pad_token."
            )
        return tokenizer

    def columns(self) -> tuple[str, str]:
        return self.prompt_column, self.response_column

    def examples(self, records: list[Record], path: Path, split: str) -> list[dict[str, Any]]:
        examples, dropped = [], []
        for line, record in records:
            fields = string_values(path, line, record, self.required_columns(split))
            if split == "predict":
                ids = encode_prompt(self.tokenizer, fields[0], self.use_chat_template)
                # Keep the end of an over-long prompt: it holds the question and the generation prompt.
                examples.append({"prompt": fields[0], "input_ids": ids[-self.max_length :]})
                continue
            input_ids, labels = encode_example(self.tokenizer, *fields, self.use_chat_template)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                dropped.append(line)
                continue
            examples.append({"input_ids": input_ids, "labels": labels})
        if dropped:
            rank_zero_warn(
                f"{path}: {len(dropped)} pairs (lines {dropped[:5]}...) have prompts of max_length={self.max_length} "
                "tokens or more, leaving no response token to learn from; they were dropped. Raise max_length."
            )
        if not examples:
            raise DataFileError(f"{path}: no usable pair for the {split!r} split (see the warning above).")
        if self.packing and split != "predict":
            return pack_examples(examples, self.max_length)
        return examples

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        if "position_ids" in examples[0]:  # packed rows (see pack_examples)
            return collate_packed(examples, self._pad_id())
        if "labels" not in examples[0]:  # predict: left padding, so every prompt ends where generation starts
            return {
                "input_ids": pad_sequences(ids, self._pad_id(), left=True),  # (B, T)
                "attention_mask": pad_sequences([[1] * len(i) for i in ids], 0, left=True),  # (B, T)
                "prompt": [e["prompt"] for e in examples],
            }
        return {
            "input_ids": pad_sequences(ids, self._pad_id()),  # (B, T)
            "attention_mask": pad_sequences([[1] * len(i) for i in ids], 0),  # (B, T)
            "labels": pad_sequences(
                [e["labels"] for e in examples], IGNORE_INDEX
            ),  # (B, T), -100 on prompt, padding
        }


def pack_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Rows of whole examples, packed greedily in order: an example joins the current row while the row stays
    within ``max_length`` tokens, else it starts the next row (an example is never split; each is at most
    ``max_length`` tokens already, truncated by the data module).

    Each row holds the examples' ``input_ids`` one after the other, ``position_ids`` that restart at 0 with every
    example (what tells transformers where one ends and the next begins), and their ``labels`` with the first
    label of every example set to -100: the last token of one example must not learn to predict the first token
    of the next. (That label never counts unpacked either: token ``t`` predicts label ``t + 1``.)

    Args:
        examples: ``{"input_ids", "labels"}`` lists of equal length, -100 where no loss is taken.
        max_length: Most tokens per row.

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` lists per row, and ``"num_examples"``, the examples it holds.
    """
    rows: list[dict[str, Any]] = []
    for example in examples:
        length = len(example["input_ids"])
        if length > max_length:
            raise ValueError(
                f"An example of {length} tokens does not fit in a packed row of max_length={max_length}; truncate "
                "examples to max_length before packing."
            )
        if not rows or len(rows[-1]["input_ids"]) + length > max_length:
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "num_examples": 0})
        row = rows[-1]
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
        row["position_ids"] += list(range(length))
        row["num_examples"] += 1
    return rows


def collate_packed(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A batch of packed rows (:func:`pack_examples`), right-padded to the longest row.

    The padding is one more segment of the row (its ``position_ids`` restart at 0, its labels are -100), so no
    example attends to it or is attended by it, and it adds nothing to the loss. There is no ``attention_mask``:
    with one, transformers would not look at the ``position_ids`` for the example boundaries.
    """
    width = max(len(row["input_ids"]) for row in rows)
    positions = [row["position_ids"] + list(range(width - len(row["position_ids"]))) for row in rows]
    return {
        "input_ids": pad_sequences([row["input_ids"] for row in rows], pad_id),  # (B, T)
        "position_ids": torch.tensor(positions),  # (B, T), 0 at the start of every example and of the padding
        "labels": pad_sequences([row["labels"] for row in rows], IGNORE_INDEX),  # (B, T)
        "num_examples": sum(row["num_examples"] for row in rows),
        # The tokens the loss is the mean over (its weight in the epoch's mean), counted here, off the device.
        "num_loss_tokens": sum(label != IGNORE_INDEX for row in rows for label in row["labels"]),
    }


def pad_sequences(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``(B, T)`` tensor of the sequences padded with ``value`` to the longest (``T``), on the right or the left."""
    width = max(len(s) for s in sequences)
    return torch.tensor(
        [[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in sequences]
    )


def encode_seq2seq_example(
    tokenizer: Any, prompt: str, response: str | None, max_length: int
) -> tuple[list[int], list[int] | None]:
    """``(input_ids, labels)`` of one pair for an encoder-decoder: the prompt with the tokenizer's own special
    tokens (T5: ``... </s>``, BART: ``<s> ... </s>``, byte-level: none) as the encoder's input, and the response's
    ids ending with EOS (so the model learns to stop) as labels, each truncated to ``max_length`` tokens (from the
    right, EOS kept). ``response=None`` (predict): labels ``None``.
    """
    input_ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
    if response is None:
        return input_ids, None
    labels = tokenizer(response, truncation=True, max_length=max_length)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and labels[-1:] != [eos]:
        labels = [*labels[: max_length - 1], eos]
    return input_ids, labels


class Seq2SeqDataModule(SFTDataModule):
    """Prompt/response pairs for an encoder-decoder (:class:`~lightning_peft.app.tasks.Seq2SeqLMModule`): the
    files, columns, splits and embedded sample of :class:`SFTDataModule`, encoded as seq2seq examples.

    The prompt becomes the encoder's ``input_ids`` (with the tokenizer's own special tokens, no chat template)
    and the response the ``labels`` (its ids and EOS), each truncated to ``max_length`` tokens (see
    :func:`encode_seq2seq_example`). Batches are right-padded: ``input_ids`` with the pad token (masked by
    ``attention_mask``), ``labels`` with -100, so the loss covers every response token and no padding.
    ``predict`` batches hold the prompts only.

    Args:
        train_file: ``.jsonl``/``.json``/``.csv``/``.tsv`` with a prompt and a response column; ``None`` uses the
            embedded 48-pair sample (``lightning_peft/app/data/sft_sample.jsonl``).
        val_file: Same format; ``None`` splits ``val_fraction`` off ``train_file``.
        test_file: Same format, for ``test``.
        predict_file: Prompts to answer (``.txt``: one prompt per line); ``None`` uses the test split, else the
            validation split.
        prompt_column: Name of the prompt column.
        response_column: Name of the response column.
        val_fraction: Share of ``train_file`` held out for validation when there is no ``val_file``.
        split_seed: Seed of that split.
        tokenizer_name_or_path: Tokenizer folder, hub name or ``"byte-level"``; ``None`` takes the
            LightningModule's tokenizer.
        max_length: Longest prompt and longest response in tokens (each); ``None`` takes the LightningModule's
            ``max_length``, else 512.
        batch_size: Pairs per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        val_fraction: float = 0.1,
        split_seed: int = 42,
        tokenizer_name_or_path: str | None = None,
        max_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            train_file, val_file, test_file, predict_file, prompt_column, response_column, False, None,
            val_fraction, split_seed, tokenizer_name_or_path, max_length, batch_size, num_workers,
        )  # fmt: skip

    def examples(self, records: list[Record], path: Path, split: str) -> list[dict[str, Any]]:
        examples = []
        for line, record in records:
            prompt, *response = string_values(path, line, record, self.required_columns(split))
            input_ids, labels = encode_seq2seq_example(
                self.tokenizer, prompt, response[0] if response else None, self.max_length
            )
            if labels is None:
                examples.append({"prompt": prompt, "input_ids": input_ids})
            elif not labels:
                raise DataFileError(
                    f"{path}, line {line}: the response has no tokens and the tokenizer no EOS token to learn to "
                    "stop from; give a non-empty response or a tokenizer with an eos_token."
                )
            else:
                examples.append({"input_ids": input_ids, "labels": labels})
        if not examples:
            raise DataFileError(f"{path}: no pair for the {split!r} split.")
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad_sequences(ids, self._pad_id()),  # (B, T): the prompts, the encoder's input
            "attention_mask": pad_sequences([[1] * len(i) for i in ids], 0),  # (B, T)
        }
        if "labels" in examples[0]:
            batch["labels"] = pad_sequences(
                [e["labels"] for e in examples], IGNORE_INDEX
            )  # (B, L), -100: padding
        else:  # predict
            batch["prompt"] = [e["prompt"] for e in examples]
        return batch
