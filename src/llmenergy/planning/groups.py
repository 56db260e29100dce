"""Packing: cells that share a model load run one after another in one Slurm job.

Cells of the same model, GPU type, shards, engine and power cap have the same
layout (nodes × GPUs), the same weights on the same ranks and the same cap, so
one job can load the model once and run them in order (``packing: group``).
Each cell keeps its own KV cache, idle baseline, phases and outputs.

A group's ``--time`` is the sum of its (unfinished) cells' estimates, each
corrected by what finished cells of the same model and GPU type really took
(:func:`correction_factors`), with the same margins as a single cell's
(:func:`llmenergy.planning.matrix.time_limit_min`).
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmenergy.cellfiles import Cell
from llmenergy.config import Config
from llmenergy.errors import ConfigError
from llmenergy.planning.matrix import estimate_runtime_s, time_limit_min

log = logging.getLogger(__name__)

PACKINGS = ("group", "cell")
#: A learned correction never shrinks or grows an estimate beyond these factors.
FACTOR_RANGE = (0.05, 20.0)


def resolve_packing(cfg: Config, default: str = "group") -> str:
    """The config's ``packing``, else the route's ``default``."""
    packing = cfg.packing or default
    if packing not in PACKINGS:
        raise ConfigError(f"{cfg.source}: packing: {packing!r} must be one of {', '.join(PACKINGS)}")
    return packing


def group_id(cell: Cell) -> str:
    """The id of the group ``cell`` belongs to: what the cells of a group share."""
    cap = "none" if cell.power_cap_w is None else f"{cell.power_cap_w:g}W"
    return f"{cell.model}_{cell.gpu}_s{cell.shards}_p{cap}_{cell.engine}"


@dataclass(frozen=True)
class Group:
    """Cells run in one job with one model load, in order."""

    id: str
    cells: tuple[Cell, ...]

    @property
    def first(self) -> Cell:
        return self.cells[0]

    @property
    def cell_ids(self) -> list[str]:
        return [c.id for c in self.cells]


def make_groups(cells: Iterable[Cell]) -> list[Group]:
    """Group ``cells`` (in plan order: groups by first appearance, cells in order within)."""
    by_id: dict[str, list[Cell]] = {}
    for cell in cells:
        by_id.setdefault(group_id(cell), []).append(cell)
    return [Group(gid, tuple(members)) for gid, members in by_id.items()]


def find_group(cfg: Config, cells: Iterable[Cell], gid: str) -> Group:
    """The planned group ``gid`` (one line naming the config when there is none)."""
    for g in make_groups(cells):
        if g.id == gid:
            return g
    raise ConfigError(f"{cfg.source}: group {gid!r} is not in the plan (see `llmenergy plan`)")


def correction_factors(cfg: Config, measured: Iterable[tuple[Cell, float]]) -> dict[tuple[str, str], float]:
    """``{(model, gpu): median of measured wall time / estimate}`` over finished cells.

    ``measured`` holds (cell, wall seconds) of finished cells (``cell.json``'s
    ``provenance.wall_s``). Factors are clipped to :data:`FACTOR_RANGE`.
    """
    ratios: dict[tuple[str, str], list[float]] = {}
    for cell, wall_s in measured:
        if wall_s is None or wall_s <= 0 or cell.model not in cfg.models or cell.gpu not in cfg.gpus:
            continue
        ratios.setdefault((cell.model, cell.gpu), []).append(wall_s / estimate_runtime_s(cfg, cell))
    lo, hi = FACTOR_RANGE
    return {key: min(hi, max(lo, statistics.median(vals))) for key, vals in ratios.items()}


def corrected_runtime_s(cfg: Config, cell: Cell, factors: dict[tuple[str, str], float] | None = None) -> float:
    """The cell's estimate, corrected by its (model, gpu) factor where one was learned."""
    return estimate_runtime_s(cfg, cell) * (factors or {}).get((cell.model, cell.gpu), 1.0)


def group_runtime_s(cfg: Config, cells: Sequence[Cell],
                    factors: dict[tuple[str, str], float] | None = None) -> float:
    """The estimated wall time of running ``cells`` in one job: the sum of theirs."""
    return sum(corrected_runtime_s(cfg, c, factors) for c in cells)


def group_time_limit_min(cfg: Config, cells: Sequence[Cell],
                         factors: dict[tuple[str, str], float] | None = None) -> int:
    """The ``--time`` of a job running ``cells``: the margins of a single cell's over their sum."""
    return time_limit_min(group_runtime_s(cfg, cells, factors))
