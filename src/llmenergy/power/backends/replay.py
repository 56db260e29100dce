"""Replay backend: plays back a recorded power series (for tests and demos).

The recording is a power-sample table (parquet path, ``pandas.DataFrame`` or
``pyarrow.Table``) with at least ``device``, ``timestamp_ns`` and one of
``energy_mj``/``power_w``.  Each ``sample(t)`` call emits the next recorded
time step, restamped with ``t``, with ``node`` set to this backend's node and
``source = "replay"``.  With ``loop=True`` the recording restarts when it ends
and the energy counters continue from where they stopped, so they stay
monotonic; otherwise ``sample`` returns ``[]`` once exhausted.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends.base import (
    POWER_COLUMNS,
    DeviceInfo,
    PowerBackend,
    make_row,
)

log = logging.getLogger(__name__)

_METRICS = tuple(c for c in POWER_COLUMNS if c not in ("node", "device", "device_index", "domain",
                                                         "timestamp_ns", "source"))


def _as_table(recording: Any) -> pa.Table:
    if isinstance(recording, pa.Table):
        return recording
    if isinstance(recording, (str, Path)):
        path = Path(recording)
        if not path.is_file():
            raise SensorUnavailable(f"replay: recording {path} does not exist")
        return pq.read_table(path)
    # pandas.DataFrame (imported lazily: pandas is heavy)
    return pa.Table.from_pandas(recording, preserve_index=False)


class ReplayBackend(PowerBackend):
    """Emits recorded rows one time step per ``sample`` call."""

    name = "replay"

    def __init__(
        self,
        recording: Any,
        *,
        uuid_list: list[str] | None = None,
        loop: bool = True,
        node: str | None = None,
    ) -> None:
        super().__init__(node=node)
        table = _as_table(recording)
        for required in ("device", "timestamp_ns"):
            if required not in table.column_names:
                raise SensorError(f"replay: recording lacks column {required!r}")
        records = table.to_pylist()
        if uuid_list is not None:
            records = [r for r in records if r["device"] in uuid_list]
        if not records:
            raise SensorUnavailable("replay: recording has no rows for the requested devices")
        self._devices = self._collect_devices(records)
        by_device = {d.uuid: d for d in self._devices}
        steps: dict[int, list[tuple[DeviceInfo, dict[str, Any]]]] = {}
        for r in sorted(records, key=lambda r: r["timestamp_ns"]):
            metrics = {m: r.get(m) for m in _METRICS}
            steps.setdefault(int(r["timestamp_ns"]), []).append((by_device[r["device"]], metrics))
        self._steps = list(steps.values())
        self._loop = loop
        self._position = 0
        self._energy_offset_mj: dict[int, float] = {d.index: 0.0 for d in self._devices}
        self._first_energy_mj: dict[int, float | None] = {d.index: None for d in self._devices}
        self._last: dict[int, dict[str, Any]] = {}
        log.info("replay: %d steps for %d devices", len(self._steps), len(self._devices))

    @staticmethod
    def _collect_devices(records: list[dict[str, Any]]) -> list[DeviceInfo]:
        devices: dict[str, DeviceInfo] = {}
        for r in records:
            uuid = r["device"]
            if uuid in devices:
                continue
            index = r.get("device_index")
            devices[uuid] = DeviceInfo(
                index=len(devices) if index is None else int(index),
                uuid=uuid,
                name=str(r.get("name") or uuid),
                domain=r.get("domain") or "gpu",
            )
        return sorted(devices.values(), key=lambda d: d.index)

    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    @property
    def exhausted(self) -> bool:
        return not self._loop and self._position >= len(self._steps)

    def _next_step(self) -> list[tuple[DeviceInfo, dict[str, Any]]]:
        if self._position >= len(self._steps):
            if not self._loop:
                return []
            # Restart: shift counters so they continue from the last emitted value.
            for index, last in self._last.items():
                first = self._first_energy_mj[index]
                if last.get("energy_mj") is not None and first is not None:
                    self._energy_offset_mj[index] = last["energy_mj"] - first
            self._position = 0
        step = self._steps[self._position]
        self._position += 1
        return step

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        rows = []
        for dev, metrics in self._next_step():
            metrics = dict(metrics)
            if metrics.get("energy_mj") is not None:
                if self._first_energy_mj[dev.index] is None:
                    self._first_energy_mj[dev.index] = metrics["energy_mj"]
                metrics["energy_mj"] += self._energy_offset_mj[dev.index]
            self._last[dev.index] = metrics
            rows.append(make_row(node=self.node, device=dev, timestamp_ns=timestamp_ns,
                                 source=self.name, **metrics))
        return rows

    def read_energy_mj(self, device_index: int) -> float | None:
        self.device(device_index)
        return self._last.get(device_index, {}).get("energy_mj")

    def read_power_w(self, device_index: int) -> float | None:
        self.device(device_index)
        return self._last.get(device_index, {}).get("power_w")
