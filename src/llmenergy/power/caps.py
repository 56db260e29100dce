"""GPU power caps: backends, validation, apply with a state file first, idempotent restore.

A cap is applied in this order, so that a restorer can always find the
previous limit: read every GPU's constraints and current (enforced) limit,
validate the request, write the state file (atomic), then set each GPU and read
the enforced limit back, rewriting the state file.  If any set fails, the GPUs
already changed are put back before the error is raised.  :func:`restore_caps`
sets the previous limits again and records the result in the same file; a
second call changes nothing.

Backends: NVML (``nvmlDeviceSetPowerManagementLimit``, needs root) and DCGM
(``dcgmConfigSet`` through ``pydcgm``, needs a host engine running as root).
A refusal becomes :class:`~llmenergy.errors.PowerCapDenied`; other vendor
errors :class:`~llmenergy.errors.PowerCapError`.  The vendor libraries are
reached through :mod:`~llmenergy.power.backends.nvml_lib` and
:mod:`~llmenergy.power.backends.dcgm_lib` (initialisation, GPUs by UUID, error
mapping), which tests patch with the fakes.

The per-node guard process that calls these lives in :mod:`llmenergy.power.guard`.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from llmenergy.atomic import write_json
from llmenergy.errors import ConfigError, PowerCapDenied, PowerCapError
from llmenergy.power.backends import dcgm_lib, nvml_lib

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SW_POWER_CAP_BIT = 0x4  # clock-event reason "software power cap" (NVML and DCGM field 112)


def validate_cap(watts: float, min_w: float, max_w: float, key: str) -> float:
    """Return ``watts`` as a float, or raise ConfigError naming ``key`` when outside ``[min_w, max_w]``."""
    try:
        value = float(watts)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {watts!r} must be a number of watts") from None
    if not min_w <= value <= max_w:
        raise ConfigError(f"{key}: {value:g} W is outside the GPU's range {min_w:g}–{max_w:g} W")
    return value


# -- backends ------------------------------------------------------------------
class CapBackend(abc.ABC):
    """Reads and sets the power limit of GPUs named by UUID.  Watts everywhere."""

    name = "abstract"

    @abc.abstractmethod
    def limits_w(self, uuid: str) -> tuple[float, float, float]:
        """(min_w, max_w, default_w) the GPU accepts."""

    @abc.abstractmethod
    def get_limit_w(self, uuid: str) -> float:
        """The enforced power limit now."""

    def get_setting_w(self, uuid: str) -> float:
        """The power-management limit as set (what a restore puts back); the enforced
        limit may be lower when another limit binds."""
        return self.get_limit_w(uuid)

    @abc.abstractmethod
    def set_limit_w(self, uuid: str, watts: float) -> None:
        """Set the power-management limit; PowerCapDenied when refused."""

    @abc.abstractmethod
    def throttle(self, uuid: str) -> dict[str, Any]:
        """``{"clock_event_reasons": int|None, "sw_power_cap": bool|None, "power_violation_ns": int|None}``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the vendor library."""

    def __enter__(self) -> CapBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _throttle_dict(reasons: int | None, violation_ns: int | None) -> dict[str, Any]:
    return {
        "clock_event_reasons": reasons,
        "sw_power_cap": None if reasons is None else bool(reasons & SW_POWER_CAP_BIT),
        "power_violation_ns": violation_ns,
    }


class NvmlCapBackend(CapBackend):
    name = "nvml"

    def __init__(self) -> None:
        with nvml_lib.cap_errors("initialise NVML"):
            self._nvml = nvml_lib.NvmlSession()

    def _handle(self, uuid: str) -> Any:
        with nvml_lib.cap_errors("find GPU", uuid):
            return self._nvml.handle(uuid)

    def limits_w(self, uuid: str) -> tuple[float, float, float]:
        handle = self._handle(uuid)
        with nvml_lib.cap_errors("read power-limit constraints", uuid):
            min_mw, max_mw = nvml_lib.pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            default_mw = nvml_lib.pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        return min_mw / 1000.0, max_mw / 1000.0, default_mw / 1000.0

    def get_limit_w(self, uuid: str) -> float:
        handle = self._handle(uuid)
        with nvml_lib.cap_errors("read enforced power limit", uuid):
            return nvml_lib.pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0

    def get_setting_w(self, uuid: str) -> float:
        handle = self._handle(uuid)
        with nvml_lib.cap_errors("read power-management limit", uuid):
            return nvml_lib.pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0

    def set_limit_w(self, uuid: str, watts: float) -> None:
        handle = self._handle(uuid)
        with nvml_lib.cap_errors(f"set power limit to {watts:g} W", uuid):
            nvml_lib.pynvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(watts * 1000)))
        log.info("nvml: %s: power limit set to %g W", uuid, watts)

    def throttle(self, uuid: str) -> dict[str, Any]:
        handle = self._handle(uuid)
        reasons = violation = None
        with contextlib.suppress(*nvml_lib.vendor_errors(), AttributeError, TypeError):
            reasons = self._nvml.clock_event_reasons(handle)
        with contextlib.suppress(*nvml_lib.vendor_errors(), AttributeError, TypeError):
            violation = self._nvml.power_violation_ns(handle)
        return _throttle_dict(reasons, violation)

    def close(self) -> None:
        self._nvml.close()


class DcgmCapBackend(CapBackend):
    """Sets caps with ``dcgmConfigSet`` (through ``DcgmGroup.config.Set``) on one-GPU groups.

    Reads limits from the GPU attributes.  Throttle counters come from NVML
    (read-only, no privilege needed), since DCGM only has them as watched fields.
    """

    name = "dcgm"

    def __init__(self, host: str | None = None) -> None:
        self._nvml: NvmlCapBackend | None = None
        self._dcgm = dcgm_lib.connect_for_caps(host)
        self._mods = self._dcgm.mods
        with dcgm_lib.cap_errors(self._mods, "list GPUs"):
            self._gpu_ids = {uuid: gpu_id for gpu_id, uuid, _name in self._dcgm.gpus()}

    def _gpu_id(self, uuid: str) -> int:
        if uuid not in self._gpu_ids:
            raise PowerCapError(f"dcgm: GPU {uuid} is not seen by DCGM")
        return self._gpu_ids[uuid]

    def _power_limits(self, uuid: str) -> Any:
        with dcgm_lib.cap_errors(self._mods, "read power limits", uuid):
            return self._dcgm.system.discovery.GetGpuAttributes(self._gpu_id(uuid)).powerLimits

    def limits_w(self, uuid: str) -> tuple[float, float, float]:
        p = self._power_limits(uuid)
        return float(p.minPowerLimit), float(p.maxPowerLimit), float(p.defaultPowerLimit)

    def get_limit_w(self, uuid: str) -> float:
        return float(self._power_limits(uuid).enforcedPowerLimit)

    def get_setting_w(self, uuid: str) -> float:
        return float(self._power_limits(uuid).curPowerLimit)

    def set_limit_w(self, uuid: str, watts: float) -> None:
        gpu_id = self._gpu_id(uuid)
        structs = self._mods.dcgm_structs
        with dcgm_lib.cap_errors(self._mods, f"set power limit to {watts:g} W", uuid):
            group = self._dcgm.system.GetGroupWithGpuIds(f"llmenergy_cap_{os.getpid()}_{gpu_id}", [gpu_id])
            try:
                group.config.Set(dcgm_lib.power_cap_config(self._mods, gpu_id, watts))
            finally:
                with contextlib.suppress(structs.DCGMError):
                    group.Delete()
        log.info("dcgm: %s: power limit set to %g W", uuid, watts)

    def throttle(self, uuid: str) -> dict[str, Any]:
        try:
            if self._nvml is None:
                self._nvml = NvmlCapBackend()
            return self._nvml.throttle(uuid)
        except PowerCapError as exc:
            log.debug("dcgm: throttle counters unavailable: %s", exc)
            return _throttle_dict(None, None)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
        self._dcgm.close()


def make_backend(name: str, *, dcgm_host: str | None = None) -> CapBackend:
    if name == "nvml":
        return NvmlCapBackend()
    if name == "dcgm":
        return DcgmCapBackend(dcgm_host)
    raise PowerCapError(f"powercap: unknown backend {name!r} (nvml|dcgm)")


# -- state ---------------------------------------------------------------------
@dataclasses.dataclass
class GpuCap:
    uuid: str
    previous_w: float  # the power-management limit before (what restore sets)
    requested_w: float
    min_w: float
    max_w: float
    default_w: float
    enforced_w: float | None = None
    previous_enforced_w: float | None = None
    unchanged: bool = False  # already at the requested limit (e.g. set by a site prolog): not touched
    set_attempted: bool = False
    set_ok: bool = False
    restored_w: float | None = None
    restore_error: str | None = None
    throttle_start: dict[str, Any] | None = None
    throttle_end: dict[str, Any] | None = None


@dataclasses.dataclass
class CapState:
    """What was capped where, and whether it was put back.  Saved as JSON at ``path``."""

    node: str
    backend: str
    requested_w: float
    gpus: list[GpuCap]
    status: str = "planned"  # planned|applying|applied|denied|error
    reason: str | None = None
    pid: int = dataclasses.field(default_factory=os.getpid)
    created_at_ns: int = dataclasses.field(default_factory=time.time_ns)
    applied_at_ns: int | None = None
    restored: bool = False
    restore_reason: str | None = None
    restore_started_at_ns: int | None = None
    restored_at_ns: int | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return {"schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> CapState:
        fields = {f.name for f in dataclasses.fields(cls)} - {"gpus", "path"}
        gpu_fields = {f.name for f in dataclasses.fields(GpuCap)}
        gpus = [GpuCap(**{k: v for k, v in g.items() if k in gpu_fields}) for g in data.get("gpus", [])]
        return cls(gpus=gpus, path=None if path is None else str(path),
                   **{k: v for k, v in data.items() if k in fields})

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.to_json())

    @property
    def changed(self) -> list[GpuCap]:
        """GPUs whose limit this state may have changed (a set was attempted and not refused)."""
        return [g for g in self.gpus if g.set_ok or (g.set_attempted and self.status != "denied")]


def state_path(state_dir: str | os.PathLike[str], node: str) -> Path:
    return Path(state_dir) / f"{node}.json"


def load_state(path: str | os.PathLike[str]) -> CapState:
    try:
        return CapState.from_json(json.loads(Path(path).read_text()), path)
    except (OSError, ValueError, TypeError) as exc:
        raise PowerCapError(f"powercap: cannot read state file {path}: {exc}") from exc


def _safe_throttle(backend: CapBackend, uuid: str) -> dict[str, Any] | None:
    try:
        return backend.throttle(uuid)
    except PowerCapError as exc:
        log.debug("powercap: %s: throttle counters: %s", uuid, exc)
        return None


def apply_caps(backend: CapBackend, uuid_list: list[str], watts: float, *, node: str = "",
               path: str | os.PathLike[str] | None = None, key: str = "power_cap_w") -> CapState:
    """Validate ``watts`` on every GPU, save the state (with previous limits), then set and read back.

    A GPU already at the requested limit is not touched (``unchanged``), so a
    cap set by a site prolog is accepted even where this process may not set one.

    Raises ConfigError (nothing changed, nothing saved), PowerCapDenied or
    PowerCapError (GPUs already changed are restored first; the state is saved
    with status denied/error; any other exception is handled the same way).
    The exception carries the state as ``cap_state``.
    """
    gpus = []
    for uuid in dict.fromkeys(uuid_list):
        min_w, max_w, default_w = backend.limits_w(uuid)
        requested_w = validate_cap(watts, min_w, max_w, key)
        gpus.append(GpuCap(uuid=uuid, previous_w=backend.get_setting_w(uuid), requested_w=requested_w,
                           min_w=min_w, max_w=max_w, default_w=default_w,
                           previous_enforced_w=backend.get_limit_w(uuid)))
    state = CapState(node=node, backend=backend.name, requested_w=float(watts), gpus=gpus, status="applying",
                     path=None if path is None else str(path))
    state.save()  # before any change: a restorer can always find the previous limits
    try:
        for gpu in state.gpus:
            gpu.throttle_start = _safe_throttle(backend, gpu.uuid)
            if abs(gpu.previous_w - gpu.requested_w) < 0.5:
                gpu.unchanged = True
                gpu.enforced_w = backend.get_limit_w(gpu.uuid)
                log.info("powercap: %s: already at %g W; left as is", gpu.uuid, gpu.previous_w)
                continue
            gpu.set_attempted = True
            backend.set_limit_w(gpu.uuid, gpu.requested_w)
            gpu.set_ok = True
            gpu.enforced_w = backend.get_limit_w(gpu.uuid)
            if abs(gpu.enforced_w - gpu.requested_w) > 0.5:
                log.warning("powercap: %s: requested %g W, enforced %g W (another limit is lower)",
                            gpu.uuid, gpu.requested_w, gpu.enforced_w)
            state.save()
    except BaseException as exc:  # roll back whatever was changed, whatever went wrong
        state.status = "denied" if isinstance(exc, PowerCapDenied) else "error"
        state.reason = str(exc) or type(exc).__name__
        state.save()
        if state.changed:
            restore_caps(backend, state, reason=f"apply failed: {state.status}")
        exc.cap_state = state  # type: ignore[attr-defined]
        raise
    state.status = "applied"
    state.applied_at_ns = time.time_ns()
    state.save()
    return state


def restore_caps(backend: CapBackend, state: CapState, *, reason: str = "stop") -> list[dict[str, Any]]:
    """Set every changed GPU back to its previous limit; GPUs already restored are left alone.

    Returns one result per changed GPU and saves the state (``restored``, times, reason).
    """
    if state.restore_started_at_ns is None:
        state.restore_started_at_ns = time.time_ns()
    results = []
    for gpu in state.changed:
        if gpu.restored_w is not None:
            results.append({"uuid": gpu.uuid, "previous_w": gpu.previous_w, "restored_w": gpu.restored_w,
                            "ok": True, "already": True})
            continue
        gpu.throttle_end = _safe_throttle(backend, gpu.uuid) or gpu.throttle_end
        try:
            backend.set_limit_w(gpu.uuid, gpu.previous_w)
            gpu.restored_w = backend.get_setting_w(gpu.uuid)
            gpu.restore_error = None
        except PowerCapError as exc:
            gpu.restore_error = str(exc)
            log.error("powercap: %s: restore to %g W failed: %s", gpu.uuid, gpu.previous_w, exc)
        results.append({"uuid": gpu.uuid, "previous_w": gpu.previous_w, "restored_w": gpu.restored_w,
                        "ok": gpu.restore_error is None, "already": False, "error": gpu.restore_error})
    if not state.restored:
        state.restore_reason = reason
    state.restored = all(g.restored_w is not None for g in state.changed)
    if state.restored and state.restored_at_ns is None:
        state.restored_at_ns = time.time_ns()
    state.save()
    return results


# -- report ----------------------------------------------------------------------
def _delta(start: dict[str, Any] | None, end: dict[str, Any] | None, key: str) -> int | None:
    if not start or not end or start.get(key) is None or end.get(key) is None:
        return None
    return int(end[key]) - int(start[key])


def read_cap_report(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``provenance.power_cap`` block of cell.json, from every node's state file.

    ``status`` is the nodes' common status, ``"mixed"``, or ``"missing"`` when no
    state file exists; ``restored`` is true when every limit that was changed is
    back; ``cap_bit`` is true when any GPU spent time power-capped between apply
    and restore (NVML power-violation counter), None when unknown.
    """
    nodes, gpus = [], []
    folder = Path(state_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        state = load_state(path)
        nodes.append({"node": state.node, "backend": state.backend, "status": state.status,
                      "changed": bool(state.changed),
                      "reason": state.reason, "restored": state.restored, "restore_reason": state.restore_reason,
                      "applied_at_ns": state.applied_at_ns, "restored_at_ns": state.restored_at_ns})
        for g in state.gpus:
            throttle_ns = _delta(g.throttle_start, g.throttle_end, "power_violation_ns")
            gpus.append({"node": state.node, "uuid": g.uuid, "previous_w": g.previous_w,
                         "requested_w": g.requested_w, "enforced_w": g.enforced_w, "restored_w": g.restored_w,
                         "previous_enforced_w": g.previous_enforced_w, "unchanged": g.unchanged,
                         "min_w": g.min_w, "max_w": g.max_w, "default_w": g.default_w,
                         "restore_error": g.restore_error, "power_cap_throttle_ns": throttle_ns,
                         "clock_event_reasons_end": (g.throttle_end or {}).get("clock_event_reasons"),
                         "sw_power_cap_end": (g.throttle_end or {}).get("sw_power_cap")})
    statuses = {n["status"] for n in nodes}
    throttles = [g["power_cap_throttle_ns"] for g in gpus if g["power_cap_throttle_ns"] is not None]
    return {
        "requested_w": gpus[0]["requested_w"] if gpus else None,
        "status": "missing" if not nodes else (statuses.pop() if len(statuses) == 1 else "mixed"),
        "restored": bool(nodes) and all(n["restored"] or not n["changed"] for n in nodes),
        "cap_bit": any(t > 0 for t in throttles) if throttles else None,
        "nodes": nodes,
        "gpus": gpus,
    }
