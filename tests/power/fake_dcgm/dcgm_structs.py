"""Fake ``dcgm_structs``: status codes, DCGMError and dcgmExceptionClass as in the real bindings."""
from __future__ import annotations

import fake_dcgm_engine as _engine

DCGM_OPERATION_MODE_AUTO = 1
DCGM_OPERATION_MODE_MANUAL = 2
DCGM_GROUP_ALL_GPUS = 0x7FFFFFFF

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


class DCGMError(Exception):
    _classes: dict[int, type] = {}

    def __new__(cls, value: int):  # mirrors the real mapping to per-status subclasses
        if cls is DCGMError:
            cls = DCGMError._classes.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"DCGM error {self.value}"


def dcgmExceptionClass(status: int) -> type:  # noqa: N802 - vendor name
    if status not in DCGMError._classes:
        DCGMError._classes[status] = type(f"DCGMError_{abs(status)}", (DCGMError,), {})
    return DCGMError._classes[status]


def _dcgmInit(libDcgmPath=None) -> None:  # noqa: N802,N803
    if not _engine.library_present:
        raise DCGMError(DCGM_ST_LIBRARY_NOT_FOUND)
