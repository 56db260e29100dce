"""FAKE DCGM bindings for tests: the subset of pydcgm/dcgm_structs that power capping uses.

Nothing here touches a GPU.  The folder ``tests/fakes/dcgm`` holds thin shims
named like NVIDIA's binding modules (``pydcgm``, ``dcgm_structs``,
``dcgm_fields``, ``dcgmvalue``, ``DcgmReader``) that re-export this module;
point ``$DCGM_PYTHON_PATH`` at that folder and have ``tests/fakes`` on
``PYTHONPATH``.

The fake host engine shares its simulated GPUs with the fake NVML
(``FAKE_NVML_STATE``; DCGM GPU id = position in ``gpus``), as on a real node
where DCGM drives NVML, and logs to the same ``FAKE_NVML_LOG`` with
``"api": "dcgm"``.  ``deny_set`` makes ``config.Set`` fail with
DCGM_ST_REQUIRES_ROOT (what a non-root host engine answers).  A config whose
non-power fields are not blank is refused with DCGM_ST_BADPARAM and logged, since
the real engine would change ECC, compute mode or clocks.
"""
from __future__ import annotations

import types
from typing import Any

import fake_nvml_impl as _nvml

FAKE_MODULE = "fake_dcgm_impl"

DCGM_OPERATION_MODE_AUTO = 1
DCGM_OPERATION_MODE_MANUAL = 2
DCGM_ST_OK = 0
DCGM_ST_BADPARAM = -1
DCGM_ST_GENERIC_ERROR = -3
DCGM_ST_CONNECTION_NOT_VALID = -21
DCGM_ST_REQUIRES_ROOT = -29
DCGM_CONFIG_POWER_CAP_INDIVIDUAL = 0
DCGM_CONFIG_POWER_BUDGET_GROUP = 1
DCGM_INT32_BLANK = 0x7FFFFFF0
dcgmDeviceConfig_version1 = 0x1000000 | 96

_open_handles: set[int] = set()
_next_id = [100]


class DCGMError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"DCGM error {value} (fake)")
        self.value = value


def _new_id() -> int:
    _next_id[0] += 1
    return _next_id[0]


def _log(fn: str, uuid: str | None, args: dict[str, Any], error: int | None) -> None:
    _nvml._log(fn, uuid, {**args, "api": "dcgm"}, error)


# -- structs (zero-initialised, like ctypes) -----------------------------------
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


def _not_blank(cfg: c_dcgmDeviceConfig_v1) -> list[str]:
    fields = {
        "mEccMode": cfg.mEccMode,
        "mComputeMode": cfg.mComputeMode,
        "mPerfState.syncBoost": cfg.mPerfState.syncBoost,
        "mPerfState.targetClocks.memClock": cfg.mPerfState.targetClocks.memClock,
        "mPerfState.targetClocks.smClock": cfg.mPerfState.targetClocks.smClock,
    }
    return [name for name, value in fields.items() if value != DCGM_INT32_BLANK]


# -- pydcgm ----------------------------------------------------------------------
class DcgmHandle:
    def __init__(self, handle: Any = None, ipAddress: str | None = None,  # noqa: N803
                 opMode: int = DCGM_OPERATION_MODE_AUTO, **_kw: Any) -> None:
        with _nvml.locked_state() as state:
            code = state.get("dcgm_connect_error")
        _log("DcgmHandle", None, {"ip": ipAddress}, code)
        if code is not None:
            raise DCGMError(int(code))
        self.handle = _new_id()
        _open_handles.add(self.handle)

    def GetSystem(self) -> DcgmSystem:  # noqa: N802
        return DcgmSystem(self)

    def Shutdown(self) -> None:  # noqa: N802
        _log("Shutdown", None, {}, None)
        _open_handles.discard(self.handle)


def _check(handle: DcgmHandle) -> None:
    if handle.handle not in _open_handles:
        raise DCGMError(DCGM_ST_CONNECTION_NOT_VALID)


class _Discovery:
    def __init__(self, handle: DcgmHandle) -> None:
        self._handle = handle

    def GetAllSupportedGpuIds(self) -> list[int]:  # noqa: N802
        _check(self._handle)
        with _nvml.locked_state() as state:
            return list(range(len(state["gpus"])))

    def GetGpuAttributes(self, gpuId: int) -> Any:  # noqa: N802,N803
        _check(self._handle)
        with _nvml.locked_state() as state:
            gpu = state["gpus"][gpuId]
        _log("GetGpuAttributes", gpu["uuid"], {"gpu_id": gpuId}, None)
        return types.SimpleNamespace(
            identifiers=types.SimpleNamespace(uuid=gpu["uuid"].encode(), deviceName=gpu.get("name", "").encode()),
            powerLimits=types.SimpleNamespace(
                curPowerLimit=gpu["limit_mw"] // 1000, defaultPowerLimit=gpu["default_mw"] // 1000,
                enforcedPowerLimit=_nvml.enforced_mw(gpu) // 1000,
                minPowerLimit=gpu["min_mw"] // 1000, maxPowerLimit=gpu["max_mw"] // 1000))


class DcgmSystem:
    def __init__(self, handle: DcgmHandle) -> None:
        self._handle = handle
        self.discovery = _Discovery(handle)

    def GetGroupWithGpuIds(self, groupName: str, gpuIds: list[int]) -> DcgmGroup:  # noqa: N802,N803
        group = DcgmGroup(self._handle, groupName=groupName)
        for gpu_id in gpuIds:
            group.AddGpu(gpu_id)
        return group


class _GroupConfig:
    def __init__(self, group: DcgmGroup) -> None:
        self._group = group

    def Set(self, config: c_dcgmDeviceConfig_v1) -> None:  # noqa: N802
        group = self._group
        _check(group._handle)
        with _nvml.locked_state(write=True) as state:
            uuids = [state["gpus"][i]["uuid"] for i in group.gpu_ids]
            args = {"power_w": config.mPowerLimit.val, "type": config.mPowerLimit.type,
                    "gpu_ids": list(group.gpu_ids)}
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
            else:
                for i in group.gpu_ids:
                    gpu = state["gpus"][i]
                    if not gpu["min_mw"] <= config.mPowerLimit.val * 1000 <= gpu["max_mw"]:
                        error = DCGM_ST_BADPARAM
                if error is None:
                    for i in group.gpu_ids:
                        state["gpus"][i]["limit_mw"] = int(config.mPowerLimit.val) * 1000
        _log("dcgmConfigSet", uuids[0] if len(uuids) == 1 else None, args, error)
        if error is not None:
            raise DCGMError(error)


class DcgmGroup:
    def __init__(self, dcgmHandle: DcgmHandle, groupId: int | None = None,  # noqa: N803
                 groupName: str | None = None, **_kw: Any) -> None:
        _check(dcgmHandle)
        self._handle = dcgmHandle
        self.groupId = _new_id()
        self.name = groupName
        self.gpu_ids: list[int] = []
        self.config = _GroupConfig(self)

    def AddGpu(self, gpuId: int) -> None:  # noqa: N802,N803
        self.gpu_ids.append(gpuId)

    def GetGpuIds(self) -> list[int]:  # noqa: N802
        return list(self.gpu_ids)

    def Delete(self) -> None:  # noqa: N802
        _check(self._handle)


class DcgmReader:  # only so that the bindings finder can import the module
    def __init__(self, *_a: Any, **_kw: Any) -> None:
        raise DCGMError(DCGM_ST_GENERIC_ERROR)
