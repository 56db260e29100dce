"""A fake of nvidia-ml-py's ``pynvml`` module for the NVML backend tests.

``make_fake_pynvml(gpus)`` returns a module object with the pynvml functions
the backend calls, driven by :class:`FakeGpu` state.  Constants and the
``NVMLError(value)`` shape follow the real module.  Set names in
``FakeGpu.unsupported`` to make that function raise NVML_ERROR_NOT_SUPPORTED;
delete a function from the module to mimic an older pynvml.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_PERF_POLICY_POWER = 0
NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION = 83
NVML_FI_DEV_POWER_INSTANT = 186


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 1_000_000
    power_mw: int = 72_000
    average_power_mw: int = 71_000
    gpu_util: int = 0
    mem_util: int = 0
    mem_used_bytes: int = 512 * 1024 * 1024
    sm_clock_mhz: int = 345
    mem_clock_mhz: int = 2619
    temperature_c: int = 31
    enforced_limit_mw: int = 700_000
    event_reasons: int = 0x1
    violation_ns: int = 0
    unsupported: set[str] = field(default_factory=set)
    field_unsupported: bool = False  # field 186 returns NOT_SUPPORTED in its nvmlReturn
    energy_field_unsupported: bool = False  # field 83 returns NOT_SUPPORTED in its nvmlReturn
    lost: bool = False


def make_fake_pynvml(gpus: list[FakeGpu], *, init_error: int | None = None) -> types.ModuleType:
    """A pynvml look-alike over ``gpus``; ``mod.calls`` counts calls by function name,
    ``mod.order`` lists them in order."""
    mod = types.ModuleType("pynvml")
    for name, value in globals().items():
        if name.startswith("NVML_"):
            setattr(mod, name, value)
    mod.NVMLError = NVMLError
    mod.calls = {}
    mod.order = []
    mod.initialised = 0

    def api(func):  # register, count calls, honour unsupported/lost
        def wrapper(*args: Any) -> Any:
            mod.calls[func.__name__] = mod.calls.get(func.__name__, 0) + 1
            mod.order.append(func.__name__)
            if func.__name__ not in ("nvmlInit", "nvmlShutdown") and mod.initialised <= 0:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            if args and isinstance(args[0], FakeGpu):
                gpu = args[0]
                if gpu.lost:
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                if func.__name__ in gpu.unsupported:
                    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            return func(*args)

        wrapper.__name__ = func.__name__
        setattr(mod, func.__name__, wrapper)
        return wrapper

    @api
    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        mod.initialised += 1

    @api
    def nvmlShutdown() -> None:
        if mod.initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        mod.initialised -= 1

    @api
    def nvmlDeviceGetCount() -> int:
        return len(gpus)

    @api
    def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
        if not 0 <= index < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpus[index]

    @api
    def nvmlDeviceGetUUID(gpu: FakeGpu) -> str:
        return gpu.uuid

    @api
    def nvmlDeviceGetName(gpu: FakeGpu) -> str:
        return gpu.name

    @api
    def nvmlDeviceGetTotalEnergyConsumption(gpu: FakeGpu) -> int:
        return gpu.energy_mj

    @api
    def nvmlDeviceGetPowerUsage(gpu: FakeGpu) -> int:
        return gpu.average_power_mw

    @api
    def nvmlDeviceGetFieldValues(gpu: FakeGpu, field_ids: list[int]) -> list[Any]:
        out = []
        for fid in field_ids:
            value = types.SimpleNamespace(dVal=0.0, uiVal=0, ulVal=0, ullVal=0, sllVal=0, siVal=0, usVal=0)
            ret, vtype = NVML_SUCCESS, NVML_VALUE_TYPE_UNSIGNED_INT
            if fid == NVML_FI_DEV_POWER_INSTANT and not gpu.field_unsupported:
                value.uiVal = gpu.power_mw
            elif fid == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION and not gpu.energy_field_unsupported:
                value.ullVal, vtype = gpu.energy_mj, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            else:
                ret = NVML_ERROR_NOT_SUPPORTED
            out.append(types.SimpleNamespace(fieldId=fid, scopeId=0, timestamp=0, latencyUsec=0,
                                             valueType=vtype, nvmlReturn=ret, value=value))
        return out

    @api
    def nvmlDeviceGetUtilizationRates(gpu: FakeGpu) -> Any:
        return types.SimpleNamespace(gpu=gpu.gpu_util, memory=gpu.mem_util)

    @api
    def nvmlDeviceGetMemoryInfo(gpu: FakeGpu) -> Any:
        return types.SimpleNamespace(total=80 * 1024**3, free=80 * 1024**3 - gpu.mem_used_bytes,
                                     used=gpu.mem_used_bytes)

    @api
    def nvmlDeviceGetClockInfo(gpu: FakeGpu, clock: int) -> int:
        return {NVML_CLOCK_SM: gpu.sm_clock_mhz, NVML_CLOCK_MEM: gpu.mem_clock_mhz}[clock]

    @api
    def nvmlDeviceGetTemperature(gpu: FakeGpu, sensor: int) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    @api
    def nvmlDeviceGetEnforcedPowerLimit(gpu: FakeGpu) -> int:
        return gpu.enforced_limit_mw

    @api
    def nvmlDeviceGetCurrentClocksEventReasons(gpu: FakeGpu) -> int:
        return gpu.event_reasons

    @api
    def nvmlDeviceGetCurrentClocksThrottleReasons(gpu: FakeGpu) -> int:
        return gpu.event_reasons

    @api
    def nvmlDeviceGetViolationStatus(gpu: FakeGpu, policy: int) -> Any:
        if policy != NVML_PERF_POLICY_POWER:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return types.SimpleNamespace(referenceTime=0, violationTime=gpu.violation_ns)

    return mod
