"""ReplayBackend plays a recorded series back."""
from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from llmenergy.errors import SensorUnavailable
from llmenergy.power.backends.base import POWER_COLUMNS, rows_to_table
from llmenergy.power.backends.replay import ReplayBackend


def recording(steps: int = 3) -> pd.DataFrame:
    rows = []
    for t in range(steps):
        for index, uuid in enumerate(["GPU-a", "GPU-b"]):
            rows.append({"node": "rec", "device": uuid, "device_index": index, "domain": "gpu",
                         "timestamp_ns": 1000 + 100 * t, "energy_mj": 1000.0 * index + 50.0 * t,
                         "power_w": 100.0 + t, "temperature_c": 40.0 + index, "source": "nvml"})
    return pd.DataFrame(rows)


def test_steps_restamped_and_relabelled() -> None:
    backend = ReplayBackend(recording(), node="live", loop=False)
    assert [d.uuid for d in backend.devices()] == ["GPU-a", "GPU-b"]
    first = backend.sample(5_000)
    assert [r["device"] for r in first] == ["GPU-a", "GPU-b"]
    assert all(tuple(r) == POWER_COLUMNS for r in first)
    assert {r["timestamp_ns"] for r in first} == {5_000}
    assert {r["source"] for r in first} == {"replay"} and {r["node"] for r in first} == {"live"}
    assert first[1]["temperature_c"] == 41.0 and first[0]["gpu_util_pct"] is None
    assert backend.read_energy_mj(1) == 1000.0 and backend.read_power_w(0) == 100.0
    backend.sample(5_100)
    backend.sample(5_200)
    assert backend.exhausted
    assert backend.sample(5_300) == []


def test_loop_keeps_energy_monotonic() -> None:
    backend = ReplayBackend(recording(steps=3), uuid_list=["GPU-a"], loop=True)
    energies = [backend.sample(t)[0]["energy_mj"] for t in range(7)]
    assert energies == [0.0, 50.0, 100.0, 100.0, 150.0, 200.0, 200.0]
    assert [d.uuid for d in backend.devices()] == ["GPU-a"]


def test_reads_parquet_file(tmp_path) -> None:
    path = tmp_path / "rec.parquet"
    pq.write_table(rows_to_table(recording().to_dict("records")), path)
    backend = ReplayBackend(path)
    assert len(backend.sample(1)) == 2


def test_missing_file_and_unknown_devices_are_unavailable(tmp_path) -> None:
    with pytest.raises(SensorUnavailable, match="does not exist"):
        ReplayBackend(tmp_path / "none.parquet")
    with pytest.raises(SensorUnavailable, match="no rows"):
        ReplayBackend(recording(), uuid_list=["GPU-z"])
