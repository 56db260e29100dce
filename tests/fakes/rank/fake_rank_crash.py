"""FAKE rank failure for tests: a worker rank raises in its first measured batch of a cell.

Used to make a chosen cell fail for real (the worker records it, the launcher
writes ``failed``, Snakemake reruns it) without any hook in ``src/``. With env
``FAKE_CRASH_CELLS=id1,id2``, a worker process (``python -m
llmenergy.inference.worker .../group.json``) gets a ``generate`` that raises
``RuntimeError`` on the first measured batch of a listed cell. The worker runs its
job's cells in order and reads each cell's ``spec.json`` as the cell starts: the
failure is armed for the cell whose spec it read last, so exactly the listed cells
fail and a group goes on.

``FAKE_CRASH_RANKS=1,3`` arms only those ranks (default: every rank), e.g. to make
one rank of two fail alone while the other waits in a collective.

Once a file named by ``FAKE_CRASH_ONCE_DIR``/``ID.rankR`` exists that rank runs the
cell normally; the first crash creates it, so a rerun succeeds.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from fake_import_hook import after_import

TARGET = "llmenergy.inference.generate"
ENV_CELLS = "FAKE_CRASH_CELLS"
ENV_RANKS = "FAKE_CRASH_RANKS"
ENV_ONCE_DIR = "FAKE_CRASH_ONCE_DIR"
MESSAGE = "FAKE rank failure injected by tests/fakes/rank/fake_rank_crash.py"

_current: dict[str, str | None] = {"cell": None}


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _track_specs(module: ModuleType) -> None:
    """Remember the cell of the last ``CellSpec.read`` (the worker's current cell)."""
    real = module.CellSpec.read.__func__

    def read(cls: Any, path: Any) -> Any:
        _current["cell"] = Path(path).parent.name
        return real(cls, path)

    module.CellSpec.read = classmethod(read)


def patch(module: ModuleType, cells: set[str]) -> None:
    real = module.generate

    @functools.wraps(real)
    def generate(*args: Any, **kwargs: Any) -> Any:
        cell = _current["cell"]
        if cell not in cells or kwargs.get("on_phase") is None:  # not listed, or the warm-up
            return real(*args, **kwargs)
        once = os.environ.get(ENV_ONCE_DIR)
        if once:
            marker = Path(once) / f"{cell}.rank{_rank()}"
            if marker.exists():
                return real(*args, **kwargs)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise RuntimeError(MESSAGE)

    module.generate = generate


def install() -> None:
    """Arm the failure for this process when it is a worker rank named (or all); otherwise do nothing."""
    cells = {c.strip() for c in os.environ.get(ENV_CELLS, "").split(",") if c.strip()}
    ranks = {r.strip() for r in os.environ.get(ENV_RANKS, "").split(",") if r.strip()}
    if not cells or (ranks and _rank() not in ranks):
        return
    after_import("llmenergy.cellfiles", _track_specs)
    after_import(TARGET, functools.partial(patch, cells=cells))
