"""FAKE rank failure for tests: a worker rank raises in its first measured batch.

Used to make a chosen cell fail for real (the worker records it, the launcher
writes ``failed``, Snakemake reruns it) without any hook in ``src/``. With env
``FAKE_CRASH_CELLS=id1,id2``, a worker process (``python -m
llmenergy.inference.worker .../cells/ID/spec.json``) whose cell is listed gets a
``generate`` that raises ``RuntimeError`` on its first measured batch. Once a
file named by ``FAKE_CRASH_ONCE_DIR``/ID exists the cell runs normally; the
first crash creates it, so a rerun succeeds.

A packed group's worker (``... worker --group .../group.json``) runs several
cells: there the failure is armed for the cell whose ``spec.json`` the worker
read last (it reads each cell's spec as the cell starts), so exactly the listed
cells of the group fail and the group goes on.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fake_import_hook import after_import

TARGET = "llmenergy.inference.generate"
ENV_CELLS = "FAKE_CRASH_CELLS"
ENV_ONCE_DIR = "FAKE_CRASH_ONCE_DIR"
MESSAGE = "FAKE rank failure injected by tests/fakes/rank/fake_rank_crash.py"


def _cell_of_this_worker() -> str | None:
    specs = [Path(a) for a in sys.argv if a.endswith("spec.json")]
    return specs[0].parent.name if specs else None


_current: dict[str, str | None] = {"cell": None}


def _track_specs(module: ModuleType) -> None:
    """Remember the cell of the last ``CellSpec.read`` (a packed worker's current cell)."""
    real = module.CellSpec.read.__func__

    def read(cls: Any, path: Any) -> Any:
        _current["cell"] = Path(path).parent.name
        return real(cls, path)

    module.CellSpec.read = classmethod(read)


def patch(module: ModuleType, cell_id: str | None, cells: set[str] | None = None) -> None:
    real = module.generate

    @functools.wraps(real)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if cells is not None:  # a packed group: the cell it is running now
            current = _current["cell"]
            if current not in cells:
                return real(*args, **kwargs)
            return _crash(current, real, *args, packed=True, **kwargs)
        return _crash(cell_id, real, *args, **kwargs)

    module.generate = generate


def _crash(cell_id: str | None, real: Any, *args: Any, packed: bool = False, **kwargs: Any) -> Any:
    if kwargs.get("on_phase") is not None:  # a measured batch, not the warm-up
        once = os.environ.get(ENV_ONCE_DIR)
        if once:
            # packed: one marker per rank, so that every rank of the cell fails together
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
            marker = Path(once) / (f"{cell_id}.rank{rank}" if packed else str(cell_id))
            if marker.exists():
                return real(*args, **kwargs)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise RuntimeError(MESSAGE)
    return real(*args, **kwargs)


def install() -> None:
    """Arm the failure for this process when it is a listed cell's worker; otherwise do nothing."""
    cells = {c.strip() for c in os.environ.get(ENV_CELLS, "").split(",") if c.strip()}
    if cells and "--group" in sys.argv:
        after_import("llmenergy.cellfiles", _track_specs)
        after_import(TARGET, functools.partial(patch, cell_id=None, cells=cells))
        return
    cell = _cell_of_this_worker() if cells else None
    if cell in cells:
        after_import(TARGET, functools.partial(patch, cell_id=cell))
