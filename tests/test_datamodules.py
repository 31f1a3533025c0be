"""Data files in every documented format, the seeded validation split, SFT masking, and errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_peft.app.data_files import DataFileError, read_records
from lightning_peft.app.datamodules import (
    IGNORE_INDEX,
    SFTDataModule,
    TextClassificationDataModule,
    embedded_sft_path,
    encode_example,
    encode_prompt,
)
from lightning_peft.app.tokenization import byte_level_tokenizer

ROWS = [("Loved every minute.", "positive"), ("Dull, slow, forgettable.", "negative"), ("A gem.", "positive")]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def classification_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "jsonl": write(
            tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n\n" for t, y in ROWS)
        ),
        "json": write(tmp_path / "d.json", json.dumps([{"text": t, "label": y} for t, y in ROWS], indent=2)),
        "csv": write(tmp_path / "d.csv", "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in ROWS)),
        "tsv": write(tmp_path / "d.tsv", "label\ttext\n" + "".join(f"{y}\t{t}\n" for t, y in ROWS)),
    }


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv"])
def test_every_format_reads_the_same_records(classification_files, kind):
    records = read_records(classification_files[kind], ["text", "label"])
    assert [(r["text"], r["label"]) for _, r in records] == ROWS  # the CSV comma inside quotes survives


def test_txt_holds_one_input_per_line(tmp_path):
    path = write(tmp_path / "p.txt", "first line\n\nsecond, with a comma\n")
    assert read_records(path, ["text"], text_column="text") == [
        (1, {"text": "first line"}),
        (3, {"text": "second, with a comma"}),
    ]
    with pytest.raises(DataFileError, match=r"unknown format '\.txt'"):
        read_records(path, ["text", "label"])  # a .txt has no labels: not for training


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "a.jsonl",
            '{"text": "a", "label": 0}\n\n{"text": "b" "label": 1}\n',
            r"a\.jsonl, line 3: malformed JSON",
        ),
        (
            "a.jsonl",
            '{"text": "a", "label": 0}\n["b", 1]\n',
            r"a\.jsonl, line 2: expected a JSON object, got list",
        ),
        ("a.jsonl", '{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n', r"line 2: has no \['text'\]"),
        ("a.jsonl", '{"text": "a", "label": null}\n', r"line 1: has null \['label'\]"),
        ("a.csv", "text,label\nfine,1\ntoo,many,fields\n", r"a\.csv, line 3: expected 2 fields .* found 3"),
        ("a.csv", "text,label\nfine,1\nshort\n", r"a\.csv, line 3: expected 2 fields .* found 1"),
        ("a.tsv", "text\tsentiment\nfine\t1\n", r"a\.tsv, line 1: the header has no \['label'\] column"),
        ("a.json", '[{"text": "a", "label": 0},\n {"text": }]', r"a\.json, line 2: malformed JSON"),
        ("a.jsonl", "\n\n", r"holds no records"),
        ("a.parquet", "x", r"unknown format '\.parquet'"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, content, message):
    with pytest.raises(DataFileError, match=message):
        read_records(write(tmp_path / name, content), ["text", "label"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "text,label\nfine,1\ncaf\u00e9,0\n".encode("latin-1"),
         r"a\.csv, line 3, column 4: byte 0xe9 is not utf-8 text.*iconv -f latin1"),
        ("a.jsonl", '{"text": "a", "label": 0}\n'.encode("utf-16-le"), r"a\.jsonl, line 1, column 2: a NUL byte.*UTF-16 without a byte-order mark"),
        ("a.jsonl", b'{"text": "a", "label": 0}\n{"text": "  ", "label": 1}\n', r"line 2: 'text' is empty"),
        ("a.csv", b"text,label\nfine,1\nnul\x00here,0\n", r"a\.csv, line 3, column 4: a NUL byte"),
    ],
    ids=["latin-1", "utf-16-without-bom", "empty-text", "nul-byte"],
)  # fmt: skip
def test_undecodable_empty_or_binary_texts_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        read_records(path, ["text", "label"])


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_files_with_a_byte_order_mark_are_read_in_its_encoding(tmp_path, encoding):
    path = tmp_path / "a.csv"
    path.write_bytes("text,label\ncaf\u00e9 cr\u00e8me,1\n".encode(encoding))
    assert read_records(path, ["text", "label"]) == [(2, {"text": "caf\u00e9 cr\u00e8me", "label": "1"})]


def test_a_csv_field_of_a_megabyte_is_read_whole(tmp_path):
    import csv

    limit = csv.field_size_limit()
    long_text = "word " * 200_000
    path = tmp_path / "a.csv"
    path.write_text(f'text,label\n"{long_text}",1\nshort,0\n')
    records = read_records(path, ["text", "label"])
    assert [len(r["text"]) for _, r in records] == [1_000_000, 5] and csv.field_size_limit() == limit


def test_missing_file_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"val_file '.*nope\.jsonl' does not exist"):
        read_records(tmp_path / "nope.jsonl", ["text"], role="val_file")


def test_labels_by_name_or_id_and_unknown_values_are_errors(classification_files, tmp_path):
    data = TextClassificationDataModule(
        train_file=str(classification_files["csv"]), label_names=["negative", "positive"]
    )
    data.setup("fit")
    assert sorted(data.datasets["train"] + data.datasets["validation"]) == sorted(
        (t, int(y == "positive")) for t, y in ROWS
    )
    ids = write(
        tmp_path / "ids.jsonl",
        '{"text": "x", "label": 1}\n{"text": "y", "label": "0"}\n{"text": "z", "label": 2}\n',
    )
    data = TextClassificationDataModule(
        train_file=str(ids), val_file=str(ids), label_names=["negative", "positive"]
    )
    with pytest.raises(
        DataFileError,
        match=r"ids\.jsonl, line 3: unknown label 2 in 'label'; expected one of \['negative', 'positive'\]",
    ):
        data.setup("fit")
    data = TextClassificationDataModule(train_file=str(classification_files["tsv"]), val_file=str(ids))
    with pytest.raises(DataFileError, match=r"d\.tsv, line 2: unknown label 'positive'.*set label_names"):
        data.setup("fit")


def test_custom_columns_and_predict_file_without_labels(tmp_path):
    train = write(tmp_path / "t.csv", "review,stars\nGreat.,1\nBad.,0\nOkay.,1\nAwful.,0\n")
    todo = write(tmp_path / "todo.txt", "Is this good?\nOr bad?\n")
    data = TextClassificationDataModule(
        train_file=str(train),
        predict_file=str(todo),
        text_column="review",
        label_column="stars",
        batch_size=8,
    )
    data.setup("fit")
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["text"] == ["Is this good?", "Or bad?"] and batch["input_ids"].shape[0] == 2
    assert len(data.datasets["train"]) + len(data.datasets["validation"]) == 4


def test_validation_split_is_seeded_disjoint_and_complete():
    def split(seed: int) -> tuple[list, list]:
        data = SFTDataModule(tokenizer_name_or_path="byte-level", split_seed=seed, val_fraction=0.25)
        data.setup("fit")
        decode = data.tokenizer.decode
        return [decode(e["input_ids"]) for e in data.datasets["train"]], [
            decode(e["input_ids"]) for e in data.datasets["validation"]
        ]

    train, val = split(42)
    assert (len(train), len(val)) == (36, 12)  # 25 % of the 48 shipped pairs
    assert not set(train) & set(val)
    assert split(42) == (train, val)
    assert split(7)[1] != val


def test_sft_labels_are_minus_100_exactly_on_the_prompt():
    tokenizer = byte_level_tokenizer()
    prompt, response = "Spell 'cat' backwards.", "tac"
    # plain format: BOS + prompt bytes, then response bytes + EOS
    input_ids, labels = encode_example(tokenizer, prompt, response, use_chat_template=False)
    prompt_len = 1 + len(prompt.encode())
    assert input_ids == [tokenizer.bos_token_id, *prompt.encode(), *response.encode(), tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * prompt_len + [*response.encode(), tokenizer.eos_token_id]
    # chat template: everything up to and including the generation prompt is masked
    tokenizer.chat_template = TEMPLATE
    input_ids, labels = encode_example(tokenizer, prompt, response)
    prompt_text = f"<|user|>\n{prompt}\n<|assistant|>\n"
    assert input_ids == [
        tokenizer.bos_token_id,
        *prompt_text.encode(),
        *response.encode(),
        tokenizer.eos_token_id,
    ]
    masked = labels.count(IGNORE_INDEX)
    assert masked == 1 + len(prompt_text.encode()) and labels[:masked] == [IGNORE_INDEX] * masked
    assert labels[masked:] == input_ids[masked:]
    assert encode_prompt(tokenizer, prompt) == input_ids[:masked]  # predict feeds exactly the masked part


def test_sft_batches_pad_right_for_training_and_left_for_generation(tmp_path):
    path = write(
        tmp_path / "p.jsonl",
        '{"prompt": "Hi", "response": "Hello there"}\n{"prompt": "A longer prompt", "response": "ok"}\n',
    )
    data = SFTDataModule(
        train_file=str(path), val_file=str(path), tokenizer_name_or_path="byte-level", batch_size=2
    )
    data.setup("fit")
    data.setup("predict")
    pad = data.tokenizer.pad_token_id
    batch = next(iter(data.val_dataloader()))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [1 + 2 + 11 + 1, 1 + 15 + 2 + 1]
    short = batch["input_ids"][0]
    assert (short[lengths[0] :] == pad).all() and (batch["labels"][0, lengths[0] :] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == (11 + 1) + (2 + 1)  # response bytes + EOS each
    generation = next(iter(data.predict_dataloader()))
    assert generation["prompt"] == ["Hi", "A longer prompt"]
    assert generation["input_ids"][0, :13].eq(pad).all() and generation["attention_mask"][0].sum() == 3
    assert generation["input_ids"][:, -1].tolist() == [
        ord("i"),
        ord("t"),
    ]  # every prompt ends at the last column


def test_sft_drops_pairs_whose_prompt_fills_max_length(tmp_path):
    path = write(
        tmp_path / "p.jsonl",
        '{"prompt": "short", "response": "yes"}\n{"prompt": "' + "x" * 40 + '", "response": "no"}\n',
    )
    data = SFTDataModule(
        train_file=str(path), val_file=str(path), tokenizer_name_or_path="byte-level", max_length=20
    )
    with pytest.warns(UserWarning, match=r"1 pairs \(lines \[2\]"):
        data.setup("validate")
    (example,) = data.datasets["validation"]
    assert len(example["input_ids"]) == 1 + 5 + 3 + 1


def test_embedded_sft_sample_is_well_formed():
    records = read_records(embedded_sft_path(), ["prompt", "response"])
    assert len(records) == 48
    assert len({r["prompt"] for _, r in records}) == 48
    assert torch.tensor([len(r["prompt"]) + len(r["response"]) for _, r in records]).max() < 128


@pytest.mark.parametrize(
    ("module", "content", "message"),
    [
        (TextClassificationDataModule, '{"text": "a", "label": 0}\n{"text": 7, "label": 1}\n', "'text' is 7"),
        (
            SFTDataModule,
            '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 2}\n',
            "'response' is 2",
        ),
        (
            SFTDataModule,
            '{"prompt": "a", "response": "b"}\n{"prompt": [1], "response": 2}\n',
            r"'prompt' is \[1\]",
        ),
    ],
)
def test_non_string_inputs_name_the_file_line_and_column(tmp_path, module, content, message):
    path = write(tmp_path / "d.jsonl", content)
    data = module(train_file=str(path), val_file=str(path), tokenizer_name_or_path="byte-level")
    with pytest.raises(DataFileError, match=rf"d\.jsonl, line 2: {message}, not a string\.$"):
        data.setup("validate")


def test_predict_needs_only_the_input_column_and_reads_txt(tmp_path):
    todo = write(tmp_path / "todo.txt", "Say hi.\n\nCount to 3.\n")
    data = SFTDataModule(predict_file=str(todo), tokenizer_name_or_path="byte-level")
    assert (data.required_columns("fit"), data.required_columns("predict")) == (
        ["prompt", "response"],
        ["prompt"],
    )
    data.setup("predict")
    assert [e["prompt"] for e in data.datasets["predict"]] == ["Say hi.", "Count to 3."]
    data = SFTDataModule(train_file=str(todo), tokenizer_name_or_path="byte-level")
    with pytest.raises(DataFileError, match=r"train_file .*todo\.txt: unknown format '\.txt'"):
        data.setup("fit")
