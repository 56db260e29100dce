"""NVML backend (nvidia-ml-py's ``pynvml``).

Energy comes from the total-energy counter (field 83
``NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION``, the same mJ-since-driver-load counter as
``nvmlDeviceGetTotalEnergyConsumption``, which is the fallback).  Instant power is
field 186 ``NVML_FI_DEV_POWER_INSTANT`` (mW); where a driver lacks it we fall back
to ``nvmlDeviceGetPowerUsage`` (a 1-s average on Hopper) and say so in the log.
Both fields are read in one ``nvmlDeviceGetFieldValues`` call, first in every
sample, so they share one instant and the row's timestamp is theirs.  On the lent
H100 (driver 580) both values change every ~100 ms and one NVML call takes
~2.9 ms (``bench/nvml_probe.py``), so polling faster than ~25 Hz adds little.  The rest of a sample
(utilisation, memory, clocks, temperature, enforced limit, clock-event reasons,
power-cap throttle time) is best effort: a metric the GPU does not support is
asked once, then reported as null.

``pynvml`` is imported at module level so tests patch
``llmenergy.power.backends.nvml.pynvml`` with a fake.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pynvml

from llmenergy.errors import SensorError
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    select_devices,
    sensor_call,
    vendor_text,
)

log = logging.getLogger(__name__)

FI_DEV_TOTAL_ENERGY_CONSUMPTION = 83
FI_DEV_POWER_INSTANT = 186
_BYTES_PER_MB = 1024 * 1024


def _error_code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def _code(name: str) -> int | None:
    return getattr(pynvml, name, None)


class NvmlBackend(PowerBackend):
    """Reads the NVML counters of exactly the GPUs named by ``uuids`` (all GPUs if None)."""

    name = "nvml"
    fast_power = True

    def __init__(self, uuids: list[str] | None = None, *, node: str | None = None) -> None:
        super().__init__(node=node)
        self._open = False
        self._handles: dict[int, Any] = {}
        self._devices: list[DeviceInfo] = []
        self._unsupported: dict[int, set[str]] = {}
        self._power_via_usage: set[int] = set()
        self._init()
        self._open = True
        try:
            self._discover(uuids)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------
    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return (pynvml.NVMLError,)

    def is_unavailable(self, exc: BaseException) -> bool:
        codes = {
            _code("NVML_ERROR_LIBRARY_NOT_FOUND"),
            _code("NVML_ERROR_DRIVER_NOT_LOADED"),
            _code("NVML_ERROR_FUNCTION_NOT_FOUND"),
            _code("NVML_ERROR_NOT_SUPPORTED"),
            _code("NVML_ERROR_NO_PERMISSION"),
            _code("NVML_ERROR_NOT_FOUND"),
        } - {None}
        return _error_code(exc) in codes

    @sensor_call
    def _init(self) -> None:
        pynvml.nvmlInit()

    @sensor_call
    def _discover(self, uuids: list[str] | None) -> None:
        found: dict[str, DeviceInfo] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = vendor_text(pynvml.nvmlDeviceGetUUID(handle))
            if uuids is not None and uuid not in uuids:
                continue
            found[uuid] = DeviceInfo(
                index=index,
                uuid=uuid,
                name=vendor_text(pynvml.nvmlDeviceGetName(handle)),
                domain="gpu",
            )
            self._handles[index] = handle
        self._devices = select_devices(found, uuids, missing_what="nvml: GPU UUID(s) not on this node")
        for dev in self._devices:
            self._unsupported[dev.index] = set()
        log.info("nvml: watching %s", ", ".join(f"{d.index}:{d.uuid}" for d in self._devices))

    # -- interface ---------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    def _handle(self, device_index: int) -> Any:
        try:
            return self._handles[device_index]
        except KeyError:
            raise SensorError(f"nvml: GPU index {device_index} is not watched") from None

    def _optional(self, device_index: int, key: str, read: Callable[[], Any]) -> Any:
        """Run one optional read; unsupported metrics become None (and are not asked again)."""
        if key in self._unsupported[device_index]:
            return None
        try:
            return read()
        except AttributeError:  # function missing from this pynvml
            self._unsupported[device_index].add(key)
            log.info("nvml: GPU %d: %s not in this pynvml; reporting null", device_index, key)
            return None
        except pynvml.NVMLError as exc:
            code = _error_code(exc)
            if code in (_code("NVML_ERROR_GPU_IS_LOST"), _code("NVML_ERROR_UNINITIALIZED")):
                raise
            if code in (_code("NVML_ERROR_NOT_SUPPORTED"), _code("NVML_ERROR_FUNCTION_NOT_FOUND"),
                        _code("NVML_ERROR_NO_PERMISSION")):
                self._unsupported[device_index].add(key)
                log.info("nvml: GPU %d: %s unsupported (%s); reporting null", device_index, key, exc)
            else:
                log.debug("nvml: GPU %d: %s failed: %s", device_index, key, exc)
            return None

    @sensor_call
    def read_energy_mj(self, device_index: int) -> float | None:
        handle = self._handle(device_index)
        value = self._optional(
            device_index, "energy", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        )
        return None if value is None else float(value)

    @sensor_call
    def read_power_w(self, device_index: int) -> float | None:
        handle = self._handle(device_index)
        if device_index not in self._power_via_usage:
            milliwatts = self._read_instant_mw(device_index, handle)
            if milliwatts is not None:
                return milliwatts / 1000.0
            if "power_instant" in self._unsupported[device_index]:
                self._power_via_usage.add(device_index)
                log.warning("nvml: GPU %d: field 186 (instant power) unsupported; "
                            "falling back to nvmlDeviceGetPowerUsage (averaged)", device_index)
            else:
                return None
        value = self._optional(device_index, "power_usage", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        return None if value is None else value / 1000.0

    def _read_instant_mw(self, device_index: int, handle: Any) -> float | None:
        if "power_instant" in self._unsupported[device_index]:
            return None
        values = self._optional(
            device_index,
            "power_instant",
            lambda: pynvml.nvmlDeviceGetFieldValues(handle, [FI_DEV_POWER_INSTANT]),
        )
        return None if values is None else self._field_result(device_index, values[0], "power_instant")

    def _field_result(self, device_index: int, field: Any, key: str) -> float | None:
        """A field's value, or None; a field the GPU lacks is marked unsupported under ``key``."""
        ret = getattr(field, "nvmlReturn", 0)
        if ret != 0:  # NVML_SUCCESS
            if ret in (_code("NVML_ERROR_NOT_SUPPORTED"), _code("NVML_ERROR_FUNCTION_NOT_FOUND")):
                self._unsupported[device_index].add(key)
            return None
        return _field_value(field)

    @sensor_call
    def read_energy_and_power(self, device_index: int) -> tuple[float | None, float | None]:
        """Counter (mJ) and instant power (W) from one field-values call; per-metric fallbacks."""
        handle = self._handle(device_index)
        unsupported = self._unsupported[device_index]
        if "energy_field" in unsupported or "power_instant" in unsupported:
            return self.read_energy_mj(device_index), self.read_power_w(device_index)
        values = self._optional(
            device_index,
            "energy_field",
            lambda: pynvml.nvmlDeviceGetFieldValues(
                handle, [FI_DEV_TOTAL_ENERGY_CONSUMPTION, FI_DEV_POWER_INSTANT]),
        )
        if values is None:
            return self.read_energy_mj(device_index), self.read_power_w(device_index)
        energy_mj = self._field_result(device_index, values[0], "energy_field")
        milliwatts = self._field_result(device_index, values[1], "power_instant")
        if energy_mj is None:
            energy_mj = self.read_energy_mj(device_index)
        power_w = milliwatts / 1000.0 if milliwatts is not None else self.read_power_w(device_index)
        return energy_mj, power_w

    @sensor_call
    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        rows = []
        for dev in self._devices:
            rows.append(self._sample_device(dev, timestamp_ns))
        return rows

    def _sample_device(self, dev: DeviceInfo, timestamp_ns: int) -> dict[str, Any]:
        i, handle = dev.index, self._handle(dev.index)
        energy_mj, power_w = self.read_energy_and_power(i)  # first: closest to timestamp_ns
        util = self._optional(i, "utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        memory = self._optional(i, "memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        sm_clock = self._optional(i, "sm_clock", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        mem_clock = self._optional(
            i, "mem_clock", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        )
        temperature = self._optional(
            i, "temperature", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        )
        limit_mw = self._optional(i, "power_limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        reasons = self._optional(i, "clock_events", lambda: self._clock_event_reasons(handle))
        violation = self._optional(
            i,
            "power_violation",
            lambda: pynvml.nvmlDeviceGetViolationStatus(handle, pynvml.NVML_PERF_POLICY_POWER),
        )
        return make_row(
            node=self.node,
            device=dev,
            timestamp_ns=timestamp_ns,
            source=self.name,
            energy_mj=energy_mj,
            power_w=power_w,
            gpu_util_pct=None if util is None else float(util.gpu),
            mem_util_pct=None if util is None else float(util.memory),
            mem_used_mb=None if memory is None else memory.used / _BYTES_PER_MB,
            sm_clock_mhz=None if sm_clock is None else float(sm_clock),
            mem_clock_mhz=None if mem_clock is None else float(mem_clock),
            temperature_c=None if temperature is None else float(temperature),
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            clock_event_reasons=None if reasons is None else int(reasons),
            power_cap_throttle_ns=None if violation is None else int(violation.violationTime),
        )

    @staticmethod
    def _clock_event_reasons(handle: Any) -> int:
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is None:
            getter = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(getter(handle))

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.warning("nvml: shutdown failed: %s", exc)


def _field_value(field: Any) -> float | None:
    """Decode a ``c_nvmlFieldValue_t`` union by its ``valueType``."""
    members = {
        _code("NVML_VALUE_TYPE_DOUBLE"): "dVal",
        _code("NVML_VALUE_TYPE_UNSIGNED_INT"): "uiVal",
        _code("NVML_VALUE_TYPE_UNSIGNED_LONG"): "ulVal",
        _code("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG"): "ullVal",
        _code("NVML_VALUE_TYPE_SIGNED_LONG_LONG"): "sllVal",
        _code("NVML_VALUE_TYPE_SIGNED_INT"): "siVal",
        _code("NVML_VALUE_TYPE_UNSIGNED_SHORT"): "usVal",
    }
    member = members.get(getattr(field, "valueType", None))
    if member is None:
        return None
    return float(getattr(field.value, member))
