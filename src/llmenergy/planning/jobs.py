"""One job request for every route: what a Slurm job of some cells asks for.

Snakemake (:mod:`llmenergy.orchestrate.smk`), ``llmenergy submit`` and
``llmenergy plan`` all size a job with :func:`job_request`, from

* the job's cells (one cell under ``packing: cell``; a group, or a part of one,
  under ``packing: group``),
* the attempt (Snakemake's ``attempt``; 1 elsewhere),
* what earlier jobs left (:func:`read_history`: each cell's last record).

The request:

* **layout**: the cells' (the same for every cell of a group);
* **host memory**: the largest of the cells' (:func:`~llmenergy.planning.matrix.host_mem_mb`);
* **time limit** (``time_limit_min``, sbatch's ``--time``): twice the estimate plus
  10 min, at least 15 (:func:`time_limit_min`), over the sum of the unfinished
  cells' estimates, each corrected by the one learned factor of its model and GPU
  type (:func:`learned_factors`); at least twice the previous limit when a cell's
  last record is ``incomplete``; times the attempt (:func:`retry_time_limit_min`);
  never more than the partition accepts (:func:`max_time_min`).

Jobs fit the partition: the longest job a GPU type's partition accepts is the
smaller of ``gpus.<type>.max_time_min`` and Slurm's ``MaxTime`` of the partition
(``sinfo``, read once per process: :func:`partition_limits`). A group whose time
limit would exceed it is split into consecutive parts (:func:`split_by_time`),
each with the margin of every job: a part fits when twice its estimate plus
10 min (at least 15 min) is within the limit. A cell that does not fit even alone
runs alone, asking for the whole limit (the plan says so).
"""
from __future__ import annotations

import functools
import logging
import math
import shutil
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from llmenergy import slurm
from llmenergy.cellfiles import Cell, accepted, peek_record
from llmenergy.config import Config
from llmenergy.planning.groups import make_groups, part_id
from llmenergy.planning.matrix import estimate_runtime_s, host_mem_mb

log = logging.getLogger(__name__)

#: A learned correction never shrinks or grows an estimate beyond these factors.
FACTOR_RANGE = (0.05, 20.0)
#: The time limit of a job: ``TIME_FACTOR`` × its estimate + ``TIME_EXTRA_MIN``, at least ``TIME_FLOOR_MIN``.
TIME_FACTOR = 2
TIME_EXTRA_MIN = 10
TIME_FLOOR_MIN = 15


# --------------------------------------------------------------------------- #
# What earlier jobs left
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class CellHistory:
    """A cell's last record (``cell.json``, else ``failed/{cell}.json``)."""

    status: str
    finished: bool  #: accepted under the config's policies
    wall_s: float | None  #: the measured wall time of a finished cell
    time_limit_min: int | None  #: its job's time limit, as Slurm reported it


@dataclass(frozen=True)
class History:
    """Every planned cell's last record and the runtime factors learned from them."""

    cells: Mapping[str, CellHistory] = field(default_factory=dict)
    factors: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def finished(self, cell: Cell) -> bool:
        return self.finished_id(cell.id)

    def finished_id(self, cell_id: str) -> bool:
        h = self.cells.get(cell_id)
        return h is not None and h.finished

    def unfinished(self, cells: Sequence[Cell]) -> list[Cell]:
        """The cells a job would run now (all of them when every one is finished: a forced
        rerun sizes its job for the whole set)."""
        todo = [c for c in cells if not self.finished(c)]
        return todo or list(cells)


def read_history(cfg: Config, cells: Iterable[Cell]) -> History:
    """Read each cell's last record (a few bytes each) and learn the runtime factors."""
    cell_list = list(cells)
    out: dict[str, CellHistory] = {}
    for cell in cell_list:
        files = cell.files(cfg.output_dir)
        for path in (files.record, files.failed_record()):
            data = peek_record(path)
            if data is None:
                continue
            status = str(data.get("status"))
            prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
            wall, limit = prov.get("wall_s"), prov.get("slurm_time_limit_min")
            finished = accepted(status, cfg.policies)
            out[cell.id] = CellHistory(
                status=status, finished=finished,
                wall_s=float(wall) if finished and isinstance(wall, (int, float)) and wall > 0 else None,
                time_limit_min=limit if isinstance(limit, int) and not isinstance(limit, bool) else None)
            break
    measured = [(c, out[c.id].wall_s) for c in cell_list if c.id in out and out[c.id].wall_s]
    return History(out, learned_factors(cfg, measured))


def learned_factors(cfg: Config, measured: Iterable[tuple[Cell, float | None]]) -> dict[tuple[str, str], float]:
    """``{(model, gpu): median of measured wall time / estimate}`` over finished cells,
    clipped to :data:`FACTOR_RANGE`. ``measured`` holds (cell, ``provenance.wall_s``)."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for cell, wall_s in measured:
        if wall_s is None or wall_s <= 0 or cell.model not in cfg.models or cell.gpu not in cfg.gpus:
            continue
        ratios.setdefault((cell.model, cell.gpu), []).append(wall_s / estimate_runtime_s(cfg, cell))
    lo, hi = FACTOR_RANGE
    return {key: min(hi, max(lo, statistics.median(vals))) for key, vals in ratios.items()}


def corrected_runtime_s(cfg: Config, cell: Cell, factors: Mapping[tuple[str, str], float] | None = None) -> float:
    """The cell's estimate, corrected by its (model, gpu) factor where one was learned."""
    return estimate_runtime_s(cfg, cell) * (factors or {}).get((cell.model, cell.gpu), 1.0)


def runtime_s(cfg: Config, cells: Sequence[Cell], factors: Mapping[tuple[str, str], float] | None = None) -> float:
    """The estimated wall time of running ``cells`` in one job: the sum of theirs."""
    return sum(corrected_runtime_s(cfg, c, factors) for c in cells)


# --------------------------------------------------------------------------- #
# Time limits
# --------------------------------------------------------------------------- #

def time_limit_min(estimate_s: float) -> int:
    """The time limit of a job of ``estimate_s`` estimated work: twice it plus 10 min,
    at least 15 min."""
    return max(TIME_FLOOR_MIN, math.ceil(estimate_s * TIME_FACTOR / 60) + TIME_EXTRA_MIN)


def retry_time_limit_min(base_min: int, attempt: int = 1, *, previous_status: str | None = None,
                         previous_limit_min: int | None = None) -> int:
    """``base_min`` times the ``attempt`` (a retried job asks for more), and at least twice
    the previous job's limit when a cell's last record is ``incomplete`` (stopped by the
    time-limit signal, or cancelled: either way a longer job does no harm)."""
    base = base_min
    if previous_status == "incomplete":
        base = max(base, 2 * (previous_limit_min or base_min))
    return base * max(1, int(attempt))


# --------------------------------------------------------------------------- #
# The longest job a partition accepts
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class PartitionLimits:
    """Slurm's ``MaxTime`` per partition in minutes (None: unlimited), and the default partition."""

    max_time_min: Mapping[str, int | None] = field(default_factory=dict)
    default: str | None = None

    def of(self, partition: str | None) -> int | None:
        name = partition or self.default
        return None if name is None else self.max_time_min.get(name)


def parse_sinfo_limits(text: str) -> PartitionLimits:
    """``sinfo -h -o "%P %l"`` output → :class:`PartitionLimits` (pure).

    ``gpu* 1-00:00:00`` is the default partition with a one-day limit; ``infinite``,
    ``UNLIMITED`` or anything unreadable is no limit. A partition listed twice keeps
    its smallest limit.
    """
    limits: dict[str, int | None] = {}
    default = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, raw = parts[0], parts[1]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        minutes = slurm.parse_time_limit_min(raw)
        if name in limits:  # listed twice: the smallest limit (None is no limit)
            known = limits[name]
            minutes = known if minutes is None else minutes if known is None else min(known, minutes)
        limits[name] = minutes
    return PartitionLimits(limits, default)


def _run_sinfo() -> str | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("sinfo failed: %s", exc)
        return None
    return proc.stdout if proc.returncode == 0 else None


def read_partition_limits(run: Callable[[], str | None] = _run_sinfo) -> PartitionLimits:
    """The partitions' limits from Slurm; none known where Slurm does not answer."""
    text = run()
    return PartitionLimits() if text is None else parse_sinfo_limits(text)


@functools.cache
def partition_limits() -> PartitionLimits:
    """:func:`read_partition_limits`, asked once per process (a plan, a submission, a
    Snakefile parse)."""
    return read_partition_limits()


def max_time_min(cfg: Config, gpu: str, limits: PartitionLimits | None = None) -> int | None:
    """The longest job GPU type ``gpu`` may ask for: the smaller of ``gpus.<gpu>.max_time_min``
    and its partition's ``MaxTime``; None when neither is known."""
    spec = cfg.gpus[gpu]
    known = [m for m in (spec.max_time_min, (limits or PartitionLimits()).of(spec.partition)) if m is not None]
    return min(known) if known else None


# --------------------------------------------------------------------------- #
# Splitting a group into jobs that fit
# --------------------------------------------------------------------------- #

def split_by_time(estimates_s: Sequence[float], max_min: int | None) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` ranges of ``estimates_s``, each as long as it can be
    while its :func:`time_limit_min` stays within ``max_min`` (pure). A single estimate
    that does not fit alone is a range of its own; no limit: one range."""
    if not estimates_s:
        return []
    if max_min is None:
        return [(0, len(estimates_s))]
    out: list[tuple[int, int]] = []
    start, total = 0, 0.0
    for i, est in enumerate(estimates_s):
        if i > start and time_limit_min(total + est) > max_min:
            out.append((start, i))
            start, total = i, 0.0
        total += est
    out.append((start, len(estimates_s)))
    return out


@dataclass(frozen=True)
class Job:
    """The cells one Slurm job runs: a cell (``packing: cell``), a group, or a part of a
    group that does not fit its partition in one job."""

    id: str  #: the cell id, the group id, or the part id (:func:`~llmenergy.planning.groups.part_id`)
    group_id: str
    cells: tuple[Cell, ...]
    part: int = 1
    parts: int = 1
    max_time_min: int | None = None

    @property
    def first(self) -> Cell:
        return self.cells[0]

    def fits(self, cfg: Config) -> bool:
        """Whether the job's cells fit its partition's limit with the margin of every job."""
        return self.max_time_min is None or time_limit_min(runtime_s(cfg, self.cells)) <= self.max_time_min


def group_jobs(cfg: Config, cells: Iterable[Cell], limits: PartitionLimits | None = None) -> list[Job]:
    """The jobs of ``packing: group``: one per group, or its consecutive parts where the
    group's time limit exceeds the partition's. The split uses the plain estimates (no
    learning), so that a part's id and cells stay the same from run to run."""
    out: list[Job] = []
    for g in make_groups(cells):
        limit = max_time_min(cfg, g.first.gpu, limits)
        ranges = split_by_time([estimate_runtime_s(cfg, c) for c in g.cells], limit)
        if len(ranges) == 1:
            out.append(Job(g.id, g.id, g.cells, max_time_min=limit))
            continue
        for k, (a, b) in enumerate(ranges, start=1):
            out.append(Job(part_id(g.id, a + 1, b), g.id, g.cells[a:b], k, len(ranges), limit))
    return out


def cell_jobs(cfg: Config, cells: Iterable[Cell], limits: PartitionLimits | None = None) -> list[Job]:
    """The jobs of ``packing: cell``: one per cell (a cell is never split)."""
    return [Job(c.id, c.id, (c,), max_time_min=max_time_min(cfg, c.gpu, limits)) for c in cells]


# --------------------------------------------------------------------------- #
# The request
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class JobRequest:
    resources: slurm.Resources
    todo: tuple[Cell, ...]  #: the cells it sizes for (the unfinished ones)
    estimate_s: float  #: their learned estimate
    clipped: bool  #: the time limit was cut to the partition's


def job_request(cfg: Config, cells: Sequence[Cell], *, attempt: int = 1, history: History | None = None,
                max_time_min: int | None = None) -> JobRequest:
    """The Slurm request of one job running ``cells`` (see the module's docstring)."""
    history = history or History()
    todo = history.unfinished(cells)
    first = todo[0]
    estimate = runtime_s(cfg, todo, history.factors)
    prev = [history.cells[c.id] for c in todo if c.id in history.cells and not history.cells[c.id].finished]
    incomplete = [h for h in prev if h.status == "incomplete"]
    limits = [h.time_limit_min for h in incomplete if h.time_limit_min]
    minutes = retry_time_limit_min(time_limit_min(estimate), attempt,
                                   previous_status="incomplete" if incomplete else None,
                                   previous_limit_min=max(limits) if limits else None)
    clipped = max_time_min is not None and minutes > max_time_min
    if clipped:
        minutes = max_time_min  # type: ignore[assignment]
    res = slurm.resources_for(first.shards, cfg.gpus[first.gpu], minutes,
                              mem_mb=max(host_mem_mb(cfg, c)[0] for c in todo))
    return JobRequest(res, tuple(todo), estimate, clipped)
