"""NVML for all of llmenergy: initialisation, GPUs by UUID, error mapping and units.

Every use of NVML goes through this module: the collector backend
(:mod:`~llmenergy.power.backends.nvml`), the power-cap backend
(:mod:`llmenergy.power.caps`) and provenance (the driver version).  Nothing else
imports ``pynvml``.  It is imported here at module level, so tests patch
``llmenergy.power.backends.nvml_lib.pynvml`` with the fake (``tests/fakes/fake_nvml.py``).

Initialisation is counted per process: the first :class:`NvmlSession` calls
``nvmlInit``, the last one closed calls ``nvmlShutdown``.  Sessions return
vendor values and raise vendor errors; callers map those errors with
:func:`sensor_errors` (→ :class:`~llmenergy.errors.SensorError`, or
``SensorUnavailable`` when NVML is not usable here) or :func:`cap_errors`
(→ ``PowerCapDenied`` on a permission refusal, else ``PowerCapError``).
NVML reports milliwatts and millijoules: :func:`mw_to_w` converts.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pynvml

from llmenergy.errors import PowerCapDenied, PowerCapError
from llmenergy.power.backends.base import map_sensor_errors, vendor_text

log = logging.getLogger(__name__)

FI_DEV_TOTAL_ENERGY_CONSUMPTION = 83  # mJ since the driver loaded
FI_DEV_POWER_INSTANT = 186  # mW
#: Error names meaning "NVML is not usable on this node" (→ SensorUnavailable).
UNAVAILABLE_ERRORS: tuple[str, ...] = (
    "NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_NOT_FOUND",
)
#: Error names meaning "this metric does not exist here" (asked once, then reported as null).
UNSUPPORTED_ERRORS: tuple[str, ...] = (
    "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION",
)
#: ``nvmlReturn`` names of a field the GPU or driver lacks.
FIELD_UNSUPPORTED_ERRORS: tuple[str, ...] = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND")
#: Error names after which no read of that GPU can succeed.
FATAL_ERRORS: tuple[str, ...] = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_UNINITIALIZED")

_lock = threading.Lock()
_refs = 0
_owner: Any = None  # the pynvml module the count belongs to (tests swap it)


# -- errors and units --------------------------------------------------------------
def code(name: str) -> int | None:
    """The value of the NVML constant ``name``, None when this pynvml lacks it."""
    return getattr(pynvml, name, None)


def error_code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def error_in(exc: BaseException, names: tuple[str, ...]) -> bool:
    """True when ``exc`` is an NVML error whose code is one of ``names``."""
    codes = {code(n) for n in names} - {None}
    return isinstance(exc, pynvml.NVMLError) and error_code(exc) in codes


def vendor_errors() -> tuple[type[BaseException], ...]:
    return (pynvml.NVMLError,)


def is_unavailable(exc: BaseException) -> bool:
    return error_in(exc, UNAVAILABLE_ERRORS)


@contextlib.contextmanager
def sensor_errors(what: str) -> Iterator[None]:
    """NVML errors → SensorUnavailable (NVML not usable here) or SensorError."""
    with map_sensor_errors("nvml", vendor_errors(), what=what, unavailable=is_unavailable):
        yield


@contextlib.contextmanager
def cap_errors(what: str, uuid: str | None = None) -> Iterator[None]:
    """NVML errors → PowerCapDenied (no permission) or PowerCapError, naming the GPU."""
    try:
        yield
    except pynvml.NVMLError as exc:
        where = f"nvml: {uuid}: " if uuid else "nvml: "
        if error_in(exc, ("NVML_ERROR_NO_PERMISSION",)):
            raise PowerCapDenied(f"{where}{what}: no permission (setting power limits needs root)") from exc
        raise PowerCapError(f"{where}{what}: {exc}") from exc


def mw_to_w(milliwatts: float | None) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


def field_value(field: Any) -> float | None:
    """A ``c_nvmlFieldValue_t``'s value by its ``valueType``; None when the read failed or the type is unknown."""
    if getattr(field, "nvmlReturn", 0) != 0:  # NVML_SUCCESS
        return None
    members = {
        code("NVML_VALUE_TYPE_DOUBLE"): "dVal",
        code("NVML_VALUE_TYPE_UNSIGNED_INT"): "uiVal",
        code("NVML_VALUE_TYPE_UNSIGNED_LONG"): "ulVal",
        code("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG"): "ullVal",
        code("NVML_VALUE_TYPE_SIGNED_LONG_LONG"): "sllVal",
        code("NVML_VALUE_TYPE_SIGNED_INT"): "siVal",
        code("NVML_VALUE_TYPE_UNSIGNED_SHORT"): "usVal",
    }
    member = members.get(getattr(field, "valueType", None))
    return None if member is None else float(getattr(field.value, member))


def field_unsupported(field: Any) -> bool:
    """True when a field read failed because the GPU or driver lacks the field."""
    ret = getattr(field, "nvmlReturn", 0)
    return ret != 0 and ret in {code(n) for n in FIELD_UNSUPPORTED_ERRORS} - {None}


# -- initialisation, counted per process ---------------------------------------------
def _init() -> None:
    global _refs, _owner
    with _lock:
        if _owner is not pynvml:  # another pynvml (a test's fake): its own count
            _refs, _owner = 0, pynvml
        if _refs == 0:
            pynvml.nvmlInit()
        _refs += 1


def _shutdown() -> None:
    global _refs
    with _lock:
        if _owner is not pynvml or _refs <= 0:
            return
        _refs -= 1
        if _refs == 0:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                log.warning("nvml: shutdown failed: %s", exc)


class NvmlSession:
    """NVML initialised for as long as this session is open; GPUs by index or UUID.

    Raises vendor errors (``pynvml.NVMLError``), to be mapped by the caller.
    """

    def __init__(self) -> None:
        self._open = False
        _init()
        self._open = True
        self._by_uuid: dict[str, Any] = {}

    def count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def handle_by_index(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def handle(self, uuid: str) -> Any:
        """The handle of the GPU with ``uuid`` (cached)."""
        if uuid not in self._by_uuid:
            self._by_uuid[uuid] = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return self._by_uuid[uuid]

    def gpus(self) -> list[tuple[int, str, str, Any]]:
        """``(index, uuid, name, handle)`` of every GPU NVML sees, by index."""
        out = []
        for index in range(self.count()):
            handle = self.handle_by_index(index)
            uuid = vendor_text(pynvml.nvmlDeviceGetUUID(handle))
            self._by_uuid.setdefault(uuid, handle)
            out.append((index, uuid, vendor_text(pynvml.nvmlDeviceGetName(handle)), handle))
        return out

    def driver_version(self) -> str:
        return vendor_text(pynvml.nvmlSystemGetDriverVersion())

    @staticmethod
    def clock_event_reasons(handle: Any) -> int:
        """The clock-event (throttle) reason bits; older pynvml names the function "throttle reasons"."""
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is None:
            getter = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(getter(handle))

    @staticmethod
    def power_violation_ns(handle: Any) -> int:
        """Cumulative time the GPU was held back by its power limit, ns."""
        policy = getattr(pynvml, "NVML_PERF_POLICY_POWER", 0)
        return int(pynvml.nvmlDeviceGetViolationStatus(handle, policy).violationTime)

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        """Release this session's share of NVML; safe to call twice."""
        if self._open:
            self._open = False
            _shutdown()

    def __enter__(self) -> NvmlSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def driver_version() -> str | None:
    """The NVIDIA driver version, or None where NVML is not usable."""
    try:
        with NvmlSession() as nvml:
            return nvml.driver_version()
    except pynvml.NVMLError as exc:
        log.debug("nvml: no driver version: %s", exc)
        return None
