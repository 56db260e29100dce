"""Fake ``pydcgm``: DcgmHandle, DcgmSystem (discovery), DcgmGroup, DcgmFieldGroup over the fake engine."""
from __future__ import annotations

import types

import dcgm_fields
import dcgm_structs
import fake_dcgm_engine as _engine


class DcgmException(Exception):
    pass


class DcgmHandle:
    def __init__(self, handle=None, ipAddress=None, opMode=dcgm_structs.DCGM_OPERATION_MODE_AUTO,  # noqa: N803
                 persistAfterDisconnect=False, unixSocketPath=None, timeoutMs=0):
        self._handleCreated = False
        if handle is not None:
            self.handle = handle
            return
        dcgm_structs._dcgmInit()
        if ipAddress is not None and ipAddress not in _engine.hostengine_addresses:
            raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
        self.handle = _engine.new_id()
        self.isEmbedded = ipAddress is None
        _engine.handles[self.handle] = {"address": ipAddress, "open": True, "op_mode": opMode}
        self._handleCreated = True

    def GetSystem(self):  # noqa: N802
        return DcgmSystem(self)

    def Shutdown(self):  # noqa: N802
        if not self._handleCreated:
            return
        _engine.handles[self.handle]["open"] = False
        self._handleCreated = False
        self.handle = None


def _check(handle: DcgmHandle) -> None:
    state = _engine.handles.get(handle.handle)
    if state is None or not state["open"]:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)


class _Discovery:
    def __init__(self, handle: DcgmHandle) -> None:
        self._handle = handle

    def GetAllSupportedGpuIds(self):  # noqa: N802
        _check(self._handle)
        return [g["id"] for g in _engine.gpus]

    GetAllGpuIds = GetAllSupportedGpuIds

    def GetGpuAttributes(self, gpuId):  # noqa: N802,N803
        _check(self._handle)
        gpu = next(g for g in _engine.gpus if g["id"] == gpuId)
        return types.SimpleNamespace(identifiers=types.SimpleNamespace(
            uuid=gpu["uuid"], deviceName=gpu.get("name", "NVIDIA H100 80GB HBM3"),
            pciBusId=f"00000000:{gpuId:02d}:00.0"))


class DcgmSystem:
    def __init__(self, dcgmHandle: DcgmHandle) -> None:  # noqa: N803
        self._dcgmHandle = dcgmHandle
        self.discovery = _Discovery(dcgmHandle)
        self.fields = types.SimpleNamespace(GetFieldById=dcgm_fields.DcgmFieldGetById)

    def UpdateAllFields(self, waitForUpdate):  # noqa: N802,N803
        _check(self._dcgmHandle)

    def GetGroupWithGpuIds(self, groupName, gpuIds):  # noqa: N802,N803
        group = DcgmGroup(self._dcgmHandle, groupName=groupName)
        for gpu_id in gpuIds:
            group.AddGpu(gpu_id)
        return group

    def GetFieldGroupIdByName(self, name):  # noqa: N802
        for fid, fg in _engine.field_groups.items():
            if fg["alive"] and fg["name"] == name:
                return types.SimpleNamespace(value=fid)
        return None


class _Samples:
    def __init__(self, group: DcgmGroup) -> None:
        self._group = group

    def WatchFields(self, fieldGroup, updateFreq, maxKeepAge, maxKeepSamples):  # noqa: N802,N803
        _check(self._group._dcgmHandle)
        profiling = set(fieldGroup.fieldIds) & _engine.PROFILING_FIELD_IDS
        if profiling and not _engine.profiling_allowed:
            raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_REQUIRES_ROOT)
        _engine.watches.append({"group": self._group.groupId, "field_group": fieldGroup.fieldGroupId.value,
                                "update_us": updateFreq, "max_keep_age_s": maxKeepAge})


class DcgmGroup:
    def __init__(self, dcgmHandle, groupId=None, groupName=None):  # noqa: N803
        _check(dcgmHandle)
        self._dcgmHandle = dcgmHandle
        self.groupId = _engine.new_id()
        _engine.groups[self.groupId] = {"name": groupName, "gpu_ids": [], "alive": True}
        self.samples = _Samples(self)

    def AddGpu(self, gpuId):  # noqa: N802,N803
        if gpuId not in [g["id"] for g in _engine.gpus]:
            raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_BADPARAM)
        _engine.groups[self.groupId]["gpu_ids"].append(gpuId)

    def GetGpuIds(self):  # noqa: N802
        return list(_engine.groups[self.groupId]["gpu_ids"])

    def Delete(self):  # noqa: N802
        _check(self._dcgmHandle)
        _engine.groups[self.groupId]["alive"] = False


class DcgmFieldGroup:
    def __init__(self, dcgmHandle, name="", fieldIds=None, fieldGroupId=None):  # noqa: N803
        _check(dcgmHandle)
        self._dcgmHandle = dcgmHandle
        self.name = name
        self.fieldIds = list(fieldIds or [])
        fid = _engine.new_id()
        self.fieldGroupId = types.SimpleNamespace(value=fid)
        _engine.field_groups[fid] = {"name": name, "field_ids": self.fieldIds, "alive": True}

    def Delete(self):  # noqa: N802
        _check(self._dcgmHandle)
        _engine.field_groups[self.fieldGroupId.value]["alive"] = False
