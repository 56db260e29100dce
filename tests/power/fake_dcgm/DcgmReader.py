"""Fake ``DcgmReader`` following the documented API of NVIDIA's class.

Constructor: hostname, fieldIds, updateFrequency (µs), maxKeepAge (s),
ignoreList, fieldGroupName, gpuIds, entities, fieldIntervalMap, ignoreBlank.
``SetHandle(handle)`` uses an existing connection; ``Init()`` opens its own.
Reads return {gpuId: {fieldId: value}} for watched fields of the group's GPUs.
"""
from __future__ import annotations

import os

import dcgm_structs
import fake_dcgm_engine as _engine
import pydcgm


class DcgmReader:
    def __init__(self, hostname="localhost", fieldIds=None, updateFrequency=10000000,  # noqa: N803
                 maxKeepAge=3600.0, ignoreList=None, fieldGroupName="dcgm_fieldgroupData",
                 gpuIds=None, entities=None, fieldIntervalMap=None, ignoreBlank=True):
        self.m_dcgmHostName = hostname
        self.m_updateFreq = updateFrequency
        self.m_publishFields = fieldIntervalMap or {updateFrequency: list(fieldIds or [155])}
        self.m_fieldGroupName = fieldGroupName
        self.m_requestedGpuIds = gpuIds
        self.m_maxKeepAge = maxKeepAge
        self.m_ignoreBlank = ignoreBlank
        self.m_dcgmHandle = None
        self.m_dcgmSystem = None
        self.m_dcgmGroup = None
        self.m_fieldGroup = None
        self.m_fieldGroups = {}
        self.m_closeHandle = False

    def SetHandle(self, handle):  # noqa: N802
        self.m_dcgmHandle = pydcgm.DcgmHandle(handle)
        self.InitializeFromHandle()

    def Init(self, libpath=None):  # noqa: N802
        dcgm_structs._dcgmInit(libpath)
        self.m_dcgmHandle = pydcgm.DcgmHandle(None, ipAddress=self.m_dcgmHostName)
        self.m_closeHandle = True
        self.InitializeFromHandle()

    def InitializeFromHandle(self):  # noqa: N802
        self.m_dcgmSystem = self.m_dcgmHandle.GetSystem()
        gpu_ids = self.m_requestedGpuIds or self.m_dcgmSystem.discovery.GetAllSupportedGpuIds()
        self.m_dcgmGroup = self.m_dcgmSystem.GetGroupWithGpuIds(f"dcgmreader_{os.getpid()}", gpu_ids)
        all_fields = []
        for number, (interval, field_ids) in enumerate(self.m_publishFields.items(), start=1):
            self.m_fieldGroups[interval] = pydcgm.DcgmFieldGroup(
                self.m_dcgmHandle, f"{self.m_fieldGroupName}_{number}", field_ids)
            all_fields += [f for f in field_ids if f not in all_fields]
        self.m_fieldGroup = pydcgm.DcgmFieldGroup(self.m_dcgmHandle, self.m_fieldGroupName, all_fields)
        for interval, field_group in self.m_fieldGroups.items():
            self.m_dcgmGroup.samples.WatchFields(field_group, interval, self.m_maxKeepAge, 0)
        self.m_dcgmSystem.UpdateAllFields(1)

    def Shutdown(self):  # noqa: N802
        if self.m_closeHandle and self.m_dcgmHandle is not None:
            self.m_dcgmHandle.Shutdown()
        self.m_dcgmHandle = None

    def GetLatestGpuValuesAsFieldIdDict(self):  # noqa: N802
        state = _engine.handles.get(getattr(self.m_dcgmHandle, "handle", None))
        if state is None or not state["open"]:
            raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_CONNECTION_NOT_VALID)
        watched = set(self.m_fieldGroup.fieldIds)
        out = {}
        for gpu in _engine.gpus:
            if gpu["id"] not in self.m_dcgmGroup.GetGpuIds():
                continue
            values = {fid: v for fid, v in gpu["values"].items() if fid in watched}
            out[gpu["id"]] = values
        return out

    def GetAllGpuValuesAsFieldIdDictSinceLastCall(self):  # noqa: N802
        return {gpu_id: {fid: [v] for fid, v in vals.items()}
                for gpu_id, vals in self.GetLatestGpuValuesAsFieldIdDict().items()}
