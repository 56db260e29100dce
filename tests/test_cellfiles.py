"""The cheap check of a cell's outputs that every workflow parse runs (``cellfiles.output_problem``)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.cellfiles import output_problem


def test_output_problem_detects_truncated_parquet_and_unfinished_status(tmp_path: Path) -> None:
    good = tmp_path / "metrics.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), good)
    assert output_problem(good) is None
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-10])
    assert "bad magic" in output_problem(cut)
    tiny = tmp_path / "tiny.parquet"
    tiny.write_bytes(b"PAR1")
    assert "too short" in output_problem(tiny)
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({"status": "incomplete"}))
    assert output_problem(cell, lambda s: s == "ok") == "status incomplete, not finished"
    cell.write_text(json.dumps({"status": "ok"}))
    assert output_problem(cell, lambda s: s == "ok") is None
    cell.write_text("{not json")
    assert output_problem(cell).startswith("unreadable")
