"""Packing: cells that share a model load run one after another in one Slurm job.

Cells of the same model, GPU type, shards, engine and power cap have the same
layout (nodes × GPUs), the same weights on the same ranks and the same cap, so
one job can load the model once and run them in order (``packing: group``).
Each cell keeps its own KV cache, idle baseline, phases and outputs.

A group longer than its partition accepts runs as consecutive parts, one job
each (:func:`llmenergy.planning.jobs.group_jobs`); a part's id names the group
and the positions of its cells (:func:`part_id`), so that ``run-group`` finds it
without asking Slurm. What a job asks for: :mod:`llmenergy.planning.jobs`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from llmenergy.cellfiles import Cell
from llmenergy.config import Config
from llmenergy.errors import ConfigError

log = logging.getLogger(__name__)

PACKINGS = ("group", "cell")
#: The packing of every route (Snakemake's profiles, ``llmenergy submit``, ``llmenergy plan``)
#: when the config sets none.
DEFAULT_PACKING = "group"
_PART = re.compile(r"^(?P<group>.+)\.cells(?P<first>\d+)-(?P<last>\d+)$")


def resolve_packing(cfg: Config, default: str = DEFAULT_PACKING) -> str:
    """The config's ``packing``, else :data:`DEFAULT_PACKING`."""
    packing = cfg.packing or default
    if packing not in PACKINGS:
        raise ConfigError(f"{cfg.source}: packing: {packing!r} must be one of {', '.join(PACKINGS)}")
    return packing


def group_id(cell: Cell) -> str:
    """The id of the group ``cell`` belongs to: what the cells of a group share."""
    cap = "none" if cell.power_cap_w is None else f"{cell.power_cap_w:g}W"
    prec = "" if cell.precision == "fp16" else f"_{cell.precision}"  # a model load is one precision
    return f"{cell.model}_{cell.gpu}_s{cell.shards}_p{cap}_{cell.engine}{prec}"


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


def part_id(gid: str, first: int, last: int) -> str:
    """The id of the part of group ``gid`` holding its cells ``first``..``last`` (1-based)."""
    return f"{gid}.cells{first}-{last}"


def find_group(cfg: Config, cells: Iterable[Cell], gid: str) -> Group:
    """The planned group ``gid``, or the part of a group a :func:`part_id` names (one line
    naming the config when there is none)."""
    groups = {g.id: g for g in make_groups(cells)}
    if gid in groups:
        return groups[gid]
    m = _PART.match(gid)
    if m and m["group"] in groups:
        g, first, last = groups[m["group"]], int(m["first"]), int(m["last"])
        if 1 <= first <= last <= len(g.cells):
            return Group(gid, g.cells[first - 1:last])
    raise ConfigError(f"{cfg.source}: group {gid!r} is not in the plan (see `llmenergy plan`)")
