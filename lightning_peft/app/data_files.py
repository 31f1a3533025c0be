"""Reading local data files (JSON Lines, JSON, CSV, TSV, plain text) into records, with errors that name the line.

Formats, chosen by the file extension:

* ``.jsonl``: one JSON object per line, e.g. ``{"text": "Great film.", "label": 1}``; blank lines are skipped.
* ``.json``: a JSON array of such objects, or JSON Lines.
* ``.csv``: a header row with the column names, then one row per record (standard CSV quoting, so texts may
  hold commas, quotes and newlines inside double quotes).
* ``.tsv``: a header row, then one tab-separated row per record, no quoting (texts may not hold tabs or
  newlines).
* ``.txt``: one record per line holding a single column (the default column, e.g. ``text`` or ``prompt``);
  for ``predict`` inputs.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".txt")

#: A record and where it came from: (line number, {column: value}).
Record = tuple[int, dict[str, Any]]


class DataFileError(ValueError):
    """A data file that cannot be used: malformed line, missing column, bad value. The message names the line."""


def read_records(
    path: str | Path, required: Sequence[str], *, text_column: str | None = None, role: str = "file"
) -> list[Record]:
    """Every record of a data file, each checked to have the ``required`` columns.

    Args:
        path: The file; its extension picks the format (see the module docstring).
        required: Columns every record must have (non-null).
        text_column: The column a ``.txt`` line fills; ``None`` refuses ``.txt`` files.
        role: How the file is called in error messages (e.g. ``"train_file"``).

    Returns:
        ``(line number, record)`` pairs in file order (for ``.json`` arrays: the element's position, from 1).

    Raises:
        FileNotFoundError: the file does not exist.
        DataFileError: unknown extension, malformed line, missing column or null value, empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{role} {str(path)!r} does not exist (or is not a file; cwd is {Path.cwd()})."
        )
    suffix = path.suffix.lower()
    if suffix not in FORMATS or (suffix == ".txt" and text_column is None):
        formats = [f for f in FORMATS if f != ".txt" or text_column is not None]
        raise DataFileError(f"{role} {path}: unknown format {suffix!r}; use one of {formats}.")
    with io.StringIO(_decode(path, role), newline="") as handle:
        if suffix in (".csv", ".tsv"):
            records = _read_table(
                path, handle, delimiter="," if suffix == ".csv" else "\t", required=required
            )
        elif suffix == ".txt":
            records = [
                (n, {text_column: line.rstrip("\r\n")}) for n, line in enumerate(handle, 1) if line.strip()
            ]
        else:
            records = _read_json(path, handle.read())
    if not records:
        raise DataFileError(f"{role} {path} holds no records.")
    for line, record in records:
        missing = [c for c in required if record.get(c) is None]
        if missing:
            what = "has no" if any(c not in record for c in missing) else "has null"
            raise DataFileError(
                f"{path}, line {line}: {what} {missing} (columns found: {sorted(record)}). Rename the columns "
                f"or set the data module's column arguments."
            )
        for column in required:
            value = record[column]
            if isinstance(value, str) and not value.strip():
                raise DataFileError(
                    f"{path}, line {line}: {column!r} is empty; an empty example teaches nothing (and an empty "
                    "label is no class). Remove the line or fill it in."
                )
    return records


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)  # fmt: skip  (UTF-32 LE before UTF-16 LE: its BOM starts with UTF-16 LE's)


def _decode(path: Path, role: str) -> str:
    """The file's text: UTF-8, or the UTF-8/16/32 its byte-order mark names; anything else is an error naming
    the line, the column and how to convert."""
    data = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line, column = _position(data, error.start)
        byte = data[error.start : error.start + 1].hex()
        raise DataFileError(
            f"{role} {path}, line {line}, column {column}: byte 0x{byte} is not {encoding} text. Convert the file to "
            f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}` (latin1/cp1252 for Western "
            "European text from Excel, utf-16 for files from Windows tools without a byte-order mark)."
        ) from None
    if "\x00" in text:
        line, column = _position(data, data.index(b"\x00"))
        raise DataFileError(
            f"{role} {path}, line {line}, column {column}: a NUL byte: the file is binary, or UTF-16 without a "
            f"byte-order mark. Save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 {path.name} > utf8_{path.name}`)."
        )
    return text


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a byte offset."""
    return data.count(b"\n", 0, offset) + 1, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def string_values(path: str | Path, line: int, record: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """The values of ``columns`` in the record read from ``path`` at ``line``, each checked to be a string.

    Raises:
        DataFileError: a value is not a string (e.g. a number in a JSON file); the message names the line.
    """
    for column in columns:
        if not isinstance(record[column], str):
            raise DataFileError(f"{path}, line {line}: {column!r} is {record[column]!r}, not a string.")
    return [record[column] for column in columns]


def _read_json(path: Path, content: str) -> list[Record]:
    if content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path}, line {error.lineno}: malformed JSON ({error.msg}).") from None
        numbered = list(enumerate(items, start=1))
    else:
        numbered = []
        for line, text in enumerate(content.splitlines(), start=1):
            if not text.strip():
                continue
            try:
                numbered.append((line, json.loads(text)))
            except json.JSONDecodeError as error:
                raise DataFileError(
                    f"{path}, line {line}: malformed JSON ({error.msg} at column {error.colno}): {text[:80]!r}"
                ) from None
    for line, item in numbered:
        if not isinstance(item, dict):
            raise DataFileError(f"{path}, line {line}: expected a JSON object, got {type(item).__name__}.")
    return numbered


def _read_table(path: Path, handle: Any, delimiter: str, required: Sequence[str]) -> list[Record]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting, strict=True)
    # csv refuses fields over 128 KiB by default; no field can be longer than the file (restored afterwards).
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(handle.getvalue()) + 1))
    try:
        header = reader.fieldnames
        absent = [c for c in required if c not in (header or [])]
        if absent:
            kind = "tab-separated" if delimiter == "\t" else "comma-separated"
            raise DataFileError(
                f"{path}, line 1: the header has no {absent} column (found {header}); the first line must name "
                f"the {kind} columns. Rename them or set the data module's column arguments."
            )
        records: list[Record] = []
        for row in reader:
            extra = row.pop(
                None, None
            )  # DictReader puts surplus fields under None and fills short rows with None
            if extra is not None or None in row.values():
                found = len(header) + len(extra or []) - sum(v is None for v in row.values())
                raise DataFileError(
                    f"{path}, line {reader.line_num}: expected {len(header)} fields ({header}), found {found}."
                )
            records.append((reader.line_num, row))
    except csv.Error as error:
        raise DataFileError(f"{path}, line {reader.line_num}: malformed row ({error}).") from None
    finally:
        csv.field_size_limit(limit)
    return records
