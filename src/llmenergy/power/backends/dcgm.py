"""DCGM backend, through NVIDIA's Python bindings and their ``DcgmReader``.

The bindings are not on PyPI: they ship with DCGM.  :func:`load_bindings` finds
them on ``sys.path``, then in ``$DCGM_PYTHON_PATH`` (``os.pathsep``-separated),
then in the DCGM 3 and DCGM 4 install folders.

Field ids are integers on purpose (DCGM 4.6 renamed the constants).  The
reader watches :data:`BASE_FIELDS` plus, when allowed, the profiling fields
:data:`PROFILING_FIELDS`; if watching those fails (non-root host engine, GPU
without profiling, another profiler active) it falls back to the base fields.

Host engine: ``host=None`` starts an embedded engine in this process;
otherwise it connects to a standalone ``nv-hostengine`` at ``host`` (the
``collector.dcgm_host`` option).  One connection serves discovery and reading.
"""
from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    map_sensor_errors,
    select_devices,
    sensor_call,
    vendor_text,
)

log = logging.getLogger(__name__)

DCGM_BINDING_DIRS: tuple[str, ...] = (
    "/usr/local/dcgm/bindings/python3",
    "/usr/share/datacenter-gpu-manager-4/bindings/python3",
)
BINDING_MODULES: tuple[str, ...] = ("pydcgm", "dcgm_fields", "dcgm_structs", "DcgmReader")

# Field ids: integers, because DCGM 4.6 renamed the constants (dcgm_fields.py of DCGM 3 and 4).
FI_POWER_USAGE_W = 155
FI_TOTAL_ENERGY_MJ = 156
FI_POWER_INSTANT_W = 157
FI_GPU_UTIL = 203
FI_MEM_COPY_UTIL = 204
FI_FB_TOTAL_MB = 250
FI_FB_FREE_MB = 251
FI_FB_USED_MB = 252
FI_SM_CLOCK = 100
FI_MEM_CLOCK = 101
FI_GPU_TEMP = 150
FI_POWER_MGMT_LIMIT_W = 160
FI_ENFORCED_POWER_LIMIT_W = 164
FI_CLOCK_EVENT_REASONS = 112
FI_POWER_VIOLATION_US = 240
FI_PROF_SM_ACTIVE = 1002
FI_PROF_TENSOR_ACTIVE = 1004
FI_PROF_DRAM_ACTIVE = 1005

BASE_FIELDS: tuple[int, ...] = (
    155, 156, 157, 203, 204, 250, 251, 252, 100, 101, 150, 160, 161, 162, 163, 164, 112, 240,
)
PROFILING_FIELDS: tuple[int, ...] = (1002, 1004, 1005)

_FP64_BLANK = 140737488355328.0  # DCGM_FP64_BLANK; larger floats are DCGM sentinels
_INT64_BLANK = 0x7FFFFFFFFFFFFFF0  # DCGM_INT64_BLANK; larger ints are sentinels


def _binding_dirs() -> list[str]:
    env = os.environ.get("DCGM_PYTHON_PATH", "")
    dirs = [d for d in env.split(os.pathsep) if d]
    return dirs + list(DCGM_BINDING_DIRS)


def load_bindings() -> types.SimpleNamespace:
    """Import pydcgm, dcgm_fields, dcgm_structs and DcgmReader, searching the known folders.

    Raises SensorUnavailable when they cannot be found.
    """
    try:
        return _import_bindings()
    except ImportError as first:
        error: ImportError = first
    for folder in _binding_dirs():
        if not (Path(folder) / "pydcgm.py").is_file():
            continue
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            mods = _import_bindings()
        except ImportError as exc:
            error = exc
            continue
        log.info("dcgm: bindings from %s", folder)
        return mods
    raise SensorUnavailable(
        "dcgm: Python bindings not found on sys.path, $DCGM_PYTHON_PATH or "
        f"{', '.join(DCGM_BINDING_DIRS)} ({error})"
    )


def _import_bindings() -> types.SimpleNamespace:
    import importlib

    return types.SimpleNamespace(**{name: importlib.import_module(name) for name in BINDING_MODULES})


def _clean(value: Any) -> Any:
    """None for DCGM blank sentinels."""
    if value is None:
        return None
    if isinstance(value, float) and value >= _FP64_BLANK:
        return None
    if isinstance(value, int) and value >= _INT64_BLANK:
        return None
    return value


def _as_float(value: Any) -> float | None:
    value = _clean(value)
    return None if value is None else float(value)


class DcgmBackend(PowerBackend):
    """Watches exactly the GPUs named by ``uuids`` through a DcgmReader."""

    name = "dcgm"

    def __init__(
        self,
        uuids: list[str] | None = None,
        *,
        interval_ms: int = 100,
        host: str | None = None,
        profiling: bool = True,
        max_keep_age_s: float = 600.0,
        node: str | None = None,
    ) -> None:
        super().__init__(node=node)
        self._mods = load_bindings()
        self._host = None if host in (None, "", "embedded") else host
        self._interval_us = int(interval_ms) * 1000
        self._max_keep_age_s = float(max_keep_age_s)
        self._handle: Any = None
        self._reader: Any = None
        self._failed_reader: Any = None
        self._devices: list[DeviceInfo] = []
        self.fields: tuple[int, ...] = ()
        self._latest: dict[int, dict[int, Any]] = {}
        try:
            self._connect()
            self._discover(uuids)
            self._watch(profiling)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------
    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return (self._mods.dcgm_structs.DCGMError,)

    def is_unavailable(self, exc: BaseException) -> bool:
        structs = self._mods.dcgm_structs
        codes = {
            getattr(structs, name, None)
            for name in (
                "DCGM_ST_LIBRARY_NOT_FOUND",
                "DCGM_ST_CONNECTION_NOT_VALID",
                "DCGM_ST_INIT_ERROR",
                "DCGM_ST_NVML_ERROR",
                "DCGM_ST_GPU_NOT_SUPPORTED",
            )
        } - {None}
        return getattr(exc, "value", None) in codes

    @sensor_call
    def _connect(self) -> None:
        structs = self._mods.dcgm_structs
        self._handle = self._mods.pydcgm.DcgmHandle(
            ipAddress=self._host, opMode=structs.DCGM_OPERATION_MODE_AUTO
        )
        log.info("dcgm: %s", "embedded host engine" if self._host is None else f"nv-hostengine at {self._host}")

    @sensor_call
    def _discover(self, uuids: list[str] | None) -> None:
        discovery = self._handle.GetSystem().discovery
        found: dict[str, DeviceInfo] = {}
        for gpu_id in discovery.GetAllSupportedGpuIds():
            ident = discovery.GetGpuAttributes(gpu_id).identifiers
            uuid = vendor_text(ident.uuid)
            if uuids is None or uuid in uuids:
                found[uuid] = DeviceInfo(index=int(gpu_id), uuid=uuid, name=vendor_text(ident.deviceName), domain="gpu")
        self._devices = select_devices(found, uuids, missing_what="dcgm: GPU UUID(s) not seen by DCGM")
        if not self._devices:
            raise SensorUnavailable("dcgm: no supported GPUs")

    def _watch(self, profiling: bool) -> None:
        DCGMError = self._mods.dcgm_structs.DCGMError  # noqa: N806 - vendor name
        if profiling:
            try:
                self._reader = self._new_reader(BASE_FIELDS + PROFILING_FIELDS)
                self.fields = BASE_FIELDS + PROFILING_FIELDS
                return
            except DCGMError as exc:
                log.warning("dcgm: profiling fields %s not watchable (%s); continuing without them",
                            list(PROFILING_FIELDS), exc)
                self._teardown_reader(self._failed_reader)
        with map_sensor_errors(self.name, self.vendor_errors(), what="watch",
                               unavailable=self.is_unavailable):
            self._reader = self._new_reader(BASE_FIELDS)
        self.fields = BASE_FIELDS

    def _new_reader(self, fields: tuple[int, ...]) -> Any:
        reader = self._mods.DcgmReader.DcgmReader(
            hostname=self._host,
            fieldIds=list(fields),
            updateFrequency=self._interval_us,
            maxKeepAge=self._max_keep_age_s,
            gpuIds=[d.index for d in self._devices],
            fieldGroupName=f"llmenergy_{os.getpid()}",
        )
        self._failed_reader = reader
        # Use our connection (DCGM allows one per process); the reader creates the
        # GPU group and field groups and adds the watches.
        reader.SetHandle(self._handle.handle)
        self._failed_reader = None
        log.info("dcgm: watching fields %s on GPU ids %s every %d us",
                 list(fields), [d.index for d in self._devices], self._interval_us)
        return reader

    # -- reading -----------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    @sensor_call
    def refresh(self) -> dict[int, dict[int, Any]]:
        """Fetch the latest value of every watched field: {gpu_id: {field_id: value}}."""
        if self._reader is None:
            raise SensorError("dcgm: backend is closed")
        self._latest = {int(k): v for k, v in self._reader.GetLatestGpuValuesAsFieldIdDict().items()}
        return self._latest

    def _values(self, device_index: int) -> dict[int, Any]:
        self.device(device_index)
        return self.refresh().get(device_index, {})

    def read_energy_mj(self, device_index: int) -> float | None:
        return _as_float(self._values(device_index).get(FI_TOTAL_ENERGY_MJ))

    def read_power_w(self, device_index: int) -> float | None:
        return _power_w(self._values(device_index))

    def read_profiling(self, device_index: int) -> dict[str, float | None]:
        """Profiling ratios (0..1) of one GPU; all None when profiling is not watched.

        The power-sample schema has no columns for these; callers that want them
        read them here.
        """
        values = self._values(device_index)
        return {
            "sm_active": _as_float(values.get(FI_PROF_SM_ACTIVE)),
            "tensor_active": _as_float(values.get(FI_PROF_TENSOR_ACTIVE)),
            "dram_active": _as_float(values.get(FI_PROF_DRAM_ACTIVE)),
        }

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        latest = self.refresh()
        rows = []
        for dev in self._devices:
            v = latest.get(dev.index, {})
            limit = _as_float(v.get(FI_ENFORCED_POWER_LIMIT_W))
            if limit is None:
                limit = _as_float(v.get(FI_POWER_MGMT_LIMIT_W))
            reasons = _clean(v.get(FI_CLOCK_EVENT_REASONS))
            violation_us = _clean(v.get(FI_POWER_VIOLATION_US))
            rows.append(make_row(
                node=self.node,
                device=dev,
                timestamp_ns=timestamp_ns,
                source=self.name,
                energy_mj=_as_float(v.get(FI_TOTAL_ENERGY_MJ)),
                power_w=_power_w(v),
                gpu_util_pct=_as_float(v.get(FI_GPU_UTIL)),
                mem_util_pct=_as_float(v.get(FI_MEM_COPY_UTIL)),
                mem_used_mb=_as_float(v.get(FI_FB_USED_MB)),
                sm_clock_mhz=_as_float(v.get(FI_SM_CLOCK)),
                mem_clock_mhz=_as_float(v.get(FI_MEM_CLOCK)),
                temperature_c=_as_float(v.get(FI_GPU_TEMP)),
                power_limit_w=limit,
                clock_event_reasons=None if reasons is None else int(reasons),
                power_cap_throttle_ns=None if violation_us is None else int(violation_us) * 1000,
            ))
        return rows

    # -- teardown ----------------------------------------------------------
    def _teardown_reader(self, reader: Any) -> None:
        """Delete the reader's field groups and GPU group (watches go with them)."""
        if reader is None:
            return
        DCGMError = self._mods.dcgm_structs.DCGMError  # noqa: N806
        groups = list((getattr(reader, "m_fieldGroups", None) or {}).values())
        groups.append(getattr(reader, "m_fieldGroup", None))
        groups.append(getattr(reader, "m_dcgmGroup", None))
        for group in groups:
            if group is None:
                continue
            try:
                group.Delete()
            except (DCGMError, AttributeError) as exc:
                log.debug("dcgm: teardown: %s", exc)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        self._teardown_reader(reader)
        self._teardown_reader(self._failed_reader)
        self._failed_reader = None
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.Shutdown()
            except self._mods.dcgm_structs.DCGMError as exc:
                log.warning("dcgm: shutdown failed: %s", exc)


def _power_w(values: dict[int, Any]) -> float | None:
    power = _as_float(values.get(FI_POWER_INSTANT_W))
    return power if power is not None else _as_float(values.get(FI_POWER_USAGE_W))

