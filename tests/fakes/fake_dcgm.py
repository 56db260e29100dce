"""FAKE DCGM for tests: NVIDIA's Python bindings as llmenergy uses them, monitoring and power caps.

Nothing here touches a GPU.  The folder ``tests/fakes/dcgm`` holds thin shims
named like the binding modules (``pydcgm``, ``dcgm_structs``, ``dcgm_fields``,
``dcgmvalue``, ``DcgmReader``) that re-export this module: point
``$DCGM_PYTHON_PATH`` at that folder, with this module importable (``tests/fakes``
on ``PYTHONPATH``, or loaded beforehand).

The host engine (:data:`engine`) sees the GPUs of a fake NVML node (its
``nvml``; by default the one of ``$FAKE_NVML_STATE``), as on a real node where
DCGM drives NVML: GPU id = position in ``gpus``.  Its calls are logged to that
node's call log with ``"api": "dcgm"``.

Monitoring: a GPU's ``"dcgm"`` key lists samples ``[ts_us, {field_id: value}]``
in time order (``ts_us``: µs since the epoch, when the engine read the sensor);
without it every read samples the GPU's NVML keys at the current time.  A value
of ``None`` or a DCGM blank sentinel is blank.  ``DcgmReader`` follows NVIDIA's
class: ``GetLatestGpuValuesAsFieldIdDict()`` returns bare values (no times),
``GetAllGpuValuesAsFieldIdDictSinceLastCall()`` lists every value since the
previous call with its ``.ts``.

Power caps: ``config.Set`` with only the power limit non-blank changes the
GPU's ``limit_mw``; ``deny_set`` makes it fail with DCGM_ST_REQUIRES_ROOT (what a
non-root host engine answers); ``set_error`` with DCGM_ST_GENERIC_ERROR; a config
whose other fields are not blank is refused with DCGM_ST_BADPARAM (the real
engine would change ECC, compute mode or clocks).  ``dcgm_connect_error`` in the
node's state makes connecting fail with that status.
"""
from __future__ import annotations

import os
import time
import types
from typing import Any

import fake_nvml

FAKE_MODULE = "fake_dcgm"

# -- dcgm_structs ---------------------------------------------------------------------
DCGM_OPERATION_MODE_AUTO = 1
DCGM_OPERATION_MODE_MANUAL = 2

DCGM_ST_OK = 0
DCGM_ST_BADPARAM = -1
DCGM_ST_GENERIC_ERROR = -3
DCGM_ST_NOT_SUPPORTED = -6
DCGM_ST_INIT_ERROR = -7
DCGM_ST_NVML_ERROR = -8
DCGM_ST_UNKNOWN_FIELD = -13
DCGM_ST_NO_DATA = -14
DCGM_ST_CONNECTION_NOT_VALID = -21
DCGM_ST_GPU_NOT_SUPPORTED = -22
DCGM_ST_LIBRARY_NOT_FOUND = -25
DCGM_ST_REQUIRES_ROOT = -29
DCGM_ST_PROFILING_NOT_SUPPORTED = -36

DCGM_CONFIG_POWER_CAP_INDIVIDUAL = 0
DCGM_INT32_BLANK = 0x7FFFFFF0
DCGM_INT64_BLANK = 0x7FFFFFFFFFFFFFF0
DCGM_FP64_BLANK = 140737488355328.0
dcgmDeviceConfig_version1 = 0x1000000 | 96


class DCGMError(Exception):
    """Like the real one: ``DCGMError(status)`` is an instance of that status's subclass."""

    _classes: dict[int, type] = {}

    def __new__(cls, value: int) -> DCGMError:
        if cls is DCGMError:
            cls = DCGMError._classes.get(value, cls)
        return Exception.__new__(cls)

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"DCGM error {self.value} (fake)"


def dcgmExceptionClass(status: int) -> type:  # noqa: N802 - vendor name
    if status not in DCGMError._classes:
        DCGMError._classes[status] = type(f"DCGMError_{abs(status)}", (DCGMError,), {})
    return DCGMError._classes[status]


class _Clocks:
    def __init__(self) -> None:
        self.version = 0
        self.memClock = 0
        self.smClock = 0


class c_dcgmConfigPerfStateSettings_t:  # noqa: N801 - vendor name
    def __init__(self) -> None:
        self.syncBoost = 0
        self.targetClocks = _Clocks()


class c_dcgmConfigPowerLimit:  # noqa: N801
    def __init__(self) -> None:
        self.type = 0
        self.val = 0


class c_dcgmDeviceConfig_v1:  # noqa: N801
    def __init__(self) -> None:
        self.version = 0
        self.gpuId = 0
        self.mEccMode = 0
        self.mComputeMode = 0
        self.mPerfState = c_dcgmConfigPerfStateSettings_t()
        self.mPowerLimit = c_dcgmConfigPowerLimit()


# -- dcgm_fields ------------------------------------------------------------------------
DCGM_FI_DEV_SM_CLOCK = 100
DCGM_FI_DEV_MEM_CLOCK = 101
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS = 112
DCGM_FI_DEV_GPU_TEMP = 150
DCGM_FI_DEV_POWER_USAGE = 155
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 156
DCGM_FI_DEV_POWER_USAGE_INSTANT = 157
DCGM_FI_DEV_POWER_MGMT_LIMIT = 160
DCGM_FI_DEV_POWER_MGMT_LIMIT_MIN = 161
DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX = 162
DCGM_FI_DEV_POWER_MGMT_LIMIT_DEF = 163
DCGM_FI_DEV_ENFORCED_POWER_LIMIT = 164
DCGM_FI_DEV_GPU_UTIL = 203
DCGM_FI_DEV_MEM_COPY_UTIL = 204
DCGM_FI_DEV_POWER_VIOLATION = 240
DCGM_FI_DEV_FB_TOTAL = 250
DCGM_FI_DEV_FB_FREE = 251
DCGM_FI_DEV_FB_USED = 252
DCGM_FI_PROF_SM_ACTIVE = 1002
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE = 1004
DCGM_FI_PROF_DRAM_ACTIVE = 1005
PROFILING_FIELD_IDS = frozenset(range(1001, 1013))


# -- the host engine -------------------------------------------------------------------
class Engine:
    """What the fake host engine holds; tests :meth:`reset` it and inspect it afterwards."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, nvml: fake_nvml.FakeNvml | None = None, *, allow_profiling: bool = True,
              hostengines: tuple[str, ...] = (), library: bool = True) -> Engine:
        self.nvml = nvml or fake_nvml.ENV
        self.profiling_allowed = allow_profiling
        self.hostengine_addresses: set[str] = set(hostengines)
        self.library_present = library
        self.next_id = 100
        self.handles: dict[int, dict[str, Any]] = {}       # id -> {"address", "open", "op_mode"}
        self.groups: dict[int, dict[str, Any]] = {}        # id -> {"name", "gpu_ids", "alive"}
        self.field_groups: dict[int, dict[str, Any]] = {}  # id -> {"name", "field_ids", "alive"}
        self.watches: list[dict[str, Any]] = []            # {"group", "field_group", "update_us", "max_keep_age_s"}
        return self

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def live_watches(self) -> list[dict[str, Any]]:
        return [w for w in self.watches
                if self.groups[w["group"]]["alive"] and self.field_groups[w["field_group"]]["alive"]]

    def gpus(self) -> list[dict[str, Any]]:
        with self.nvml.locked_state() as state:
            return list(state.get("gpus", []))

    def gpu(self, gpu_id: int) -> dict[str, Any]:
        gpus = self.gpus()
        if not 0 <= gpu_id < len(gpus):
            raise DCGMError(DCGM_ST_BADPARAM)
        return gpus[gpu_id]

    def log(self, fn: str, uuid: str | None, args: dict[str, Any], error: int | None) -> None:
        self.nvml.log(fn, uuid, args, error, api="dcgm")


engine = Engine()


def reset(nvml: fake_nvml.FakeNvml | None = None, **kw: Any) -> Engine:
    return engine.reset(nvml, **kw)


def dcgm_gpu(uuid: str, values: dict[int, Any], *, ts_us: int = 1_700_000_000_000_000, **kw: Any) -> dict[str, Any]:
    """A fake GPU whose DCGM fields hold ``values``, sampled at ``ts_us``."""
    return fake_nvml.make_gpu(uuid, dcgm=[[ts_us, dict(values)]], **kw)


def _synthesised(gpu: dict[str, Any]) -> dict[int, Any]:
    """DCGM's fields of a GPU that has only NVML keys."""
    return {
        155: gpu["average_power_mw"] / 1000, 156: gpu["energy_mj"], 157: gpu["power_mw"] / 1000,
        203: gpu["gpu_util"], 204: gpu["mem_util"], 250: 81559, 252: gpu["mem_used_bytes"] // fake_nvml.MIB,
        251: 81559 - gpu["mem_used_bytes"] // fake_nvml.MIB, 100: gpu["sm_clock_mhz"], 101: gpu["mem_clock_mhz"],
        150: gpu["temperature_c"], 160: gpu["limit_mw"] / 1000, 161: gpu["min_mw"] / 1000,
        162: gpu["max_mw"] / 1000, 163: gpu["default_mw"] / 1000, 164: fake_nvml.enforced_mw(gpu) / 1000,
        112: gpu.get("event_reasons", 0), 240: gpu.get("violation_ns", 0) // 1000,
    }


def samples_of(gpu: dict[str, Any]) -> list[tuple[int, dict[int, Any]]]:
    """The GPU's DCGM samples ``(ts_us, {field_id: value})``, oldest first."""
    if gpu.get("dcgm") is None:
        return [(time.time_ns() // 1000, _synthesised(gpu))]
    return [(int(ts), {int(k): v for k, v in values.items()}) for ts, values in gpu["dcgm"]]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value >= DCGM_FP64_BLANK) or (
        isinstance(value, int) and value >= DCGM_INT64_BLANK)


class DcgmFieldValue:
    """One sampled value as ``dcgm_field_helpers`` gives it: ``ts`` (µs since the epoch), ``value``, ``isBlank``."""

    def __init__(self, ts: int, value: Any) -> None:
        self.ts = ts
        self.value = value
        self.isBlank = _blank(value)

    def __repr__(self) -> str:
        return f"DcgmFieldValue(ts={self.ts}, value={self.value!r})"


def _dcgmInit(libDcgmPath: str | None = None) -> None:  # noqa: N802,N803
    if not engine.library_present:
        raise DCGMError(DCGM_ST_LIBRARY_NOT_FOUND)


# -- pydcgm ------------------------------------------------------------------------------
class DcgmHandle:
    def __init__(self, handle: int | None = None, ipAddress: str | None = None,  # noqa: N803
                 opMode: int = DCGM_OPERATION_MODE_AUTO, persistAfterDisconnect: bool = False,  # noqa: N803
                 unixSocketPath: str | None = None, timeoutMs: int = 0) -> None:  # noqa: N803
        self._created = False
        if handle is not None:
            self.handle = handle
            return
        _dcgmInit()
        with engine.nvml.locked_state() as state:
            code = state.get("dcgm_connect_error")
        if code is None and ipAddress is not None and ipAddress not in engine.hostengine_addresses:
            code = DCGM_ST_CONNECTION_NOT_VALID
        engine.log("DcgmHandle", None, {"ip": ipAddress}, code)
        if code is not None:
            raise DCGMError(int(code))
        self.handle = engine.new_id()
        self.isEmbedded = ipAddress is None
        engine.handles[self.handle] = {"address": ipAddress, "open": True, "op_mode": opMode}
        self._created = True

    def GetSystem(self) -> DcgmSystem:  # noqa: N802
        return DcgmSystem(self)

    def Shutdown(self) -> None:  # noqa: N802
        if not self._created:
            return
        engine.log("Shutdown", None, {}, None)
        engine.handles[self.handle]["open"] = False
        self._created = False


def _check(handle: DcgmHandle) -> None:
    state = engine.handles.get(handle.handle)
    if state is None or not state["open"]:
        raise DCGMError(DCGM_ST_CONNECTION_NOT_VALID)


class _Discovery:
    def __init__(self, handle: DcgmHandle) -> None:
        self._handle = handle

    def GetAllSupportedGpuIds(self) -> list[int]:  # noqa: N802
        _check(self._handle)
        return list(range(len(engine.gpus())))

    GetAllGpuIds = GetAllSupportedGpuIds

    def GetGpuAttributes(self, gpuId: int) -> Any:  # noqa: N802,N803
        _check(self._handle)
        gpu = engine.gpu(gpuId)
        engine.log("GetGpuAttributes", gpu["uuid"], {"gpu_id": gpuId}, None)
        return types.SimpleNamespace(
            identifiers=types.SimpleNamespace(uuid=gpu["uuid"].encode(), deviceName=gpu.get("name", "").encode(),
                                              pciBusId=f"00000000:{gpuId:02d}:00.0"),
            powerLimits=types.SimpleNamespace(
                curPowerLimit=gpu["limit_mw"] // 1000, defaultPowerLimit=gpu["default_mw"] // 1000,
                enforcedPowerLimit=fake_nvml.enforced_mw(gpu) // 1000,
                minPowerLimit=gpu["min_mw"] // 1000, maxPowerLimit=gpu["max_mw"] // 1000))


class DcgmSystem:
    def __init__(self, dcgmHandle: DcgmHandle) -> None:  # noqa: N803
        self._dcgmHandle = dcgmHandle
        self.discovery = _Discovery(dcgmHandle)

    def UpdateAllFields(self, waitForUpdate: int) -> None:  # noqa: N802,N803
        _check(self._dcgmHandle)

    def GetGroupWithGpuIds(self, groupName: str, gpuIds: list[int]) -> DcgmGroup:  # noqa: N802,N803
        group = DcgmGroup(self._dcgmHandle, groupName=groupName)
        for gpu_id in gpuIds:
            group.AddGpu(gpu_id)
        return group


class _Samples:
    def __init__(self, group: DcgmGroup) -> None:
        self._group = group

    def WatchFields(self, fieldGroup: DcgmFieldGroup, updateFreq: int, maxKeepAge: float,  # noqa: N802,N803
                    maxKeepSamples: int) -> None:  # noqa: N803
        _check(self._group._dcgmHandle)
        if set(fieldGroup.fieldIds) & PROFILING_FIELD_IDS and not engine.profiling_allowed:
            raise DCGMError(DCGM_ST_REQUIRES_ROOT)
        engine.watches.append({"group": self._group.groupId, "field_group": fieldGroup.fieldGroupId.value,
                               "update_us": updateFreq, "max_keep_age_s": maxKeepAge})


def _not_blank(cfg: c_dcgmDeviceConfig_v1) -> list[str]:
    fields = {
        "mEccMode": cfg.mEccMode,
        "mComputeMode": cfg.mComputeMode,
        "mPerfState.syncBoost": cfg.mPerfState.syncBoost,
        "mPerfState.targetClocks.memClock": cfg.mPerfState.targetClocks.memClock,
        "mPerfState.targetClocks.smClock": cfg.mPerfState.targetClocks.smClock,
    }
    return [name for name, value in fields.items() if value != DCGM_INT32_BLANK]


class _GroupConfig:
    def __init__(self, group: DcgmGroup) -> None:
        self._group = group

    def Set(self, config: c_dcgmDeviceConfig_v1) -> None:  # noqa: N802
        group = self._group
        _check(group._dcgmHandle)
        gpu_ids = group.GetGpuIds()
        with engine.nvml.locked_state(write=True) as state:
            gpus = state["gpus"]
            uuids = [gpus[i]["uuid"] for i in gpu_ids]
            args: dict[str, Any] = {"power_w": config.mPowerLimit.val, "type": config.mPowerLimit.type,
                                    "gpu_ids": gpu_ids}
            deny = state.get("deny_set")
            error: int | None = None
            if deny is True or (isinstance(deny, list) and set(uuids) & set(deny)):
                error = DCGM_ST_REQUIRES_ROOT
            elif state.get("set_error") is not None:
                error = DCGM_ST_GENERIC_ERROR
            elif config.version != dcgmDeviceConfig_version1 or _not_blank(config) \
                    or config.mPowerLimit.type != DCGM_CONFIG_POWER_CAP_INDIVIDUAL:
                args["not_blank"] = _not_blank(config)
                error = DCGM_ST_BADPARAM
            elif not all(gpus[i]["min_mw"] <= config.mPowerLimit.val * 1000 <= gpus[i]["max_mw"] for i in gpu_ids):
                error = DCGM_ST_BADPARAM
            else:
                for i in gpu_ids:
                    gpus[i]["limit_mw"] = int(config.mPowerLimit.val) * 1000
        engine.log("dcgmConfigSet", uuids[0] if len(uuids) == 1 else None, args, error)
        if error is not None:
            raise DCGMError(error)


class DcgmGroup:
    def __init__(self, dcgmHandle: DcgmHandle, groupId: int | None = None,  # noqa: N803
                 groupName: str | None = None, **_kw: Any) -> None:  # noqa: N803
        _check(dcgmHandle)
        self._dcgmHandle = dcgmHandle
        self.groupId = engine.new_id()
        engine.groups[self.groupId] = {"name": groupName, "gpu_ids": [], "alive": True}
        self.samples = _Samples(self)
        self.config = _GroupConfig(self)

    def AddGpu(self, gpuId: int) -> None:  # noqa: N802,N803
        engine.gpu(gpuId)
        engine.groups[self.groupId]["gpu_ids"].append(gpuId)

    def GetGpuIds(self) -> list[int]:  # noqa: N802
        return list(engine.groups[self.groupId]["gpu_ids"])

    def Delete(self) -> None:  # noqa: N802
        _check(self._dcgmHandle)
        engine.groups[self.groupId]["alive"] = False


class DcgmFieldGroup:
    def __init__(self, dcgmHandle: DcgmHandle, name: str = "", fieldIds: list[int] | None = None,  # noqa: N803
                 fieldGroupId: int | None = None) -> None:  # noqa: N803
        _check(dcgmHandle)
        self._dcgmHandle = dcgmHandle
        self.name = name
        self.fieldIds = list(fieldIds or [])
        fid = engine.new_id()
        self.fieldGroupId = types.SimpleNamespace(value=fid)
        engine.field_groups[fid] = {"name": name, "field_ids": self.fieldIds, "alive": True}

    def Delete(self) -> None:  # noqa: N802
        _check(self._dcgmHandle)
        engine.field_groups[self.fieldGroupId.value]["alive"] = False


# -- DcgmReader -----------------------------------------------------------------------------
class DcgmReader:
    """NVIDIA's reader class, as far as llmenergy uses it (constructor arguments as the real one)."""

    def __init__(self, hostname: str | None = "localhost", fieldIds: list[int] | None = None,  # noqa: N803
                 updateFrequency: int = 10_000_000, maxKeepAge: float = 3600.0,  # noqa: N803
                 ignoreList: list[int] | None = None, fieldGroupName: str = "dcgm_fieldgroupData",  # noqa: N803
                 gpuIds: list[int] | None = None, entities: Any = None,  # noqa: N803
                 fieldIntervalMap: dict[int, list[int]] | None = None,  # noqa: N803
                 ignoreBlank: bool = True) -> None:  # noqa: N803
        self.m_dcgmHostName = hostname
        self.m_updateFreq = updateFrequency
        self.m_publishFields = fieldIntervalMap or {updateFrequency: list(fieldIds or [155])}
        self.m_fieldGroupName = fieldGroupName
        self.m_requestedGpuIds = gpuIds
        self.m_maxKeepAge = maxKeepAge
        self.m_ignoreBlank = ignoreBlank
        self.m_dcgmHandle: DcgmHandle | None = None
        self.m_dcgmSystem: DcgmSystem | None = None
        self.m_dcgmGroup: DcgmGroup | None = None
        self.m_fieldGroup: DcgmFieldGroup | None = None
        self.m_fieldGroups: dict[int, DcgmFieldGroup] = {}
        self.m_closeHandle = False
        self._since_us: dict[int, int] = {}  # per GPU id: the newest sample time returned so far

    def SetHandle(self, handle: int) -> None:  # noqa: N802
        self.m_dcgmHandle = DcgmHandle(handle)
        self.InitializeFromHandle()

    def Init(self, libpath: str | None = None) -> None:  # noqa: N802
        _dcgmInit(libpath)
        self.m_dcgmHandle = DcgmHandle(None, ipAddress=self.m_dcgmHostName)
        self.m_closeHandle = True
        self.InitializeFromHandle()

    def InitializeFromHandle(self) -> None:  # noqa: N802
        self.m_dcgmSystem = self.m_dcgmHandle.GetSystem()
        gpu_ids = self.m_requestedGpuIds or self.m_dcgmSystem.discovery.GetAllSupportedGpuIds()
        self.m_dcgmGroup = self.m_dcgmSystem.GetGroupWithGpuIds(f"dcgmreader_{os.getpid()}", gpu_ids)
        all_fields: list[int] = []
        for number, (interval, field_ids) in enumerate(self.m_publishFields.items(), start=1):
            self.m_fieldGroups[interval] = DcgmFieldGroup(self.m_dcgmHandle, f"{self.m_fieldGroupName}_{number}",
                                                          field_ids)
            all_fields += [f for f in field_ids if f not in all_fields]
        self.m_fieldGroup = DcgmFieldGroup(self.m_dcgmHandle, self.m_fieldGroupName, all_fields)
        for interval, field_group in self.m_fieldGroups.items():
            self.m_dcgmGroup.samples.WatchFields(field_group, interval, self.m_maxKeepAge, 0)
        self.m_dcgmSystem.UpdateAllFields(1)

    def Shutdown(self) -> None:  # noqa: N802
        if self.m_closeHandle and self.m_dcgmHandle is not None:
            self.m_dcgmHandle.Shutdown()
        self.m_dcgmHandle = None

    def _watched_samples(self) -> dict[int, list[tuple[int, dict[int, Any]]]]:
        if self.m_dcgmHandle is None:
            raise DCGMError(DCGM_ST_CONNECTION_NOT_VALID)
        _check(self.m_dcgmHandle)
        watched = set(self.m_fieldGroup.fieldIds)
        gpus = engine.gpus()
        return {gpu_id: [(ts, {f: v for f, v in values.items() if f in watched})
                         for ts, values in samples_of(gpus[gpu_id])]
                for gpu_id in self.m_dcgmGroup.GetGpuIds()}

    def GetLatestGpuValuesAsFieldIdDict(self) -> dict[int, dict[int, Any]]:  # noqa: N802
        """{gpu_id: {field_id: value}}: each field's latest value, without its time."""
        out: dict[int, dict[int, Any]] = {}
        for gpu_id, samples in self._watched_samples().items():
            latest: dict[int, Any] = {}
            for _ts, values in samples:
                latest.update({f: v for f, v in values.items() if not (self.m_ignoreBlank and _blank(v))})
            out[gpu_id] = latest
        return out

    def GetAllGpuValuesAsFieldIdDictSinceLastCall(self) -> dict[int, dict[int, list[DcgmFieldValue]]]:  # noqa: N802
        """{gpu_id: {field_id: [values with .ts and .value]}}: every value sampled since the previous call."""
        out: dict[int, dict[int, list[DcgmFieldValue]]] = {}
        for gpu_id, samples in self._watched_samples().items():
            since = self._since_us.get(gpu_id, 0)
            fields: dict[int, list[DcgmFieldValue]] = {}
            for ts, values in samples:
                if ts <= since:
                    continue
                for field_id, value in values.items():
                    fields.setdefault(field_id, []).append(DcgmFieldValue(ts, value))
                self._since_us[gpu_id] = max(self._since_us.get(gpu_id, 0), ts)
            if fields:
                out[gpu_id] = fields
        return out
