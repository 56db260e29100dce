"""State of the fake DCGM host engine shared by the fake binding modules.

Tests call :func:`reset` to define the GPUs and what the engine allows, then
inspect the records (groups, field groups, watches, handles) after the backend
ran.  Field values are ``gpus[i]["values"][field_id]``; a missing field id is
"blank" (DcgmReader drops blanks by default).
"""
from __future__ import annotations

from typing import Any

PROFILING_FIELD_IDS = frozenset(range(1001, 1013))

gpus: list[dict[str, Any]] = []
profiling_allowed = True
hostengine_addresses: set[str] = set()
library_present = True

next_id = 1
handles: dict[int, dict[str, Any]] = {}        # id -> {"address": str|None, "open": bool}
groups: dict[int, dict[str, Any]] = {}         # id -> {"name", "gpu_ids", "alive"}
field_groups: dict[int, dict[str, Any]] = {}   # id -> {"name", "field_ids", "alive"}
watches: list[dict[str, Any]] = []             # {"group", "field_group", "update_us", "max_keep_age_s"}


def reset(new_gpus: list[dict[str, Any]], *, allow_profiling: bool = True,
          hostengines: tuple[str, ...] = (), library: bool = True) -> None:
    global profiling_allowed, library_present, next_id
    gpus[:] = new_gpus
    profiling_allowed = allow_profiling
    hostengine_addresses.clear()
    hostengine_addresses.update(hostengines)
    library_present = library
    next_id = 1
    handles.clear()
    groups.clear()
    field_groups.clear()
    watches.clear()


def new_id() -> int:
    global next_id
    next_id += 1
    return next_id


def live_watches() -> list[dict[str, Any]]:
    return [w for w in watches
            if groups[w["group"]]["alive"] and field_groups[w["field_group"]]["alive"]]
