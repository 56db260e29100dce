"""FAKE NVML for tests: nvidia-ml-py's ``pynvml`` as llmenergy uses it, monitoring and power caps.

Nothing here touches a GPU.  One :class:`FakeNvml` is one simulated node; its
:meth:`FakeNvml.module` is a ``pynvml`` look-alike that tests patch in where
llmenergy imports NVML (``llmenergy.power.backends.nvml_lib.pynvml``).
``tests/fakes/pynvml.py`` is the same fake as a module, for subprocesses started
with ``tests/fakes`` first on ``PYTHONPATH``: its state comes from the environment.

State: a dict (in this process; tests change it freely) or, from
``FAKE_NVML_STATE`` (unset: ``nvmlInit`` fails as on a machine without NVML),
inline JSON (starts with ``{``) or the path of a JSON file re-read on every call and rewritten on every set, so several processes see one
node, as on a real one::

    {"gpus": [make_gpu("GPU-a"), ...],   # every key of a GPU: see make_gpu
     "deny_set": false,                  # true, or a list of UUIDs: sets fail with NVML_ERROR_NO_PERMISSION
     "set_error": null,                  # an NVML error code every set raises
     "init_error": null,                 # an NVML error code nvmlInit raises
     "init_error_hosts": {"node2": 9},   # ... only on these hosts (socket.gethostname()): a node without NVML
     "driver": "580.00"}

Per GPU, ``unsupported`` lists pynvml functions that raise NVML_ERROR_NOT_SUPPORTED,
``field_unsupported``/``energy_field_unsupported`` make fields 186/83 fail in
their ``nvmlReturn``, ``lost`` makes every call raise NVML_ERROR_GPU_IS_LOST.
Delete a function from :meth:`FakeNvml.module` to mimic an older pynvml.

Call log (``log_path``, default env ``FAKE_NVML_LOG``): one JSON line per call,
``{"api": "nvml", "fn", "uuid", "args", "ok", "error", "pid", "ts_ns"}``; the
fake DCGM writes its calls there too.  ``calls`` counts calls by name and
``order`` lists them, in this process.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FAKE_MODULE = "fake_nvml"  # marks every import of this fake

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
nvmlClocksEventReasonSwPowerCap = 0x4

MIB = 1024 * 1024


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value} (fake)")
        self.value = value


class FakeHandle:
    """What the handle getters return: the GPU's UUID (the GPU is looked up on every call)."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid

    def __repr__(self) -> str:
        return f"FakeHandle({self.uuid!r})"


def make_gpu(uuid: str, *, min_w: float = 200, max_w: float = 700, default_w: float = 700,
             limit_w: float | None = None, **extra: Any) -> dict[str, Any]:
    """One simulated GPU (an idle H100 by default: 200–700 W, default limit 700 W, 72 W drawn)."""
    gpu = {
        "uuid": uuid, "name": "FAKE NVIDIA H100",
        # power caps
        "min_mw": int(min_w * 1000), "max_mw": int(max_w * 1000), "default_mw": int(default_w * 1000),
        "limit_mw": int((default_w if limit_w is None else limit_w) * 1000),
        "other_limit_mw": None,  # another limiter: enforced = min(limit, other)
        "event_reasons": 0, "violation_ns": 0,
        # monitoring
        "energy_mj": 1_000_000, "power_mw": 72_000, "average_power_mw": 71_000,
        "gpu_util": 0, "mem_util": 0, "mem_used_bytes": 512 * MIB,
        "sm_clock_mhz": 345, "mem_clock_mhz": 2619, "temperature_c": 31,
        "processes": [],  # PIDs holding a compute context on the GPU
        # failures
        "unsupported": [], "field_unsupported": False, "energy_field_unsupported": False, "lost": False,
    }
    gpu.update(extra)
    return gpu


def enforced_mw(gpu: dict[str, Any]) -> int:
    other = gpu.get("other_limit_mw")
    return int(gpu["limit_mw"] if other is None else min(gpu["limit_mw"], other))


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


_inline_states: dict[str, dict[str, Any]] = {}  # inline FAKE_NVML_STATE, parsed once per process


class FakeNvml:
    """One simulated node's NVML: ``state`` a dict (this process), a JSON file path, or None (the environment)."""

    def __init__(self, state: dict[str, Any] | str | os.PathLike[str] | None = None, *,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self._state = state
        self._log_path = log_path
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.initialised = 0
        self._module: types.ModuleType | None = None

    # -- state and log ---------------------------------------------------------
    @contextlib.contextmanager
    def locked_state(self, write: bool = False) -> Iterator[dict[str, Any]]:
        """Yield the simulated node; with ``write`` a file-backed state is stored back."""
        source: Any = self._state
        if source is None:
            source = os.environ.get("FAKE_NVML_STATE", "")
            if not source:
                raise RuntimeError("fake pynvml: FAKE_NVML_STATE is not set")
            if source.lstrip().startswith("{"):
                source = _inline_states.setdefault(source, json.loads(source))
        if isinstance(source, dict):
            yield source
            return
        path = Path(source)
        with open(path.with_name(path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(path.read_text())
            yield state
            if write:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state, indent=1))
                os.replace(tmp, path)

    def gpus(self) -> list[dict[str, Any]]:
        """The GPUs of a dict state (the live dicts: change them to change the hardware)."""
        if not isinstance(self._state, dict):
            raise TypeError("FakeNvml.gpus: only for an in-memory state")
        return self._state["gpus"]

    def log(self, fn: str, uuid: str | None, args: dict[str, Any], error: int | None, api: str = "nvml") -> None:
        target = self._log_path or os.environ.get("FAKE_NVML_LOG")
        if not target:
            return
        line = json.dumps({"api": api, "fn": fn, "uuid": uuid, "args": args, "ok": error is None,
                           "error": error, "pid": os.getpid(), "ts_ns": time.time_ns()})
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def _call(self, fn: str, handle: Any, args: dict[str, Any],
              body: Callable[[dict[str, Any], dict[str, Any] | None], Any], *, write: bool = False) -> Any:
        """Count, check initialisation and the GPU's failure flags, run ``body(state, gpu)``, log."""
        self.calls[fn] = self.calls.get(fn, 0) + 1
        self.order.append(fn)
        uuid = getattr(handle, "uuid", None)
        try:
            if not self.initialised:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            with self.locked_state(write=write) as state:
                gpu = None if uuid is None else _gpu(state, uuid)
                if gpu is not None and gpu.get("lost"):
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                if gpu is not None and fn in gpu.get("unsupported", ()):
                    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
                result = body(state, gpu)
        except NVMLError as exc:
            self.log(fn, uuid, args, exc.value)
            raise
        self.log(fn, uuid, args, None)
        return result

    # -- initialisation ----------------------------------------------------------
    def nvmlInit(self) -> None:  # noqa: N802 - vendor names
        self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        self.order.append("nvmlInit")
        if self._state is None and not os.environ.get("FAKE_NVML_STATE"):
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)  # no simulated node: a machine without NVML
        with self.locked_state() as state:
            code = state.get("init_error")
            code = (state.get("init_error_hosts") or {}).get(socket.gethostname(), code)
        self.log("nvmlInit", None, {}, code)
        if code is not None:
            raise NVMLError(int(code))
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.calls["nvmlShutdown"] = self.calls.get("nvmlShutdown", 0) + 1
        self.order.append("nvmlShutdown")
        self.log("nvmlShutdown", None, {}, None if self.initialised else NVML_ERROR_UNINITIALIZED)
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self._call("nvmlSystemGetDriverVersion", None, {}, lambda s, _g: str(s.get("driver", "580.00")))

    # -- devices -----------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetCount", None, {}, lambda s, _g: len(s.get("gpus", [])))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:  # noqa: N802
        def body(state: dict[str, Any], _g: Any) -> FakeHandle:
            gpus = state.get("gpus", [])
            if not 0 <= index < len(gpus):
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return FakeHandle(gpus[index]["uuid"])

        return self._call("nvmlDeviceGetHandleByIndex", None, {"index": index}, body)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:  # noqa: N802
        text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        return self._call("nvmlDeviceGetHandleByUUID", FakeHandle(text), {}, lambda _s, g: FakeHandle(g["uuid"]))

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:  # noqa: N802
        return self._call("nvmlDeviceGetUUID", handle, {}, lambda _s, g: g["uuid"])

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:  # noqa: N802
        return self._call("nvmlDeviceGetName", handle, {}, lambda _s, g: g.get("name", "FAKE NVIDIA H100"))

    # -- monitoring ----------------------------------------------------------------
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetTotalEnergyConsumption", handle, {}, lambda _s, g: int(g["energy_mj"]))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetPowerUsage", handle, {}, lambda _s, g: int(g["average_power_mw"]))

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> list[Any]:  # noqa: N802
        def body(_s: dict[str, Any], gpu: dict[str, Any]) -> list[Any]:
            out = []
            for fid in field_ids:
                value = types.SimpleNamespace(dVal=0.0, uiVal=0, ulVal=0, ullVal=0, sllVal=0, siVal=0, usVal=0)
                ret, vtype = NVML_SUCCESS, NVML_VALUE_TYPE_UNSIGNED_INT
                if fid == NVML_FI_DEV_POWER_INSTANT and not gpu.get("field_unsupported"):
                    value.uiVal = int(gpu["power_mw"])
                elif fid == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION and not gpu.get("energy_field_unsupported"):
                    value.ullVal, vtype = int(gpu["energy_mj"]), NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                else:
                    ret = NVML_ERROR_NOT_SUPPORTED
                out.append(types.SimpleNamespace(fieldId=fid, scopeId=0, timestamp=time.time_ns() // 1000,
                                                 latencyUsec=0, valueType=vtype, nvmlReturn=ret, value=value))
            return out

        return self._call("nvmlDeviceGetFieldValues", handle, {"fields": list(field_ids)}, body)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:  # noqa: N802
        return self._call("nvmlDeviceGetUtilizationRates", handle, {},
                          lambda _s, g: types.SimpleNamespace(gpu=g["gpu_util"], memory=g["mem_util"]))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:  # noqa: N802
        return self._call("nvmlDeviceGetComputeRunningProcesses", handle, {}, lambda _s, g: [
            types.SimpleNamespace(pid=pid, usedGpuMemory=512 * MIB) for pid in g.get("processes", ())])

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> Any:  # noqa: N802
        total = 80 * 1024 * MIB
        return self._call("nvmlDeviceGetMemoryInfo", handle, {}, lambda _s, g: types.SimpleNamespace(
            total=total, free=total - g["mem_used_bytes"], used=g["mem_used_bytes"]))

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock: int) -> int:  # noqa: N802
        def body(_s: dict[str, Any], gpu: dict[str, Any]) -> int:
            if clock not in (NVML_CLOCK_SM, NVML_CLOCK_MEM):
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return int(gpu["sm_clock_mhz"] if clock == NVML_CLOCK_SM else gpu["mem_clock_mhz"])

        return self._call("nvmlDeviceGetClockInfo", handle, {"clock": clock}, body)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:  # noqa: N802
        def body(_s: dict[str, Any], gpu: dict[str, Any]) -> int:
            if sensor != NVML_TEMPERATURE_GPU:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return int(gpu["temperature_c"])

        return self._call("nvmlDeviceGetTemperature", handle, {"sensor": sensor}, body)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetCurrentClocksEventReasons", handle, {},
                          lambda _s, g: int(g.get("event_reasons", 0)))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetCurrentClocksThrottleReasons", handle, {},
                          lambda _s, g: int(g.get("event_reasons", 0)))

    def nvmlDeviceGetViolationStatus(self, handle: FakeHandle, perfPolicyType: int) -> Any:  # noqa: N802,N803
        def body(_s: dict[str, Any], gpu: dict[str, Any]) -> Any:
            if perfPolicyType != NVML_PERF_POLICY_POWER:
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            return types.SimpleNamespace(referenceTime=time.time_ns() // 1000,
                                         violationTime=int(gpu.get("violation_ns", 0)))

        return self._call("nvmlDeviceGetViolationStatus", handle, {"policy": perfPolicyType}, body)

    # -- power limits ----------------------------------------------------------------
    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:  # noqa: N802
        return self._call("nvmlDeviceGetPowerManagementLimitConstraints", handle, {},
                          lambda _s, g: [int(g["min_mw"]), int(g["max_mw"])])

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetPowerManagementDefaultLimit", handle, {}, lambda _s, g: int(g["default_mw"]))

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetPowerManagementLimit", handle, {}, lambda _s, g: int(g["limit_mw"]))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:  # noqa: N802
        return self._call("nvmlDeviceGetEnforcedPowerLimit", handle, {}, lambda _s, g: enforced_mw(g))

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:  # noqa: N802
        def body(state: dict[str, Any], gpu: dict[str, Any]) -> None:
            deny = state.get("deny_set")
            if deny is True or (isinstance(deny, list) and gpu["uuid"] in deny):
                raise NVMLError(NVML_ERROR_NO_PERMISSION)
            if state.get("set_error") is not None:
                raise NVMLError(int(state["set_error"]))
            if not isinstance(limit, int) or not gpu["min_mw"] <= limit <= gpu["max_mw"]:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            gpu["limit_mw"] = limit

        self._call("nvmlDeviceSetPowerManagementLimit", handle, {"limit_mw": limit}, body, write=True)

    # -- as a module -------------------------------------------------------------------
    def module(self) -> types.ModuleType:
        """A ``pynvml`` look-alike over this node (one per fake: tests may delete or replace its functions)."""
        if self._module is None:
            mod = types.ModuleType("pynvml")
            for name, value in globals().items():
                if name.startswith(("NVML_", "nvmlClocks")):
                    setattr(mod, name, value)
            mod.NVMLError = NVMLError
            mod.FAKE_MODULE = FAKE_MODULE
            mod.fake = self
            for name in dir(self):
                if name.startswith("nvml"):
                    setattr(mod, name, getattr(self, name))
            self._module = mod
        return self._module


def _gpu(state: dict[str, Any], uuid: str) -> dict[str, Any]:
    for gpu in state.get("gpus", []):
        if gpu["uuid"] == uuid:
            return gpu
    raise NVMLError(NVML_ERROR_NOT_FOUND)


#: The node of this process's environment (``FAKE_NVML_STATE``, ``FAKE_NVML_LOG``): what ``pynvml.py`` exports.
ENV = FakeNvml()


def export(namespace: dict[str, Any]) -> None:
    """Fill a module namespace (``tests/fakes/pynvml.py``) with the pynvml API of :data:`ENV`."""
    namespace.update({k: v for k, v in vars(ENV.module()).items() if not k.startswith("__")})


__all__ = ["FAKE_MODULE", "ENV", "FakeHandle", "FakeNvml", "NVMLError", "enforced_mw", "export", "make_gpu",
           "read_log"]
