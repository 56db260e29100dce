"""The null backend: no sensor at all.

Choice (documented in the report and docs): a NullBackend returns **no rows**.
Its ``devices()`` still lists the devices it was asked to watch, so the ready
file and ``cell.json`` name them, but ``power.parquet`` stays empty (with the
full schema) and every energy column of the summary becomes null with
``power_source = "none"``.  Rows of nulls would only bloat the file and could be
mistaken for a sensor that read nothing.
"""
from __future__ import annotations

from typing import Any

from llmenergy.power.backends.base import DeviceInfo, PowerBackend


class NullBackend(PowerBackend):
    """Reads nothing; ``sample`` returns ``[]``."""

    name = "none"

    def __init__(self, uuid_list: list[str] | None = None, *, node: str | None = None) -> None:
        super().__init__(node=node)
        self._devices = [
            DeviceInfo(
                index=i,
                uuid=uuid,
                name="unknown",
                domain="cpu_package" if uuid == "cpu" else "gpu",
            )
            for i, uuid in enumerate(dict.fromkeys(uuid_list or []))
        ]

    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    def read_energy_mj(self, device_index: int) -> float | None:
        self.device(device_index)
        return None

    def read_power_w(self, device_index: int) -> float | None:
        self.device(device_index)
        return None

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        return []

    def sample_power(self, timestamp_ns: int) -> list[dict[str, Any]]:
        return []
