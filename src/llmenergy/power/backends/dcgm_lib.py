"""DCGM for all of llmenergy: the bindings, one connection per host engine, error mapping and units.

Every use of DCGM goes through this module: the collector backend
(:mod:`~llmenergy.power.backends.dcgm`) and the power-cap backend
(:mod:`llmenergy.power.caps`).

The bindings are not on PyPI: they ship with DCGM.  :func:`load_bindings` finds
them on ``sys.path``, then in ``$DCGM_PYTHON_PATH`` (``os.pathsep``-separated),
then in the DCGM 3 and DCGM 4 install folders; tests point ``$DCGM_PYTHON_PATH``
at the fake (``tests/fakes/dcgm``).

Host engine: ``host=None`` (or ``""``/``"embedded"``) starts an embedded engine
in this process; otherwise :func:`connect` reaches a standalone
``nv-hostengine`` at ``host``.  Connections are counted per process and host:
the first :func:`connect` opens, the last :meth:`DcgmConnection.close` shuts down.

Field ids are integers on purpose (DCGM 4.6 renamed the constants).  Units are
DCGM's: W for power fields, mJ for the energy counter, µs for the power-violation
time and for a sample's ``ts`` (microseconds since the epoch, the host engine's
wall clock): :func:`us_to_ns` converts.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmenergy.errors import PowerCapDenied, PowerCapError, SensorUnavailable
from llmenergy.power.backends.base import map_sensor_errors, vendor_text

log = logging.getLogger(__name__)

DCGM_BINDING_DIRS: tuple[str, ...] = (
    "/usr/local/dcgm/bindings/python3",
    "/usr/share/datacenter-gpu-manager-4/bindings/python3",
)
BINDING_MODULES: tuple[str, ...] = ("pydcgm", "dcgm_fields", "dcgm_structs", "DcgmReader")

# Field ids (dcgm_fields.py of DCGM 3 and 4).
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

FP64_BLANK = 140737488355328.0  # DCGM_FP64_BLANK; larger floats are DCGM sentinels
INT64_BLANK = 0x7FFFFFFFFFFFFFF0  # DCGM_INT64_BLANK; larger ints are sentinels
INT32_BLANK = 0x7FFFFFF0  # DCGM_INT32_BLANK: "leave unchanged" in a config struct

#: Status names meaning "DCGM is not usable here" (→ SensorUnavailable).
UNAVAILABLE_STATUSES: tuple[str, ...] = (
    "DCGM_ST_LIBRARY_NOT_FOUND", "DCGM_ST_CONNECTION_NOT_VALID", "DCGM_ST_INIT_ERROR",
    "DCGM_ST_NVML_ERROR", "DCGM_ST_GPU_NOT_SUPPORTED",
)
#: Status names of a refused power-limit change (→ PowerCapDenied).
DENIED_STATUSES: tuple[str, ...] = ("DCGM_ST_REQUIRES_ROOT", "DCGM_ST_NO_PERMISSION")


# -- the bindings --------------------------------------------------------------------
def _binding_dirs() -> list[str]:
    env = os.environ.get("DCGM_PYTHON_PATH", "")
    return [d for d in env.split(os.pathsep) if d] + list(DCGM_BINDING_DIRS)


def _import_bindings() -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: importlib.import_module(name) for name in BINDING_MODULES})


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


# -- errors and units ------------------------------------------------------------------
def vendor_errors(mods: types.SimpleNamespace) -> tuple[type[BaseException], ...]:
    return (mods.dcgm_structs.DCGMError,)


def status_in(mods: types.SimpleNamespace, exc: BaseException, names: tuple[str, ...]) -> bool:
    codes = {getattr(mods.dcgm_structs, name, None) for name in names} - {None}
    return getattr(exc, "value", None) in codes


def is_unavailable(mods: types.SimpleNamespace, exc: BaseException) -> bool:
    return status_in(mods, exc, UNAVAILABLE_STATUSES)


@contextlib.contextmanager
def sensor_errors(mods: types.SimpleNamespace, what: str) -> Iterator[None]:
    """DCGM errors → SensorUnavailable (DCGM not usable here) or SensorError."""
    with map_sensor_errors("dcgm", vendor_errors(mods), what=what,
                           unavailable=lambda exc: is_unavailable(mods, exc)):
        yield


@contextlib.contextmanager
def cap_errors(mods: types.SimpleNamespace, what: str, uuid: str | None = None) -> Iterator[None]:
    """DCGM errors → PowerCapDenied (needs root/admin) or PowerCapError, naming the GPU."""
    try:
        yield
    except mods.dcgm_structs.DCGMError as exc:
        where = f"dcgm: {uuid}: " if uuid else "dcgm: "
        if status_in(mods, exc, DENIED_STATUSES):
            raise PowerCapDenied(f"{where}{what}: refused (dcgmConfigSet needs a host engine running "
                                 f"as root and admin rights)") from exc
        raise PowerCapError(f"{where}{what}: {exc}") from exc


def clean(value: Any) -> Any:
    """None for DCGM blank sentinels."""
    if value is None:
        return None
    if isinstance(value, float) and value >= FP64_BLANK:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= INT64_BLANK:
        return None
    return value


def as_float(value: Any) -> float | None:
    value = clean(value)
    return None if value is None else float(value)


def us_to_ns(timestamp_us: int) -> int:
    """A DCGM sample time (µs since the epoch) in ns since the epoch, the unit of every ``*_ns``."""
    return int(timestamp_us) * 1000


def host_address(host: str | None) -> str | None:
    """None (embedded engine) for ``None``, ``""`` and ``"embedded"``; else the address."""
    return None if host in (None, "", "embedded") else host


# -- connections, counted per process and host engine ------------------------------------
_lock = threading.Lock()
_connections: dict[tuple[Any, str | None], DcgmConnection] = {}


class DcgmConnection:
    """One DCGM handle (embedded engine or ``nv-hostengine``) shared by this process's users."""

    def __init__(self, mods: types.SimpleNamespace, host: str | None) -> None:
        self.mods = mods
        self.host = host
        self.handle = mods.pydcgm.DcgmHandle(ipAddress=host, opMode=mods.dcgm_structs.DCGM_OPERATION_MODE_AUTO)
        self.system = self.handle.GetSystem()
        self.users = 0
        log.info("dcgm: %s", "embedded host engine" if host is None else f"nv-hostengine at {host}")

    def gpus(self) -> list[tuple[int, str, str]]:
        """``(gpu_id, uuid, name)`` of every GPU DCGM supports, by id."""
        discovery = self.system.discovery
        out = []
        for gpu_id in discovery.GetAllSupportedGpuIds():
            ident = discovery.GetGpuAttributes(gpu_id).identifiers
            out.append((int(gpu_id), vendor_text(ident.uuid), vendor_text(ident.deviceName)))
        return out

    def close(self) -> None:
        """Release one user's share; the last one shuts the handle down.  Safe to call twice per user."""
        with _lock:
            if self.users <= 0:
                return
            self.users -= 1
            if self.users > 0:
                return
            _connections.pop((self.mods.pydcgm, self.host), None)
        try:
            self.handle.Shutdown()
        except self.mods.dcgm_structs.DCGMError as exc:
            log.warning("dcgm: shutdown failed: %s", exc)


def connect(host: str | None = None, mods: types.SimpleNamespace | None = None) -> DcgmConnection:
    """This process's connection to ``host``'s engine (opened on first use); raises DCGM errors as they are.

    Each call must be paired with one :meth:`DcgmConnection.close`.
    """
    mods = mods or load_bindings()
    address = host_address(host)
    with _lock:
        conn = _connections.get((mods.pydcgm, address))
        if conn is None:
            conn = DcgmConnection(mods, address)
            _connections[(mods.pydcgm, address)] = conn
        conn.users += 1
        return conn


def connect_for_caps(host: str | None = None) -> DcgmConnection:
    """:func:`connect` with every failure (bindings missing included) as a PowerCapError."""
    try:
        mods = load_bindings()
    except SensorUnavailable as exc:
        raise PowerCapError(str(exc)) from exc
    with cap_errors(mods, "connect to DCGM"):
        return connect(host, mods)


def power_cap_config(mods: types.SimpleNamespace, gpu_id: int, watts: float) -> Any:
    """A ``dcgmDeviceConfig_v1`` that sets only the power limit of ``gpu_id`` (everything else blank)."""
    s = mods.dcgm_structs
    cfg = s.c_dcgmDeviceConfig_v1()
    cfg.version = s.dcgmDeviceConfig_version1
    cfg.gpuId = gpu_id
    blank = getattr(s, "DCGM_INT32_BLANK", None) or _dcgmvalue_blank()
    cfg.mEccMode = blank
    cfg.mComputeMode = blank
    cfg.mPerfState.syncBoost = blank
    cfg.mPerfState.targetClocks.memClock = blank
    cfg.mPerfState.targetClocks.smClock = blank
    cfg.mPowerLimit.type = s.DCGM_CONFIG_POWER_CAP_INDIVIDUAL
    cfg.mPowerLimit.val = int(round(watts))
    return cfg


def _dcgmvalue_blank() -> int:
    try:
        import dcgmvalue  # type: ignore[import-not-found]

        return int(dcgmvalue.DCGM_INT32_BLANK)
    except (ImportError, AttributeError):
        return INT32_BLANK
