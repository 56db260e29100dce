"""DCGM backend: a ``DcgmReader`` over the GPUs named by UUID.

DCGM itself (the bindings, the host-engine connection, error mapping, units,
field ids) is reached through :mod:`~llmenergy.power.backends.dcgm_lib`.  The
reader watches :data:`BASE_FIELDS` plus, when allowed, the profiling fields
:data:`PROFILING_FIELDS`; if watching those fails (non-root host engine, GPU
without profiling, another profiler active) it falls back to the base fields.

Row times are DCGM's own: values are read with
``GetAllGpuValuesAsFieldIdDictSinceLastCall()``, which keeps each value's
sample time (``.ts``, µs since the epoch, taken by the host engine when it read
the sensor), not ``GetLatestGpuValuesAsFieldIdDict()``, which drops it.  Each
:meth:`DcgmBackend.sample` returns one row per device and per new sample instant
of the energy or power fields since the previous call, stamped with that
instant (µs → ns, the same wall clock as every ``*_ns``); the other fields carry
their latest value at or before it.  The ``timestamp_ns`` the collector passes
(when it asked) is not used.  A standalone ``nv-hostengine`` on another host
stamps with that host's clock.

DCGM lists no processes, so the count of processes holding a compute context on a GPU other
than the job's own (``other_processes``: :mod:`llmenergy.power.processes`) comes from NVML, as
in the NVML backend: listed at each :meth:`DcgmBackend.sample` and set on that call's last
row of each GPU. Where NVML is not usable beside DCGM or does not see the GPU, the column is
null, said once in the log.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends import dcgm_lib, nvml_lib
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    select_devices,
    sensor_call,
)
from llmenergy.power.backends.dcgm_lib import (  # noqa: F401 - re-exported for callers and tests
    BASE_FIELDS,
    DCGM_BINDING_DIRS,
    FI_CLOCK_EVENT_REASONS,
    FI_ENFORCED_POWER_LIMIT_W,
    FI_FB_USED_MB,
    FI_GPU_TEMP,
    FI_GPU_UTIL,
    FI_MEM_CLOCK,
    FI_MEM_COPY_UTIL,
    FI_POWER_INSTANT_W,
    FI_POWER_MGMT_LIMIT_W,
    FI_POWER_USAGE_W,
    FI_POWER_VIOLATION_US,
    FI_PROF_DRAM_ACTIVE,
    FI_PROF_SM_ACTIVE,
    FI_PROF_TENSOR_ACTIVE,
    FI_SM_CLOCK,
    FI_TOTAL_ENERGY_MJ,
    PROFILING_FIELDS,
    as_float,
    clean,
    load_bindings,
)
from llmenergy.power.processes import OtherProcessCount

log = logging.getLogger(__name__)

#: The fields whose sample instants make rows: the energy counter and the two power fields.
ROW_FIELDS: tuple[int, ...] = (FI_TOTAL_ENERGY_MJ, FI_POWER_INSTANT_W, FI_POWER_USAGE_W)

Sample = tuple[int, Any]  # (timestamp_ns, value or None)


class DcgmBackend(PowerBackend):
    """Watches exactly the GPUs named by ``uuid_list`` through a DcgmReader."""

    name = "dcgm"

    def __init__(
        self,
        uuid_list: list[str] | None = None,
        *,
        interval_ms: int = 100,
        host: str | None = None,
        profiling: bool = True,
        max_keep_age_s: float = 600.0,
        node: str | None = None,
    ) -> None:
        super().__init__(node=node)
        self._mods = load_bindings()
        self._host = dcgm_lib.host_address(host)
        self._interval_us = int(interval_ms) * 1000
        self._max_keep_age_s = float(max_keep_age_s)
        self._conn: dcgm_lib.DcgmConnection | None = None
        self._reader: Any = None
        self._failed_reader: Any = None
        self._devices: list[DeviceInfo] = []
        self.fields: tuple[int, ...] = ()
        # per GPU id: field id -> samples (time-ordered; the last one is the latest value)
        self._history: dict[int, dict[int, list[Sample]]] = {}
        # per GPU id: instants (ns) of new ROW_FIELDS samples not yet returned by sample()
        self._pending: dict[int, set[int]] = {}
        self._nvml: nvml_lib.NvmlSession | None = None  # the processes' listing (DCGM has none)
        self._others = OtherProcessCount("dcgm")
        self._unlisted: set[str] = set()  # GPUs whose listing NVML refused
        try:
            self._connect()
            self._discover(uuid_list)
            self._watch(profiling)
            self._open_nvml()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------
    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return dcgm_lib.vendor_errors(self._mods)

    def is_unavailable(self, exc: BaseException) -> bool:
        return dcgm_lib.is_unavailable(self._mods, exc)

    @sensor_call
    def _connect(self) -> None:
        self._conn = dcgm_lib.connect(self._host, self._mods)

    @sensor_call
    def _discover(self, uuid_list: list[str] | None) -> None:
        if self._conn is None:
            raise SensorError("dcgm: backend is closed")
        found = {uuid: DeviceInfo(index=gpu_id, uuid=uuid, name=name, domain="gpu")
                 for gpu_id, uuid, name in self._conn.gpus() if uuid_list is None or uuid in uuid_list}
        self._devices = select_devices(found, uuid_list, missing_what="dcgm: GPU UUID(s) not seen by DCGM")
        if not self._devices:
            raise SensorUnavailable("dcgm: no supported GPUs")
        self._history = {d.index: {} for d in self._devices}
        self._pending = {d.index: set() for d in self._devices}

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
        with dcgm_lib.sensor_errors(self._mods, "watch"):
            self._reader = self._new_reader(BASE_FIELDS)
        self.fields = BASE_FIELDS

    def _new_reader(self, fields: tuple[int, ...]) -> Any:
        if self._conn is None:
            raise SensorError("dcgm: backend is closed")
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
        reader.SetHandle(self._conn.handle.handle)
        self._failed_reader = None
        log.info("dcgm: watching fields %s on GPU ids %s every %d us",
                 list(fields), [d.index for d in self._devices], self._interval_us)
        return reader

    def _open_nvml(self) -> None:
        try:
            self._nvml = nvml_lib.NvmlSession()
        except nvml_lib.vendor_errors() as exc:
            log.warning("dcgm: NVML not usable beside DCGM (%s): other_processes is null "
                        "(a GPU shared with another job is not flagged)", exc)

    def _processes(self, dev: DeviceInfo) -> list[Any] | None:
        """NVML's list of the processes holding a compute context on ``dev``; None where it has none
        to give (unsupported, refused: asked once, logged; another failure: this time only)."""
        if self._nvml is None or dev.uuid in self._unlisted:
            return None
        try:
            return list(nvml_lib.pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml.handle(dev.uuid)))
        except (AttributeError, *nvml_lib.vendor_errors()) as exc:
            if isinstance(exc, AttributeError) or nvml_lib.error_in(exc, nvml_lib.UNSUPPORTED_ERRORS
                                                                     + nvml_lib.UNAVAILABLE_ERRORS):
                self._unlisted.add(dev.uuid)
                log.warning("dcgm: GPU %s: NVML lists no processes (%s); other_processes is null", dev.uuid, exc)
            else:
                log.debug("dcgm: GPU %s: listing processes failed: %s", dev.uuid, exc)
            return None

    # -- reading -----------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    @sensor_call
    def refresh(self) -> None:
        """Fetch every value DCGM sampled since the last call, with its sample time."""
        if self._reader is None:
            raise SensorError("dcgm: backend is closed")
        for gpu_id, fields in self._reader.GetAllGpuValuesAsFieldIdDictSinceLastCall().items():
            history = self._history.get(int(gpu_id))
            if history is None:
                continue
            for field_id, values in fields.items():
                samples = history.setdefault(int(field_id), [])
                for value in values:
                    timestamp_ns = dcgm_lib.us_to_ns(value.ts)
                    blank = bool(getattr(value, "isBlank", False))
                    samples.append((timestamp_ns, None if blank else clean(value.value)))
                    if int(field_id) in ROW_FIELDS:
                        self._pending[int(gpu_id)].add(timestamp_ns)
                samples.sort(key=lambda sample: sample[0])

    def latest(self, device_index: int) -> dict[int, Any]:
        """The latest value of every watched field of one GPU (after a refresh): {field_id: value}."""
        self.device(device_index)
        self.refresh()
        return {fid: samples[-1][1] for fid, samples in self._history[device_index].items() if samples}

    def read_energy_mj(self, device_index: int) -> float | None:
        return as_float(self.latest(device_index).get(FI_TOTAL_ENERGY_MJ))

    def read_power_w(self, device_index: int) -> float | None:
        return _power_w(self.latest(device_index))

    def read_profiling(self, device_index: int) -> dict[str, float | None]:
        """Profiling ratios (0..1) of one GPU; all None when profiling is not watched.

        The power-sample schema has no columns for these; callers that want them
        read them here.
        """
        values = self.latest(device_index)
        return {
            "sm_active": as_float(values.get(FI_PROF_SM_ACTIVE)),
            "tensor_active": as_float(values.get(FI_PROF_TENSOR_ACTIVE)),
            "dram_active": as_float(values.get(FI_PROF_DRAM_ACTIVE)),
        }

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        """One row per device and per new DCGM sample instant, stamped with that instant.

        ``timestamp_ns`` (when the collector asked) is not used: see the module docstring.
        """
        self.refresh()
        rows = []
        for dev in self._devices:
            instants = sorted(self._pending[dev.index])
            self._pending[dev.index].clear()
            history = self._history[dev.index]
            for instant_ns in instants:
                rows.append(self._row(dev, instant_ns, _values_at(history, instant_ns)))
            if instants:  # later rows need each field's value at the last row and what came after
                for samples in history.values():
                    _drop_before(samples, instants[-1])
                rows[-1]["other_processes"] = self._others.count(dev.index, self._processes(dev), self.own_pids)
        return rows

    def _row(self, dev: DeviceInfo, timestamp_ns: int, v: dict[int, Any]) -> dict[str, Any]:
        limit = as_float(v.get(FI_ENFORCED_POWER_LIMIT_W))
        if limit is None:
            limit = as_float(v.get(FI_POWER_MGMT_LIMIT_W))
        reasons = clean(v.get(FI_CLOCK_EVENT_REASONS))
        violation_us = clean(v.get(FI_POWER_VIOLATION_US))
        return make_row(
            node=self.node,
            device=dev,
            timestamp_ns=timestamp_ns,
            source=self.name,
            energy_mj=as_float(v.get(FI_TOTAL_ENERGY_MJ)),
            power_w=_power_w(v),
            gpu_util_pct=as_float(v.get(FI_GPU_UTIL)),
            mem_util_pct=as_float(v.get(FI_MEM_COPY_UTIL)),
            mem_used_mb=as_float(v.get(FI_FB_USED_MB)),
            sm_clock_mhz=as_float(v.get(FI_SM_CLOCK)),
            mem_clock_mhz=as_float(v.get(FI_MEM_CLOCK)),
            temperature_c=as_float(v.get(FI_GPU_TEMP)),
            power_limit_w=limit,
            clock_event_reasons=None if reasons is None else int(reasons),
            power_cap_throttle_ns=None if violation_us is None else int(violation_us) * 1000,
        )

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
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            nvml.close()


def _values_at(history: dict[int, list[Sample]], timestamp_ns: int) -> dict[int, Any]:
    """Each field's latest value sampled at or before ``timestamp_ns`` (fields with none are left out)."""
    out = {}
    for field_id, samples in history.items():
        earlier = [value for ts, value in samples if ts <= timestamp_ns]
        if earlier:
            out[field_id] = earlier[-1]
    return out


def _drop_before(samples: list[Sample], timestamp_ns: int) -> None:
    """Drop the samples older than the latest one at or before ``timestamp_ns``."""
    at_or_before = [i for i, (ts, _value) in enumerate(samples) if ts <= timestamp_ns]
    if at_or_before:
        del samples[:at_or_before[-1]]


def _power_w(values: dict[int, Any]) -> float | None:
    power = as_float(values.get(FI_POWER_INSTANT_W))
    return power if power is not None else as_float(values.get(FI_POWER_USAGE_W))
