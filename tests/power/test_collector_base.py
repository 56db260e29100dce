"""The backend base: rows, schema, vendor-error mapping, NullBackend."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from llmenergy.errors import ConfigError, SensorError, SensorUnavailable
from llmenergy.power.backends.base import (
    POWER_COLUMNS,
    POWER_SCHEMA,
    DeviceInfo,
    PowerBackend,
    make_row,
    map_sensor_errors,
    rows_to_table,
    sensor_call,
)
from llmenergy.power.backends.null import NullBackend

DEV = DeviceInfo(index=3, uuid="GPU-x", name="H100", domain="gpu")


class VendorError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"vendor code {code}")
        self.code = code


class ToyBackend(PowerBackend):
    name = "nvml"

    def __init__(self, failure: BaseException | None = None) -> None:
        super().__init__(node="n")
        self.failure = failure

    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return (VendorError,)

    def is_unavailable(self, exc: BaseException) -> bool:
        return getattr(exc, "code", None) == 9

    def devices(self) -> list[DeviceInfo]:
        return [DEV]

    @sensor_call
    def read_energy_mj(self, device_index: int) -> float | None:
        if self.failure is not None:
            raise self.failure
        return 1.0

    def read_power_w(self, device_index: int) -> float | None:
        return 2.0

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        return []


def test_schema_matches_internals_doc_columns() -> None:
    assert POWER_COLUMNS == (
        "node", "device", "device_index", "domain", "timestamp_ns", "energy_mj", "power_w",
        "gpu_util_pct", "mem_util_pct", "mem_used_mb", "sm_clock_mhz", "mem_clock_mhz",
        "temperature_c", "power_limit_w", "clock_event_reasons", "power_cap_throttle_ns", "source",
        "other_processes")
    assert POWER_SCHEMA.field("device_index").type == pa.int32()
    assert POWER_SCHEMA.field("power_cap_throttle_ns").type == pa.int64()


def test_make_row_fills_identity_and_nulls() -> None:
    row = make_row(node="n1", device=DEV, timestamp_ns=10, source="dcgm", power_w=5.0)
    assert tuple(row) == POWER_COLUMNS
    assert (row["device"], row["device_index"], row["domain"]) == ("GPU-x", 3, "gpu")
    assert row["power_w"] == 5.0 and row["energy_mj"] is None
    with pytest.raises(ValueError, match="watts"):
        make_row(node="n1", device=DEV, timestamp_ns=10, source="dcgm", watts=5.0)


def test_rows_to_table_types() -> None:
    table = rows_to_table([make_row(node="n", device=DEV, timestamp_ns=1, source="rapl", energy_mj=3)])
    assert table.schema == POWER_SCHEMA
    assert table.column("energy_mj").to_pylist() == [3.0]
    assert rows_to_table([]).num_rows == 0


def test_sensor_call_maps_vendor_errors() -> None:
    with pytest.raises(SensorError, match="nvml: read_energy_mj failed: vendor code 1") as info:
        ToyBackend(VendorError(1)).read_energy_mj(3)
    assert not isinstance(info.value, SensorUnavailable)
    assert isinstance(info.value.__cause__, VendorError)
    with pytest.raises(SensorUnavailable):
        ToyBackend(VendorError(9)).read_energy_mj(3)


def test_sensor_call_passes_other_errors_through() -> None:
    with pytest.raises(ConfigError):
        ToyBackend(ConfigError("collector.x: bad")).read_energy_mj(3)
    with pytest.raises(KeyError):
        ToyBackend(KeyError("bug")).read_energy_mj(3)


def test_map_sensor_errors_context() -> None:
    with pytest.raises(SensorUnavailable, match="rapl: open failed"):
        with map_sensor_errors("rapl", (OSError,), what="open", unavailable=lambda e: True):
            raise FileNotFoundError("x")


def test_default_sample_power_and_device_lookup() -> None:
    backend = ToyBackend()
    [row] = backend.sample_power(8)
    assert (row["energy_mj"], row["power_w"], row["timestamp_ns"]) == (1.0, 2.0, 8)
    with pytest.raises(SensorError, match="index 0"):
        backend.device(0)


def test_null_backend_has_devices_but_no_rows() -> None:
    backend = NullBackend(["GPU-1", "GPU-2", "GPU-1"], node="n")
    assert [(d.index, d.uuid) for d in backend.devices()] == [(0, "GPU-1"), (1, "GPU-2")]
    assert backend.sample(1) == [] and backend.sample_power(1) == []
    assert backend.read_energy_mj(1) is None and backend.read_power_w(0) is None
    assert NullBackend(["cpu"]).devices()[0].domain == "cpu_package"
