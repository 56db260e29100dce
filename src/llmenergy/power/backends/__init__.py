"""Power collection: backends (one module per vendor), the factory, and the per-node process.

Vendor modules (``nvml``, ``dcgm``) are imported only when their backend is
built, so importing this package needs neither NVML nor DCGM.
"""
from __future__ import annotations

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
from llmenergy.power.backends.factory import BACKEND_NAMES, select_backend

__all__ = [
    "BACKEND_NAMES",
    "POWER_COLUMNS",
    "POWER_SCHEMA",
    "DeviceInfo",
    "PowerBackend",
    "make_row",
    "map_sensor_errors",
    "rows_to_table",
    "select_backend",
    "sensor_call",
]
