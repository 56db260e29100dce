"""The ``.run/`` handshake records: written and read back, and a bad file named in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmenergy.errors import RecordError
from llmenergy.handshake import CapReady, CellBegin, ClockOffsets, RankDevice, RankOutcome, WorkerStatus


@pytest.mark.parametrize("record", [
    WorkerStatus("oom", "CUDA out of memory", None),
    CellBegin("c1", 2, 123),
    ClockOffsets({"n1": -5}, {"n1": 40}, 9),
    RankOutcome(3, "failed", "boom", 77, True),
    CapReady("n1", "applied", None, "nvml", 300.0, "fail", [{"uuid": "GPU-1", "enforced_w": 300.0}]),
], ids=lambda r: type(r).__name__)
def test_a_record_reads_back_as_written(tmp_path: Path, record: object) -> None:
    path = tmp_path / "r.json"
    record.write(path)  # type: ignore[attr-defined]
    assert json.loads(path.read_text())["schema_version"] == 1
    assert type(record).read(path) == record  # type: ignore[attr-defined]


def test_another_schema_version_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "begin.json"
    path.write_text(json.dumps({"schema_version": 99, "cell_id": "c", "position": 0, "started_ns": 1}))
    with pytest.raises(RecordError, match=r"begin\.json: schema_version 99"):
        CellBegin.read(path)


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "3.json"
    path.write_text(json.dumps({"schema_version": 1, "rank": 3}))
    with pytest.raises(RecordError, match=r"3\.json: missing status"):
        RankOutcome.read(path)


def test_a_device_file_with_only_a_uuid_is_read(tmp_path: Path) -> None:
    path = tmp_path / "0"
    path.write_text(json.dumps({"uuid": "GPU-abc"}))
    assert RankDevice.read(path) == RankDevice(uuid="GPU-abc")


def test_a_device_file_without_a_uuid_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "0"
    path.write_text(json.dumps({"schema_version": 1, "node": "n1", "rank": 0}))
    with pytest.raises(RecordError, match="not a device record"):
        RankDevice.read(path)
