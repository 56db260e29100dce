"""The cell contract: a cell's identity, the files it writes, and their schemas, in one place.

Every record that crosses a process boundary is defined here, typed and versioned:

* :class:`Cell`: the identity of one matrix cell (its axes) and its id;
* :class:`CellSpec` (``spec.json``): what the launcher tells a cell's ranks and
  node agents, resolved from the config;
* :class:`WorkerStatus` (``.run/worker_status.json``): rank 0's outcome, read by the launcher;
* :class:`Provenance` and :class:`CellRecord` (``cell.json``, and
  ``failed/{cell}.json``): what happened, written last by the launcher;
* the Arrow schemas of ``events``, ``responses``, ``power`` and ``metrics``;
* the ``.run/`` handshake between ranks, node agents and launcher:
  :class:`RankDevice` (``CellFiles.rank_devices``), :class:`CollectorReady` (``ready/``),
  :class:`CapReady` (``CellFiles.cap_ready``), :class:`CellBegin`, :class:`RankOutcome`;
* re-exported from :mod:`llmenergy.layout`: :class:`CellFiles` (every path of a
  cell's or a packed group's directory) and :class:`RunLayout` (every path of a run).

JSON records carry ``schema_version``; reading a record of another version, or a
file that is not one, raises :class:`~llmenergy.errors.RecordError` naming the file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmenergy import atomic
from llmenergy.config import CollectorSpec, Policies
from llmenergy.data.prompts import DatasetSpec
from llmenergy.errors import RecordError
from llmenergy.layout import CellFiles, RunLayout, node_file, rank_file, rank_of_file  # noqa: F401 - re-exported

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"llmenergy.schema_version"

#: The statuses a cell can end with.
STATUSES = ("ok", "oom", "failed", "incomplete", "power_cap_denied")


# --------------------------------------------------------------------------- #
# Identity
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Cell:
    """One cell of the matrix; its fields are the matrix axes (:data:`AXES`)."""

    model: str
    dataset: str
    gpu: str
    shards: int
    batch_size: int
    max_gen_len: int
    power_cap_w: float | None
    engine: str = "reference"
    precision: str = "fp16"  # arch.PRECISIONS; the default adds nothing to the id

    @property
    def id(self) -> str:
        cap = "none" if self.power_cap_w is None else f"{self.power_cap_w:g}W"
        prec = "" if self.precision == "fp16" else f"_{self.precision}"
        return (f"{self.model}_{self.dataset}_{self.gpu}_s{self.shards}_b{self.batch_size}"
                f"_g{self.max_gen_len}_p{cap}_{self.engine}{prec}")

    def identity(self) -> dict[str, Any]:
        return {"cell_id": self.id, **asdict(self)}

    def dir(self, output_dir: str | Path) -> Path:
        return self.files(output_dir).root

    def files(self, output_dir: str | Path) -> CellFiles:
        return RunLayout(Path(output_dir)).cell(self.id)

    @classmethod
    def from_identity(cls, d: dict[str, Any]) -> Cell:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}
        return cls(**{k: d[k] if k in d else defaults[k] for k in AXES})


#: The matrix axes, in the order of a cell id.
AXES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Cell))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {version!r}, this llmenergy reads {SCHEMA_VERSION}")
    return data


def _fields(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"{path}: missing {', '.join(missing)}")
    return {k: v for k, v in data.items() if k in names}


# --------------------------------------------------------------------------- #
# spec.json
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class CellSpec:
    """What a cell's ranks and node agents are told (``spec.json``), resolved from the config."""

    cell: Cell
    arch: str
    weights: str
    tokenizer: str | None
    stop_at_eos: bool
    device: str  # "cuda" | "cpu"
    dtype: str  # a torch dtype name
    repeats: int
    seed: int
    warmup_tokens: int
    nodes: int
    ranks_per_node: int
    dataset: DatasetSpec
    collector: CollectorSpec
    policies: Policies
    grid_gco2_per_kwh: float | None = None

    @property
    def cell_id(self) -> str:
        return self.cell.id

    @property
    def max_prompt_len(self) -> int:
        return self.dataset.max_prompt_len

    @property
    def max_seq_len(self) -> int:
        return self.dataset.max_prompt_len + self.cell.max_gen_len

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "cell_id": self.cell.id, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = str(CellFiles(Path()).spec)) -> CellSpec:
        values = _fields(cls, data, path)
        try:
            values["cell"] = Cell.from_identity(values["cell"])
            values["dataset"] = DatasetSpec(**values["dataset"])
            values["collector"] = CollectorSpec(**values["collector"])
            values["policies"] = Policies(**values["policies"])
            return cls(**values)
        except (TypeError, KeyError) as exc:
            raise RecordError(f"{path}: {exc}") from None

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> CellSpec:
        return cls.from_json(_read(path), str(path))


# --------------------------------------------------------------------------- #
# group.json: a packed group of cells
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class GroupSpec:
    """What a packed group's ranks are told (``groups/{group_id}/group.json``): the cells
    to run, in order, with the model loaded once. Each cell's own ``spec.json`` is
    under ``cells_dir/{cell_id}/``; the group's node agents read ``spec.json`` beside
    this file (the first cell's spec: collector, layout, power cap, policies)."""

    group_id: str
    cells: list[str]
    cells_dir: str
    #: Where the job's handshake and logs are (``groups/{id}``, or the cell's own
    #: directory for a cell run alone); empty: this file's folder.
    job_dir: str = ""

    def cell_dir(self, cell_id: str) -> Path:
        return Path(self.cells_dir) / cell_id

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def read(cls, path: Path) -> GroupSpec:
        values = _fields(cls, _read(path), str(path))
        if not isinstance(values["cells"], list) or not values["cells"]:
            raise RecordError(f"{path}: cells: must be a non-empty list of cell ids")
        return cls(**values)




# --------------------------------------------------------------------------- #
# Rank 0 → launcher
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class WorkerStatus:
    """Rank 0's outcome (``.run/worker_status.json``)."""

    status: str
    reason: str | None = None
    load: dict[str, Any] | None = None  # weights.LoadInfo of an ok run

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def read(cls, path: Path) -> WorkerStatus:
        return cls(**_fields(cls, _read(path), str(path)))


@dataclass(frozen=True)
class CellBegin:
    """Rank 0 → launcher (``.run/begin.json``): a cell of the job has started."""

    cell_id: str
    position: int
    started_ns: int

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def read(cls, path: Path) -> CellBegin:
        return cls(**_fields(cls, _read(path), str(path)))


@dataclass(frozen=True)
class ClockOffsets:
    """Rank 0 → launcher (the job's ``.run/clocks.json``): each node's wall clock minus
    rank 0's, measured once per job by timed round trips over the process group
    (:func:`llmenergy.inference.rank.measure_clock_offsets`). ``rtt_ns`` is the round
    trip of the sample each offset comes from; its half bounds the offset's error."""

    offsets_ns: dict[str, int]
    rtt_ns: dict[str, int]
    measured_ns: int = 0

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def read(cls, path: Path) -> ClockOffsets:
        return cls(**_fields(cls, _read(path), str(path)))


@dataclass(frozen=True)
class RankOutcome:
    """One rank's end of a cell (``.run/ranks/{rank}.json``): what it saw, when, and
    ``left`` once it leaves the job because the ranks are out of step."""

    rank: int
    status: str
    reason: str | None = None
    at_ns: int = 0
    left: bool = False

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def read(cls, path: Path) -> RankOutcome:
        return cls(**_fields(cls, _read(path), str(path)))


class _Handshake:
    """A versioned JSON record of the ``.run/`` handshake."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def write(self, path: Path) -> None:
        atomic.write_json(path, {"schema_version": SCHEMA_VERSION, **self.to_dict()})

    @classmethod
    def read(cls, path: Path) -> Any:
        return cls(**_fields(cls, _read(path), str(path)))


@dataclass(frozen=True)
class RankDevice(_Handshake):
    """A rank → its node's agents (``CellFiles.rank_devices``, one file a rank): the device it runs on."""

    node: str = ""
    rank: int = -1
    uuid: str = ""  # "GPU-…", or "cpu"
    name: str = ""
    index: int = -1

    @classmethod
    def read(cls, path: Path) -> RankDevice:
        """As the other records, except that a file without ``schema_version`` or without
        the descriptive fields is read too (a stand-in rank announcing only its ``uuid``);
        one without ``uuid`` is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or not data.get("uuid"):
            raise RecordError(f"{path}: not a device record (no uuid)")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise RecordError(f"{path}: schema_version {data['schema_version']!r}, this llmenergy reads "
                              f"{SCHEMA_VERSION}")
        return cls(**_fields(cls, data, str(path)))


@dataclass(frozen=True)
class CollectorReady(_Handshake):
    """A node's collector → rank 0 and the launcher (``.run/ready/{node}.json``); ``backend``
    None with the one-line ``error`` when no backend could be built. Rewritten with an
    ``error`` when the collector fails later (it, or its node agent when it dies):
    :func:`collector_problem` then fails the job."""

    node: str
    backend: str | None
    devices: list[dict[str, Any]] = field(default_factory=list)
    interval_ms: int | None = None
    error: str | None = None


def read_ready(directory: Path) -> list[CollectorReady]:
    """The :class:`CollectorReady` records of a ``ready/`` folder (a torn one is skipped: the
    next poll reads it whole)."""
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append(CollectorReady.read(path))
        except RecordError:
            continue
    return out


def collector_problem(records: list[CollectorReady]) -> str | None:
    """Why a job's collectors cannot meter it, in one line naming the node, or None.

    A collector that reported an error (no backend, or it failed later) fails the job;
    so do collectors that resolved to different backends (``auto`` on unlike nodes):
    one backend per cell. The first node in name order sets the backend the others
    are compared with.
    """
    ordered = sorted(records, key=lambda r: r.node)
    for rec in ordered:
        if rec.error:
            return f"collector on node {rec.node} failed: {rec.error}"
    if ordered:
        first = ordered[0]
        for rec in ordered[1:]:
            if rec.backend != first.backend:
                return (f"collector backend differs on node {rec.node}: {rec.backend} "
                        f"(node {first.node}: {first.backend}); one backend per cell: set collector.backend")
    return None


@dataclass(frozen=True)
class CapReady(_Handshake):
    """A node's power-cap guard → the ranks (``CellFiles.cap_ready``, one file a node)."""

    node: str
    status: str  # "applied" | "denied" | "error"
    reason: str | None = None
    backend: str | None = None
    requested_w: float | None = None
    on_denied: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)  # uuid, previous_w, requested_w, enforced_w


# --------------------------------------------------------------------------- #
# cell.json
# --------------------------------------------------------------------------- #

@dataclass
class Provenance:
    """Where and with what a cell ran."""

    versions: dict[str, str | None] = field(default_factory=dict)  # llmenergy, python, torch, ...
    git_commit: str | None = None
    hosts: list[str] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)  # node, rank, uuid, name, index
    collectors: list[dict[str, Any]] = field(default_factory=list)  # the collectors' ready files
    driver: str | None = None
    slurm_job_id: str | None = None
    slurm_cluster: str | None = None
    slurm_consumed_energy_j: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    wall_s: float | None = None
    power_samples: int = 0
    load: dict[str, Any] | None = None
    power_cap: dict[str, Any] | None = None
    slurm_time_limit_min: int | None = None  # the job's --time, read back from Slurm
    #: A packed cell's group: ``group_id``, ``position`` (0-based), ``cells`` (the group's
    #: cell ids in run order), ``model_loaded_here`` (this cell's load event built the model).
    group: dict[str, Any] | None = None
    #: Each node's wall clock minus rank 0's (ns), measured at the job's handshake; the
    #: node's power timestamps are corrected by it (``power.parquet`` is on rank 0's clock).
    clock_offsets_ns: dict[str, int] | None = None
    #: The round trip (ns) of the sample each offset comes from: the offset is within half of it.
    clock_offset_rtt_ns: dict[str, int] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = str(CellFiles(Path()).record)) -> Provenance:
        return cls(**_fields(cls, data, f"{path}: provenance"))


@dataclass
class CellRecord:
    """What ``cell.json`` says: a cell's outcome and provenance. Written last: its
    presence with an accepted status (:func:`accepted`) marks the cell finished."""

    cell: Cell
    status: str
    reason: str | None
    repeats: int
    launcher: str
    rank_exit_codes: list[int] = field(default_factory=list)
    power_recovered_from_parts: list[str] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    #: Hash of :attr:`definition`; a finished record without one is superseded and rerun.
    fingerprint: str | None = None
    #: What defines the measurement (``orchestrate.fingerprint.definition``).
    definition: dict[str, Any] | None = None

    @property
    def cell_id(self) -> str:
        return self.cell.id

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "cell_id": self.cell.id, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = str(CellFiles(Path()).record)) -> CellRecord:
        values = _fields(cls, data, path)
        try:
            values["cell"] = Cell.from_identity(values["cell"])
        except (TypeError, KeyError) as exc:
            raise RecordError(f"{path}: cell: {exc}") from None
        values["provenance"] = Provenance.from_json(values.get("provenance") or {}, path)
        if values["status"] not in STATUSES:
            raise RecordError(f"{path}: status {values['status']!r} is not one of {', '.join(STATUSES)}")
        return cls(**values)

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> CellRecord:
        return cls.from_json(_read(path), str(path))


def accepted(status: str, policies: Policies) -> bool:
    """Whether a cell ending with ``status`` is finished under ``policies`` (exit 0, never rerun).

    ``ok`` always; ``oom`` under ``policies.on_oom: record``; ``power_cap_denied``
    under ``policies.on_power_cap_denied: skip``.
    """
    return (status == "ok" or (status == "oom" and policies.on_oom == "record")
            or (status == "power_cap_denied" and policies.on_power_cap_denied == "skip"))


# --------------------------------------------------------------------------- #
# Arrow schemas
# --------------------------------------------------------------------------- #

def _schema(fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields],
                     metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


#: ``events.parquet``: one row per phase (idle, load, warmup, compile, prefill, decode, prefill_only).
EVENTS_SCHEMA = pa.schema([
    ("cell_id", pa.string()), ("repeat", pa.int32()), ("phase", pa.string()),
    ("batch_index", pa.int32()), ("start_ns", pa.int64()), ("end_ns", pa.int64()),
    ("n_seqs", pa.int32()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
])

#: ``responses.parquet``: one row per prompt × repeat × cycle.
RESPONSES_SCHEMA = pa.schema([
    ("cell_id", pa.string()), ("repeat", pa.int32()), ("batch_index", pa.int32()),
    ("prompt_id", pa.string()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
    ("words_out", pa.int64()), ("text", pa.string()), ("reference", pa.string()),
    ("correct", pa.bool_()), ("template", pa.string()),
    ("tokens_after_eos", pa.int64()),  # generated tokens from the first EOS on (EOS included)
    ("cycle", pa.int32()),  # the pass over the cell's batches within the repeat (collector.min_window_s)
])

#: ``power.parquet`` and the collectors' per-node files: one row per device and sample.
POWER_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("node", pa.string()), ("device", pa.string()), ("device_index", pa.int32()),
    ("domain", pa.string()), ("timestamp_ns", pa.int64()), ("energy_mj", pa.float64()),
    ("power_w", pa.float64()), ("gpu_util_pct", pa.float64()), ("mem_util_pct", pa.float64()),
    ("mem_used_mb", pa.float64()), ("sm_clock_mhz", pa.float64()), ("mem_clock_mhz", pa.float64()),
    ("temperature_c", pa.float64()), ("power_limit_w", pa.float64()),
    ("clock_event_reasons", pa.int64()), ("power_cap_throttle_ns", pa.int64()), ("source", pa.string()),
)
POWER_COLUMNS: tuple[str, ...] = tuple(name for name, _ in POWER_FIELDS)
POWER_SCHEMA: pa.Schema = pa.schema([pa.field(name, typ) for name, typ in POWER_FIELDS])

#: The identity columns of a metrics row (the axes, the id, the layout, the repeat).
IDENTITY_FIELDS: list[tuple[str, pa.DataType]] = [
    ("cell_id", pa.string()), ("model", pa.string()), ("dataset", pa.string()),
    ("gpu", pa.string()), ("shards", pa.int32()), ("nodes", pa.int32()),
    ("batch_size", pa.int32()), ("max_gen_len", pa.int32()), ("power_cap_w", pa.float64()),
    ("engine", pa.string()), ("repeat", pa.int32()),
]
IDENTITY_COLUMNS = [name for name, _ in IDENTITY_FIELDS if name != "repeat"]

#: ``metrics.parquet`` (one row per repeat) and ``summary.parquet`` (all cells).
METRICS_FIELDS: list[tuple[str, pa.DataType]] = IDENTITY_FIELDS + [
    ("status", pa.string()), ("reason", pa.string()), ("template", pa.string()), ("gpu_name", pa.string()),
    ("n_prompts", pa.int64()), ("responses", pa.int64()), ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()), ("words_out", pa.int64()), ("duration_s", pa.float64()),
    ("tokens_per_s", pa.float64()), ("words_per_s", pa.float64()),
    ("responses_per_s", pa.float64()),
    ("energy_j", pa.float64()), ("avg_power_w", pa.float64()), ("j_per_token", pa.float64()),
    ("j_per_word", pa.float64()), ("j_per_response", pa.float64()), ("power_source", pa.string()),
    ("energy_method", pa.string()), ("n_devices", pa.int32()),
    ("avg_power_per_gpu_w", pa.float64()), ("idle_power_w", pa.float64()),
    ("active_energy_j", pa.float64()), ("prefill_energy_j", pa.float64()),
    ("decode_energy_j", pa.float64()), ("prefill_duration_s", pa.float64()),
    ("decode_duration_s", pa.float64()), ("latency_p50_s", pa.float64()),
    ("latency_p95_s", pa.float64()), ("gpu_util_pct", pa.float64()),
    ("mem_util_pct", pa.float64()), ("energy_instant_j", pa.float64()),
    ("energy_discrepancy_pct", pa.float64()), ("short_window", pa.bool_()),
    ("power_out_of_range", pa.bool_()), ("cpu_energy_j", pa.float64()),
    ("accuracy", pa.float64()), ("n_correct", pa.int64()), ("j_per_correct", pa.float64()),
    ("gco2e", pa.float64()), ("weights_synthetic", pa.bool_()), ("fingerprint", pa.string()),
    # what the energy columns can be trusted for (docs/measurement.md)
    ("tokens_after_eos", pa.int64()), ("update_period_s", pa.float64()),
    ("energy_complete", pa.bool_()), ("energy_reason", pa.string()),
    ("clock_offset_max_ms", pa.float64()),  # largest node-to-rank-0 clock offset (corrected)
    # the cell's energy balance, repeated on each of its rows (analysis.balance)
    ("balance_window_s", pa.float64()), ("balance_total_j", pa.float64()),
    ("balance_idle_j", pa.float64()), ("balance_load_j", pa.float64()),
    ("compile_j", pa.float64()), ("compile_duration_s", pa.float64()),
    ("balance_warmup_j", pa.float64()), ("balance_measured_j", pa.float64()),
    ("balance_gaps_j", pa.float64()), ("balance_gaps_s", pa.float64()),
    ("balance_unattributed_j", pa.float64()), ("balance_unattributed_pct", pa.float64()),
    ("balance_prefill_only_j", pa.float64()),
    # the measured prefill: the repeat's prefill-only loop (docs/measurement.md)
    ("prefill_only_duration_s", pa.float64()), ("prefill_only_tokens_in", pa.int64()),
    ("prefill_only_energy_j", pa.float64()), ("prefill_j_per_token_in", pa.float64()),
    ("schema_version", pa.int32()),
]
METRICS_SCHEMA = _schema(METRICS_FIELDS)
METRIC_COLUMNS = [name for name, _ in METRICS_FIELDS]
