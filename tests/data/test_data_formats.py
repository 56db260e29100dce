"""Readers of the real on-disk formats: valid files, and every malformation named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmenergy.data import formats
from llmenergy.data.formats import AlpacaRecord, Gsm8kRecord
from llmenergy.errors import DatasetError

ALPACA_ITEMS = [
    {
        "instruction": "Give three tips for a café in Zürich ☕.",
        "input": "",
        "output": "Open early.",
    },
    {
        "instruction": "Translate the phrase.",
        "input": "東京の夜 — naïve façade",
        "output": "Tokyo night.",
    },
    {"instruction": "Summarize.", "input": "word " * 20000, "output": "Words."},
]
GSM_ITEMS = [
    {
        "question": "Ana has 3 boxes of 4 pens. How many pens?",
        "answer": "3*4=<<3*4=12>>12\n#### 12",
    },
    {"question": "It was 2 degrees and fell 7. Now?", "answer": "2-7=-5\n#### -5"},
    {"question": "A car costs $12,500 with $500 off. Price?", "answer": "12500-500\n#### $12,000"},
    {"question": "Half of 5?", "answer": "5/2\n#### 2.5"},
]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[object], extra_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + (extra_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pq(
    path: Path, columns: dict[str, list[object]], types: dict[str, pa.DataType] | None = None
) -> Path:
    types = types or {}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path)
    return path


def test_alpaca_json_roundtrip_keeps_unicode_empty_and_long_items(tmp_path: Path) -> None:
    path = write_json(tmp_path / "alpaca_data.json", ALPACA_ITEMS)
    records = formats.read_records(path, "alpaca")
    assert [r.index for r in records] == list(range(len(ALPACA_ITEMS)))
    for rec, item in zip(records, ALPACA_ITEMS, strict=True):
        assert isinstance(rec, AlpacaRecord)
        assert (rec.instruction, rec.input, rec.output) == (
            item["instruction"],
            item["input"],
            item["output"],
        )
    assert len(records[2].input) == len(ALPACA_ITEMS[2]["input"])


def test_alpaca_missing_or_null_input_reads_as_empty(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "a.json",
        [{"instruction": "i", "output": "o"}, {"instruction": "j", "input": None, "output": "p"}],
    )
    assert [r.input for r in formats.read_records(path, "alpaca")] == ["", ""]


def test_gsm8k_jsonl_final_answers_are_normalised(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "test.jsonl", GSM_ITEMS, extra_lines=["", "   "])
    records = formats.read_records(path, "gsm8k")
    assert all(isinstance(r, Gsm8kRecord) for r in records)
    assert [r.final for r in records] == ["12", "-5", "12000", "2.5"]
    assert records[0].answer == GSM_ITEMS[0]["answer"]


@pytest.mark.parametrize(
    "fmt,columns",
    [
        (
            "alpaca",
            {
                "instruction": ["a", "b"],
                "input": ["", "x ü"],
                "output": ["o", "p"],
                "text": ["t1", "t2"],
            },
        ),
        ("gsm8k", {"question": ["q1", "q2"], "answer": ["r\n#### 1", "s\n#### -2"]}),
    ],
)
def test_parquet_exports_read_like_json(
    tmp_path: Path, fmt: str, columns: dict[str, list[object]]
) -> None:
    path = write_pq(tmp_path / f"{fmt}.parquet", columns)
    records = formats.read_records(path, fmt)
    assert len(records) == 2
    first = columns["instruction" if fmt == "alpaca" else "question"][1]
    assert (records[1].instruction if fmt == "alpaca" else records[1].question) == first  # type: ignore[union-attr]
    assert formats.count_records(path) == 2


def test_parquet_large_string_and_null_input(tmp_path: Path) -> None:
    path = write_pq(
        tmp_path / "a.parquet",
        {"instruction": ["a"], "input": [None], "output": ["o"]},
        {"instruction": pa.large_string(), "input": pa.string()},
    )
    (rec,) = formats.read_records(path, "alpaca")
    assert rec.input == "" and rec.instruction == "a"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "lines,expected",
    [
        (
            ['{"question": "q", "answer": "a #### 1"}', '{"question": "q2", "answer": '],
            "line 2: invalid JSON",
        ),
        (
            ['{"question": "q", "answer": "a #### 1"}', "", '{"question": "q"}'],
            "line 3: missing field 'answer'",
        ),
        (
            ['{"question": 7, "answer": "#### 1"}'],
            "line 1: field 'question' must be a string, got int",
        ),
        (
            ['{"question": "q", "answer": "no final marker 12"}'],
            "line 1: field 'answer' does not end with '#### <number>'",
        ),
        (
            ['{"question": "q", "answer": "#### twelve"}'],
            "line 1: field 'answer' does not end with '#### <number>'",
        ),
        (['["q", "a"]'], "line 1: expected an object, got list"),
        (['{"question": null, "answer": "#### 1"}'], "line 1: field 'question' is null"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(
    tmp_path: Path, lines: list[str], expected: str
) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        formats.read_records(path, "gsm8k")
    message = str(info.value)
    assert message == f"{path}: {expected}" or message.startswith(f"{path}: {expected}")
    assert "\n" not in message


@pytest.mark.parametrize(
    "obj,expected",
    [
        (
            [{"instruction": "i", "output": "o"}, {"instruction": "i"}],
            "index 1: missing field 'output'",
        ),
        (
            [{"instruction": ["i"], "input": "", "output": "o"}],
            "index 0: field 'instruction' must be a string, got list",
        ),
        (
            [{"instruction": "i", "input": 3, "output": "o"}],
            "index 0: field 'input' must be a string, got int",
        ),
        ({"instruction": "i", "output": "o"}, "expected a JSON array of objects, got dict"),
        (["just text"], "index 0: expected an object, got str"),
    ],
)
def test_malformed_alpaca_json_names_index_and_field(
    tmp_path: Path, obj: object, expected: str
) -> None:
    path = write_json(tmp_path / "alpaca_data.json", obj)
    with pytest.raises(DatasetError, match="^" + __import__("re").escape(f"{path}: {expected}")):
        formats.read_records(path, "alpaca")


def test_broken_json_array_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_data.json"
    path.write_text(
        '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i" "output": "o"}\n]\n'
    )
    with pytest.raises(DatasetError, match=r"alpaca_data\.json: line 3 column \d+: invalid JSON"):
        formats.read_records(path, "alpaca")


def test_parquet_missing_column_wrong_type_and_null_cell(tmp_path: Path) -> None:
    missing = write_pq(tmp_path / "m.parquet", {"question": ["q"]})
    with pytest.raises(DatasetError, match=r"m\.parquet: missing column 'answer'$"):
        formats.read_records(missing, "gsm8k")
    wrong = write_pq(tmp_path / "w.parquet", {"question": ["q"], "answer": [3]})
    with pytest.raises(
        DatasetError, match=r"w\.parquet: column 'answer' must hold strings, got int64"
    ):
        formats.read_records(wrong, "gsm8k")
    null = write_pq(
        tmp_path / "n.parquet", {"question": ["q", None], "answer": ["#### 1", "#### 2"]}
    )
    with pytest.raises(DatasetError, match=r"n\.parquet: row 1: field 'question' is null"):
        formats.read_records(null, "gsm8k")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"g\.parquet: not a readable Parquet file"):
        formats.read_records(garbage, "gsm8k")


def test_missing_file_unknown_extension_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl: file not found"):
        formats.read_records(tmp_path / "nope.jsonl", "gsm8k")
    with pytest.raises(DatasetError, match=r"data\.csv: unsupported extension '\.csv'"):
        formats.read_records(tmp_path / "data.csv", "gsm8k")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.jsonl: not UTF-8 text"):
        formats.read_records(latin, "gsm8k")
    with pytest.raises(DatasetError, match="unknown dataset format 'csv'"):
        formats.read_records(latin, "csv")


def test_head_reads_only_the_first_records(tmp_path: Path) -> None:
    good = [{"instruction": f"i{k}", "input": "", "output": "o"} for k in range(8)]
    arr = write_json(tmp_path / "a.json", good + [{"instruction": "bad"}])
    head = formats.head_records(arr, "alpaca", 3)
    assert [r.instruction for r in head] == ["i0", "i1", "i2"]  # type: ignore[union-attr]
    with pytest.raises(DatasetError, match="index 8: missing field 'output'"):
        formats.read_records(arr, "alpaca")
    lines = write_jsonl(tmp_path / "g.jsonl", GSM_ITEMS, extra_lines=["{broken"])
    assert len(formats.head_records(lines, "gsm8k", 2)) == 2
    assert formats.count_records(lines) == len(GSM_ITEMS) + 1
    bad_head = write_jsonl(tmp_path / "b.jsonl", [{"question": "q"}])
    with pytest.raises(DatasetError, match="line 1: missing field 'answer'"):
        formats.head_records(bad_head, "gsm8k")


def test_head_of_json_array_larger_than_the_read_chunk(tmp_path: Path) -> None:
    items = [{"instruction": "x" * 300, "input": "", "output": "y"} for _ in range(20)]
    path = write_json(tmp_path / "a.json", items)
    assert formats._head_json_array(path, 50, chunk_chars=1000) == items
    assert formats._head_json_array(path, 3, chunk_chars=100) == items[:3]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(items)[:-40])
    assert formats._head_json_array(broken, 2, chunk_chars=100) == items[:2]
    with pytest.raises(DatasetError, match=r"broken\.json: line 1 column \d+: invalid JSON"):
        formats._head_json_array(broken, 50, chunk_chars=100)
    not_array = write_json(tmp_path / "o.json", {"a": 1})
    with pytest.raises(DatasetError, match="must start with"):
        formats.head_records(not_array, "alpaca")
