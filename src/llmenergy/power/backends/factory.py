"""Pick and build a power backend.

``auto`` tries dcgm → nvml → rapl → none for GPU devices and rapl → none when
every UUID is ``"cpu"`` (a CPU rank).  ``estimate`` is never chosen by ``auto``.
An explicitly named backend that is not available raises SensorUnavailable
(the user asked for it; we do not silently measure something else), except
that GPU backends named for a CPU-only node step down to the CPU chain.

Backends watch exactly the given GPU UUIDs, never other GPUs of a shared node.

``options`` (all optional): ``node`` (str), ``dcgm_host`` (str, ``None`` or
``"embedded"``), ``dcgm_profiling`` (bool, default True), ``rapl_root`` (path),
``tdp_w`` (float, estimate), ``proc_stat`` (path, estimate), ``replay_path``
(path or DataFrame/Table, replay), ``replay_loop`` (bool, default True).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmenergy.config import COLLECTOR_BACKENDS
from llmenergy.errors import ConfigError, SensorError, SensorUnavailable
from llmenergy.power.backends.base import PowerBackend

log = logging.getLogger(__name__)

#: What the collector process takes: the config's backends, and ``replay`` (a recorded series).
BACKEND_NAMES: tuple[str, ...] = (*COLLECTOR_BACKENDS, "replay")
GPU_AUTO_CHAIN: tuple[str, ...] = ("dcgm", "nvml", "rapl", "none")
CPU_AUTO_CHAIN: tuple[str, ...] = ("rapl", "none")
CPU_UUID = "cpu"


def _build(name: str, uuid_list: list[str] | None, interval_ms: int, options: dict[str, Any]) -> PowerBackend:
    node = options.get("node")
    gpu_ids = None if uuid_list is None else [u for u in uuid_list if u != CPU_UUID]
    if name == "dcgm":
        from llmenergy.power.backends.dcgm import DcgmBackend

        return DcgmBackend(gpu_ids, interval_ms=interval_ms, host=options.get("dcgm_host"),
                           profiling=bool(options.get("dcgm_profiling", True)), node=node)
    if name == "nvml":
        try:
            from llmenergy.power.backends.nvml import NvmlBackend
        except ImportError as exc:  # nvidia-ml-py missing
            raise SensorUnavailable(f"nvml: pynvml not importable ({exc})") from exc
        return NvmlBackend(gpu_ids, node=node)
    if name == "rapl":
        from llmenergy.power.backends.rapl import POWERCAP_ROOT, RaplBackend

        return RaplBackend(root=options.get("rapl_root") or POWERCAP_ROOT, node=node)
    if name == "estimate":
        from llmenergy.power.backends.estimate import (
            DEFAULT_TDP_W,
            PROC_STAT,
            EstimateBackend,
        )

        return EstimateBackend(tdp_w=options.get("tdp_w", DEFAULT_TDP_W),
                               proc_stat=options.get("proc_stat") or PROC_STAT, node=node)
    if name == "replay":
        from llmenergy.power.backends.replay import ReplayBackend

        recording = options.get("replay_path")
        if recording is None:
            raise ConfigError("collector.replay_path: required when collector.backend is 'replay'")
        return ReplayBackend(recording, uuid_list=uuid_list if uuid_list and CPU_UUID not in uuid_list else None,
                             loop=bool(options.get("replay_loop", True)), node=node)
    if name == "none":
        from llmenergy.power.backends.null import NullBackend

        return NullBackend(uuid_list, node=node)
    raise ConfigError(f"collector.backend: {name!r} must be one of {', '.join(BACKEND_NAMES)}")


def _cpu_only(uuid_list: list[str] | None) -> bool:
    return bool(uuid_list) and all(u == CPU_UUID for u in uuid_list or [])


def select_backend(
    name: str,
    *,
    uuid_list: list[str] | None,
    interval_ms: int,
    options: dict[str, Any] | None = None,
    builder: Callable[[str, list[str] | None, int, dict[str, Any]], PowerBackend] = _build,
) -> PowerBackend:
    """Build the backend ``name`` for exactly ``uuid_list`` (None = every device it sees).

    ``builder`` is for tests only.
    """
    options = dict(options or {})
    if name not in BACKEND_NAMES:
        raise ConfigError(f"collector.backend: {name!r} must be one of {', '.join(BACKEND_NAMES)}")
    if not isinstance(interval_ms, int) or isinstance(interval_ms, bool) or interval_ms <= 0:
        raise ConfigError(f"collector.interval_ms: {interval_ms!r} must be a positive integer")
    if name != "auto" and not (_cpu_only(uuid_list) and name in ("dcgm", "nvml")):
        backend = builder(name, uuid_list, interval_ms, options)
        log.info("collector backend: %s (requested)", backend.name)
        return backend
    if name != "auto":
        log.warning("collector.backend %r needs GPUs but this node runs CPU ranks only; "
                    "using the CPU chain %s", name, " -> ".join(CPU_AUTO_CHAIN))
    chain = CPU_AUTO_CHAIN if _cpu_only(uuid_list) else GPU_AUTO_CHAIN
    reasons = []
    for candidate in chain:
        try:
            backend = builder(candidate, uuid_list, interval_ms, options)
        except SensorError as exc:  # unavailable, or present but failing to set up
            reasons.append(f"{candidate}: {exc}")
            log.info("collector backend %s unavailable: %s", candidate, exc)
            continue
        log.info("collector backend: %s (auto; skipped: %s)", backend.name, "; ".join(reasons) or "none")
        return backend
    raise SensorUnavailable("no collector backend available: " + "; ".join(reasons))  # unreachable: none
