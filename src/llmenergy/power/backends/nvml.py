"""NVML backend (nvidia-ml-py's ``pynvml``).

Energy comes from the total-energy counter (field 83
``NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION``, the same mJ-since-driver-load counter as
``nvmlDeviceGetTotalEnergyConsumption``, which is the fallback).  Instant power is
field 186 ``NVML_FI_DEV_POWER_INSTANT`` (mW); where a driver lacks it we fall back
to ``nvmlDeviceGetPowerUsage`` (a 1-s average on Hopper), say so in the log and
mark that GPU's rows ``source = nvml-avg`` (:data:`AVERAGED_SOURCE`).
Both fields are read in one ``nvmlDeviceGetFieldValues`` call, first in every
sample, so they share one instant and the row's timestamp is theirs.  On the lent
H100 (driver 580) both values change every ~100 ms and one NVML call takes
~2.9 ms (``bench/nvml_probe.py``), so polling faster than ~25 Hz adds little.  The rest of a sample
(utilisation, memory, clocks, temperature, enforced limit, clock-event reasons,
power-cap throttle time, the number of processes holding a compute context on the
GPU other than the job's own: :mod:`llmenergy.power.processes`) is best effort: a metric the GPU does not support is asked once, then reported as null.

NVML itself (initialisation, GPUs by UUID, error mapping, units) is reached
through :mod:`~llmenergy.power.backends.nvml_lib`; tests patch
``llmenergy.power.backends.nvml_lib.pynvml`` with the fake.

Row times: a row is stamped with ``time.time_ns()`` taken by the collector just
before the field-values call, so a row's time is when NVML was *queried*, not
when the driver last updated the counter (it updates about every 100 ms and
trails the GPU's activity; docs/internals.md, "power samples").
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmenergy.power.processes import OtherProcessCount
from llmenergy.errors import SensorError
from llmenergy.power.backends import nvml_lib
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    select_devices,
    sensor_call,
)
from llmenergy.power.backends.nvml_lib import FI_DEV_POWER_INSTANT, FI_DEV_TOTAL_ENERGY_CONSUMPTION

log = logging.getLogger(__name__)

_BYTES_PER_MB = 1024 * 1024
#: The ``source`` of a GPU's rows whose ``power_w`` is NVML's averaged power, not field 186.
AVERAGED_SOURCE = "nvml-avg"


class NvmlBackend(PowerBackend):
    """Reads the NVML counters of exactly the GPUs named by ``uuid_list`` (all GPUs if None)."""

    name = "nvml"
    fast_power = True

    def __init__(self, uuid_list: list[str] | None = None, *, node: str | None = None) -> None:
        super().__init__(node=node)
        self._nvml: nvml_lib.NvmlSession | None = None
        self._handles: dict[int, Any] = {}
        self._devices: list[DeviceInfo] = []
        self._unsupported: dict[int, set[str]] = {}
        self._power_via_usage: set[int] = set()
        self._others = OtherProcessCount("nvml")  # of each GPU's compute processes at its full samples
        self._init()
        try:
            self._discover(uuid_list)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------
    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return nvml_lib.vendor_errors()

    def is_unavailable(self, exc: BaseException) -> bool:
        return nvml_lib.is_unavailable(exc)

    @sensor_call
    def _init(self) -> None:
        self._nvml = nvml_lib.NvmlSession()

    @sensor_call
    def _discover(self, uuid_list: list[str] | None) -> None:
        if self._nvml is None:
            raise SensorError("nvml: backend is closed")
        found: dict[str, DeviceInfo] = {}
        for index, uuid, name, handle in self._nvml.gpus():
            if uuid_list is not None and uuid not in uuid_list:
                continue
            found[uuid] = DeviceInfo(index=index, uuid=uuid, name=name, domain="gpu")
            self._handles[index] = handle
        self._devices = select_devices(found, uuid_list, missing_what="nvml: GPU UUID(s) not on this node")
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
        except nvml_lib.vendor_errors() as exc:
            if nvml_lib.error_in(exc, nvml_lib.FATAL_ERRORS):
                raise
            if nvml_lib.error_in(exc, nvml_lib.UNSUPPORTED_ERRORS):
                self._unsupported[device_index].add(key)
                log.info("nvml: GPU %d: %s unsupported (%s); reporting null", device_index, key, exc)
            else:
                log.debug("nvml: GPU %d: %s failed: %s", device_index, key, exc)
            return None

    @sensor_call
    def read_energy_mj(self, device_index: int) -> float | None:
        handle = self._handle(device_index)
        value = self._optional(
            device_index, "energy", lambda: nvml_lib.pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
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
        value = self._optional(device_index, "power_usage",
                               lambda: nvml_lib.pynvml.nvmlDeviceGetPowerUsage(handle))
        return nvml_lib.mw_to_w(value)

    def source_of(self, device_index: int) -> str:
        """``nvml``, or ``nvml-avg`` once a GPU's power comes from ``nvmlDeviceGetPowerUsage`` (a
        1-s average on Hopper): its rows then say so, and the instant-power integral with them."""
        return AVERAGED_SOURCE if device_index in self._power_via_usage else self.name

    def _read_instant_mw(self, device_index: int, handle: Any) -> float | None:
        if "power_instant" in self._unsupported[device_index]:
            return None
        values = self._optional(
            device_index,
            "power_instant",
            lambda: nvml_lib.pynvml.nvmlDeviceGetFieldValues(handle, [FI_DEV_POWER_INSTANT]),
        )
        return None if values is None else self._field_result(device_index, values[0], "power_instant")

    def _field_result(self, device_index: int, field: Any, key: str) -> float | None:
        """A field's value, or None; a field the GPU lacks is marked unsupported under ``key``."""
        if nvml_lib.field_unsupported(field):
            self._unsupported[device_index].add(key)
        return nvml_lib.field_value(field)

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
            lambda: nvml_lib.pynvml.nvmlDeviceGetFieldValues(
                handle, [FI_DEV_TOTAL_ENERGY_CONSUMPTION, FI_DEV_POWER_INSTANT]),
        )
        if values is None:
            return self.read_energy_mj(device_index), self.read_power_w(device_index)
        energy_mj = self._field_result(device_index, values[0], "energy_field")
        milliwatts = self._field_result(device_index, values[1], "power_instant")
        if energy_mj is None:
            energy_mj = self.read_energy_mj(device_index)
        power_w = nvml_lib.mw_to_w(milliwatts) if milliwatts is not None else self.read_power_w(device_index)
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
        nvml = nvml_lib.pynvml
        util = self._optional(i, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = self._optional(i, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        sm_clock = self._optional(i, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        mem_clock = self._optional(i, "mem_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
        temperature = self._optional(
            i, "temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        limit_mw = self._optional(i, "power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        reasons = self._optional(i, "clock_events", lambda: nvml_lib.NvmlSession.clock_event_reasons(handle))
        violation_ns = self._optional(i, "power_violation", lambda: nvml_lib.NvmlSession.power_violation_ns(handle))
        processes = self._optional(i, "processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        return make_row(
            node=self.node,
            device=dev,
            timestamp_ns=timestamp_ns,
            source=self.source_of(i),
            energy_mj=energy_mj,
            power_w=power_w,
            gpu_util_pct=None if util is None else float(util.gpu),
            mem_util_pct=None if util is None else float(util.memory),
            mem_used_mb=None if memory is None else memory.used / _BYTES_PER_MB,
            sm_clock_mhz=None if sm_clock is None else float(sm_clock),
            mem_clock_mhz=None if mem_clock is None else float(mem_clock),
            temperature_c=None if temperature is None else float(temperature),
            power_limit_w=nvml_lib.mw_to_w(limit_mw),
            clock_event_reasons=reasons,
            power_cap_throttle_ns=violation_ns,
            other_processes=self._others.count(i, processes, self.own_pids),
        )

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            nvml.close()
