"""Readers for the on-disk dataset formats (Alpaca, GSM8K), with strict validation.

A dataset file holds records of one *format* in one *container*:

| Container | Extension | Position named in errors |
|---|---|---|
| JSON array of objects (`alpaca_data.json`) | `.json` | `index N` (0-based) |
| JSON lines (GSM8K's `test.jsonl`) | `.jsonl`, `.ndjson` | `line N` (1-based, blanks skipped) |
| Parquet (hub exports) | `.parquet`, `.pq` | `row N` (0-based) |

Fields: Alpaca records need string `instruction` and `output`; `input` is optional (a
missing or null `input` reads as empty), any other column (the hubs' `text`) is ignored.
GSM8K records need string `question` and `answer`, and the answer must end with
`#### <number>`.  Every problem raises :class:`~llmenergy.errors.DatasetError` with one
line naming the file, the position and the field, e.g.
``data/gsm8k.jsonl: line 17: missing field 'answer'``.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmenergy.errors import DatasetError

log = logging.getLogger(__name__)

Format = Literal["alpaca", "gsm8k"]
FORMATS: tuple[str, ...] = ("alpaca", "gsm8k")
Container = Literal["json", "jsonl", "parquet"]

_EXTENSIONS: dict[str, Container] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
}
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {"alpaca": ("input",), "gsm8k": ()}

# GSM8K answers end with a line "#### 72"; tolerate commas, a sign, a decimal part, "$".
_FINAL_RE = re.compile(r"####\s*\$?\s*(-?\$?\s*[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")


@dataclass(frozen=True)
class AlpacaRecord:
    index: int
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Gsm8kRecord:
    index: int
    question: str
    answer: str  # full solution text, reasoning lines then "#### <number>"
    final: str  # the number after "####", commas and "$" removed


Record = AlpacaRecord | Gsm8kRecord


def container_of(path: Path) -> Container:
    """The container type of ``path`` from its extension."""
    try:
        return _EXTENSIONS[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(_EXTENSIONS))
        raise DatasetError(
            f"{path}: unsupported extension {path.suffix or '(none)'!r}; use one of {known}"
        ) from None


def final_answer(answer: str) -> str | None:
    """The number after the trailing ``####`` of a GSM8K answer, normalised, or None."""
    match = _FINAL_RE.search(answer)
    if match is None:
        return None
    return match.group(1).replace(",", "").replace("$", "").replace(" ", "")


def _field(obj: dict[str, Any], name: str, where: str, *, required: bool) -> str:
    if name not in obj:
        if required:
            raise DatasetError(f"{where}: missing field {name!r}")
        return ""
    value = obj[name]
    if value is None:
        if required:
            raise DatasetError(f"{where}: field {name!r} is null")
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: field {name!r} must be a string, got {type(value).__name__}"
        )
    return value


def make_record(fmt: str, obj: Any, index: int, where: str) -> Record:
    """Validate one raw object and turn it into a record; ``where`` prefixes errors."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected an object, got {type(obj).__name__}")
    if fmt == "alpaca":
        return AlpacaRecord(
            index=index,
            instruction=_field(obj, "instruction", where, required=True),
            input=_field(obj, "input", where, required=False),
            output=_field(obj, "output", where, required=True),
        )
    if fmt == "gsm8k":
        question = _field(obj, "question", where, required=True)
        answer = _field(obj, "answer", where, required=True)
        final = final_answer(answer)
        if final is None:
            raise DatasetError(f"{where}: field 'answer' does not end with '#### <number>'")
        return Gsm8kRecord(index=index, question=question, answer=answer, final=final)
    raise DatasetError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")


def _open_error(path: Path, exc: OSError) -> DatasetError:
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"{path}: file not found (see `llmenergy data fetch --help`)")
    return DatasetError(f"{path}: cannot read: {exc.strerror or exc}")


# --------------------------------------------------------------------------- JSON lines
def _iter_jsonl(path: Path, fmt: str, limit: int | None) -> Iterator[Record]:
    count = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{where}: invalid JSON: {exc.msg}") from None
                yield make_record(fmt, obj, count, where)
                count += 1
                if limit is not None and count >= limit:
                    return
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise _open_error(path, exc) from None


def count_jsonl(path: Path) -> int:
    """Number of non-blank lines (records) in a JSON-lines file."""
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError as exc:
        raise _open_error(path, exc) from None


# --------------------------------------------------------------------------- JSON array
def _load_json_array(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return data


def _head_json_array(path: Path, limit: int, chunk_chars: int = 1 << 20) -> list[Any]:
    """Decode only the first ``limit`` objects of a JSON array (for fast checks).

    Reads a chunk of the file; an item cut off by the chunk's end makes it read a
    chunk twice as large, so a file is read whole only when its items are huge.
    """
    while True:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read(chunk_chars)
                complete = fh.read(1) == ""
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise _open_error(path, exc) from None
        items = _decode_head(path, text, limit, complete)
        if items is not None:
            return items
        chunk_chars *= 2


def _decode_head(path: Path, text: str, limit: int, complete: bool) -> list[Any] | None:
    """The first ``limit`` items of a JSON array in ``text``; None if ``text`` is too short."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":
        raise DatasetError(f"{path}: expected a JSON array of objects (file must start with '[')")
    pos += 1
    items: list[Any] = []
    while len(items) < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            return items if complete else None
        if text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if not complete:
                return None  # maybe cut off by the chunk's end: read more
            raise DatasetError(
                f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
        items.append(obj)
    return items


# --------------------------------------------------------------------------- Parquet
def _parquet_columns(path: Path, fmt: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except FileNotFoundError as exc:
        raise _open_error(path, exc) from None
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    wanted: list[str] = []
    for name in REQUIRED_FIELDS[fmt] + OPTIONAL_FIELDS[fmt]:
        if name not in schema.names:
            if name in REQUIRED_FIELDS[fmt]:
                raise DatasetError(f"{path}: missing column {name!r}")
            continue
        typ = schema.field(name).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
            raise DatasetError(f"{path}: column {name!r} must hold strings, got {typ}")
        wanted.append(name)
    return wanted


def _iter_parquet(path: Path, fmt: str, limit: int | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _parquet_columns(path, fmt)
    count = 0
    try:
        pfile = pq.ParquetFile(path)
        for batch in pfile.iter_batches(batch_size=4096, columns=columns):
            for obj in batch.to_pylist():
                yield make_record(fmt, obj, count, f"{path}: row {count}")
                count += 1
                if limit is not None and count >= limit:
                    return
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


def count_parquet(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except FileNotFoundError as exc:
        raise _open_error(path, exc) from None
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


# --------------------------------------------------------------------------- entry points
def read_records(path: str | Path, fmt: str) -> list[Record]:
    """Every record of ``path``, validated. Raises DatasetError on the first bad one."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    container = container_of(path)
    if container == "jsonl":
        records = list(_iter_jsonl(path, fmt, None))
    elif container == "parquet":
        records = list(_iter_parquet(path, fmt, None))
    else:
        records = [
            make_record(fmt, obj, i, f"{path}: index {i}")
            for i, obj in enumerate(_load_json_array(path))
        ]
    log.debug("read %d %s records from %s", len(records), fmt, path)
    return records


def head_records(path: str | Path, fmt: str, limit: int = 5) -> list[Record]:
    """The first ``limit`` records, validated, reading as little of the file as possible."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    container = container_of(path)
    if container == "jsonl":
        return list(_iter_jsonl(path, fmt, limit))
    if container == "parquet":
        return list(_iter_parquet(path, fmt, limit))
    return [
        make_record(fmt, obj, i, f"{path}: index {i}")
        for i, obj in enumerate(_head_json_array(path, limit))
    ]


def count_records(path: str | Path, max_json_bytes: int = 64 << 20) -> int | None:
    """The number of records, where cheap to know (None for JSON arrays over the size cap)."""
    path = Path(path)
    container = container_of(path)
    if container == "jsonl":
        return count_jsonl(path)
    if container == "parquet":
        return count_parquet(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _open_error(path, exc) from None
    if size > max_json_bytes:
        return None
    return len(_load_json_array(path))
