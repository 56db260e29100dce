"""FAKE NVML for tests: the subset of nvidia-ml-py's ``pynvml`` that power capping uses.

Nothing here touches a GPU.  ``tests/fakes/pynvml.py`` re-exports this module so
that a subprocess started with ``tests/fakes`` first on ``PYTHONPATH`` imports
this fake as ``pynvml``.

Simulated hardware (env ``FAKE_NVML_STATE``): either inline JSON (starts with
``{``; changes then live in this process only) or the path of a JSON file that
is re-read on every call and rewritten on every set, so several processes see
one set of GPUs, as on a real node::

    {"gpus": [{"uuid": "GPU-a", "name": "...", "min_mw": 200000, "max_mw": 700000,
               "default_mw": 700000, "limit_mw": 700000,
               "other_limit_mw": null,      # another limiter: enforced = min(limit, other)
               "event_reasons": 0, "violation_ns": 0}],
     "deny_set": false,                     # true, or a list of UUIDs: NVML_ERROR_NO_PERMISSION
     "set_error": null,                     # an NVML error code every set raises
     "init_error": null}                    # an NVML error code nvmlInit raises

Call log (env ``FAKE_NVML_LOG``): every call appends one JSON line
``{"api": "nvml", "fn", "uuid", "args", "ok", "error", "pid", "ts_ns"}``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNKNOWN = 999
NVML_PERF_POLICY_POWER = 0
nvmlClocksEventReasonSwPowerCap = 0x4

_inline_state: dict[str, Any] | None = None
_initialised = 0


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value} (fake)")
        self.value = value


class FakeHandle:
    """What nvmlDeviceGetHandleByUUID returns: just the UUID."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid

    def __repr__(self) -> str:
        return f"FakeHandle({self.uuid!r})"


class FakeViolationTime:
    def __init__(self, violation_ns: int) -> None:
        self.referenceTime = time.time_ns() // 1000
        self.violationTime = violation_ns


# -- state and log -------------------------------------------------------------
def _state_source() -> str:
    source = os.environ.get("FAKE_NVML_STATE", "")
    if not source:
        raise RuntimeError("fake pynvml: FAKE_NVML_STATE is not set")
    return source


@contextlib.contextmanager
def locked_state(write: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the simulated state; with ``write`` the changes are stored back."""
    global _inline_state
    source = _state_source()
    if source.lstrip().startswith("{"):
        if _inline_state is None:
            _inline_state = json.loads(source)
        yield _inline_state
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


def _log(fn: str, uuid: str | None, args: dict[str, Any], error: int | None) -> None:
    target = os.environ.get("FAKE_NVML_LOG")
    if not target:
        return
    line = json.dumps({"api": "nvml", "fn": fn, "uuid": uuid, "args": args, "ok": error is None,
                       "error": error, "pid": os.getpid(), "ts_ns": time.time_ns()})
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _gpu(state: dict[str, Any], uuid: str) -> dict[str, Any]:
    for gpu in state.get("gpus", []):
        if gpu["uuid"] == uuid:
            return gpu
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def enforced_mw(gpu: dict[str, Any]) -> int:
    other = gpu.get("other_limit_mw")
    return int(gpu["limit_mw"] if other is None else min(gpu["limit_mw"], other))


def _call(fn: str, handle: Any, args: dict[str, Any], body: Any, *, write: bool = False) -> Any:
    uuid = getattr(handle, "uuid", None)
    try:
        if not _initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        with locked_state(write=write) as state:
            result = body(state, _gpu(state, uuid) if uuid is not None else None)
    except NVMLError as exc:
        _log(fn, uuid, args, exc.value)
        raise
    _log(fn, uuid, args, None)
    return result


# -- the pynvml functions ------------------------------------------------------
def nvmlInit() -> None:  # noqa: N802 - vendor names
    global _initialised
    with locked_state() as state:
        code = state.get("init_error")
    _log("nvmlInit", None, {}, code)
    if code is not None:
        raise NVMLError(int(code))
    _initialised += 1


def nvmlShutdown() -> None:  # noqa: N802
    global _initialised
    _log("nvmlShutdown", None, {}, None if _initialised else NVML_ERROR_UNINITIALIZED)
    if not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _initialised -= 1


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> FakeHandle:  # noqa: N802
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return _call("nvmlDeviceGetHandleByUUID", FakeHandle(text), {}, lambda _s, g: FakeHandle(g["uuid"]))


def nvmlDeviceGetPowerManagementLimitConstraints(handle: FakeHandle) -> list[int]:  # noqa: N802
    return _call("nvmlDeviceGetPowerManagementLimitConstraints", handle, {},
                 lambda _s, g: [int(g["min_mw"]), int(g["max_mw"])])


def nvmlDeviceGetPowerManagementDefaultLimit(handle: FakeHandle) -> int:  # noqa: N802
    return _call("nvmlDeviceGetPowerManagementDefaultLimit", handle, {}, lambda _s, g: int(g["default_mw"]))


def nvmlDeviceGetPowerManagementLimit(handle: FakeHandle) -> int:  # noqa: N802
    return _call("nvmlDeviceGetPowerManagementLimit", handle, {}, lambda _s, g: int(g["limit_mw"]))


def nvmlDeviceGetEnforcedPowerLimit(handle: FakeHandle) -> int:  # noqa: N802
    return _call("nvmlDeviceGetEnforcedPowerLimit", handle, {}, lambda _s, g: enforced_mw(g))


def nvmlDeviceSetPowerManagementLimit(handle: FakeHandle, limit: int) -> None:  # noqa: N802
    def body(state: dict[str, Any], gpu: dict[str, Any]) -> None:
        deny = state.get("deny_set")
        if deny is True or (isinstance(deny, list) and gpu["uuid"] in deny):
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        if state.get("set_error") is not None:
            raise NVMLError(int(state["set_error"]))
        if not isinstance(limit, int) or not gpu["min_mw"] <= limit <= gpu["max_mw"]:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu["limit_mw"] = limit

    _call("nvmlDeviceSetPowerManagementLimit", handle, {"limit_mw": limit}, body, write=True)


def nvmlDeviceGetCurrentClocksEventReasons(handle: FakeHandle) -> int:  # noqa: N802
    return _call("nvmlDeviceGetCurrentClocksEventReasons", handle, {},
                 lambda _s, g: int(g.get("event_reasons", 0)))


def nvmlDeviceGetViolationStatus(handle: FakeHandle, perfPolicyType: int) -> FakeViolationTime:  # noqa: N802,N803
    def body(_s: dict[str, Any], gpu: dict[str, Any]) -> FakeViolationTime:
        if perfPolicyType != NVML_PERF_POLICY_POWER:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return FakeViolationTime(int(gpu.get("violation_ns", 0)))

    return _call("nvmlDeviceGetViolationStatus", handle, {"policy": perfPolicyType}, body)


# -- helpers for tests ---------------------------------------------------------
def make_gpu(uuid: str, *, min_w: float = 200, max_w: float = 700, default_w: float = 700,
             limit_w: float | None = None, **extra: Any) -> dict[str, Any]:
    """One simulated GPU (an H100 by default: 200–700 W, default 700 W)."""
    return {"uuid": uuid, "name": "FAKE NVIDIA H100", "min_mw": int(min_w * 1000), "max_mw": int(max_w * 1000),
            "default_mw": int(default_w * 1000),
            "limit_mw": int((default_w if limit_w is None else limit_w) * 1000),
            "other_limit_mw": None, "event_reasons": 0, "violation_ns": 0, **extra}


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
FAKE_MODULE = "fake_nvml_impl"  # marks every import of this fake
