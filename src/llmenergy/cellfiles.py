"""The cell contract: a cell's identity, the files it writes, and their schemas, in one place.

The records of a cell's own files are defined here, typed and versioned:

* :class:`Cell`: the identity of one matrix cell (its axes) and its id;
* :class:`CellSpec` (``spec.json``): what the launcher tells a cell's ranks and
  node agents, resolved from the config;
* :class:`Provenance` and :class:`CellRecord` (``cell.json``, and
  ``failed/{cell}.json``): what happened, written last by the launcher;
* the Arrow schemas of ``events``, ``responses``, ``power`` and ``metrics``;
* :func:`read_record` and :func:`record_fields`: how every versioned JSON record is read
  (the ``.run/`` handshake records of :mod:`llmenergy.handshake` too); :func:`peek_record`,
  a look at one that may be torn or old.

The paths of these files are :mod:`llmenergy.layout`'s (:class:`~llmenergy.layout.CellFiles`,
:class:`~llmenergy.layout.RunLayout`).

JSON records carry ``schema_version``; reading a record of another version, or a
file that is not one, raises :class:`~llmenergy.errors.RecordError` naming the file.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmenergy import atomic
from llmenergy.config import CollectorSpec, Policies
from llmenergy.data.prompts import DatasetSpec
from llmenergy.errors import RecordError
from llmenergy.layout import CellFiles, RunLayout

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


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object of a versioned record file; :class:`RecordError` naming the file when
    it is unreadable, not an object, or of another ``schema_version``."""
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


def peek_record(path: Path) -> dict[str, Any] | None:
    """The JSON object of a record file, or None when it is absent, unreadable or not an
    object: a quick look (its status, its fingerprint) at a record that may be torn or
    of another version, without :func:`read_record`'s checks."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def record_fields(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (others are dropped);
    :class:`RecordError` naming ``path`` and the missing fields when a required one is absent."""
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
        values = record_fields(cls, data, path)
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
        return cls.from_json(read_record(path), str(path))


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
        values = record_fields(cls, read_record(path), str(path))
        if not isinstance(values["cells"], list) or not values["cells"]:
            raise RecordError(f"{path}: cells: must be a non-empty list of cell ids")
        return cls(**values)


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
        return cls(**record_fields(cls, data, f"{path}: provenance"))


#: A precision's logits are compared on its dataset's first prompts, up to this many ...
FIDELITY_PROMPTS = 8
#: ... at the last positions of each prompt, up to this many (all of a shorter prompt).
FIDELITY_TAIL = 32


@dataclass(frozen=True)
class Fidelity:
    """What a cell's precision costs in logits (:mod:`llmenergy.inference.fidelity`): its
    engine's logits against the same load's fp16 weights on the cell's own prompts,
    position by position; the values None with ``reason`` when not compared."""

    against: str = "fp16"
    prompts: int = 0
    positions: int = 0  # prompt positions compared (the last few of each prompt)
    logit_rel_diff: float | None = None  # mean over positions of |l - l_fp16| / |l_fp16|
    logit_rel_diff_max: float | None = None
    token_kl_nats: float | None = None  # mean KL(p_fp16 || p) of the next-token distributions
    top1_agree: float | None = None  # share of positions whose most likely next token is fp16's
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> Fidelity:
        return cls(**record_fields(cls, data, f"{path}: fidelity"))


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
    #: The precision's cost in logits (int8/fp8 cells; bf16 says why not), from rank 0.
    fidelity: Fidelity | None = None

    @property
    def cell_id(self) -> str:
        return self.cell.id

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "cell_id": self.cell.id, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = str(CellFiles(Path()).record)) -> CellRecord:
        values = record_fields(cls, data, path)
        try:
            values["cell"] = Cell.from_identity(values["cell"])
        except (TypeError, KeyError) as exc:
            raise RecordError(f"{path}: cell: {exc}") from None
        values["provenance"] = Provenance.from_json(values.get("provenance") or {}, path)
        if values.get("fidelity") is not None:
            values["fidelity"] = Fidelity.from_json(values["fidelity"], path)
        if values["status"] not in STATUSES:
            raise RecordError(f"{path}: status {values['status']!r} is not one of {', '.join(STATUSES)}")
        return cls(**values)

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> CellRecord:
        return cls.from_json(read_record(path), str(path))


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
    ("other_processes", pa.int32()),
)
POWER_COLUMNS: tuple[str, ...] = tuple(name for name, _ in POWER_FIELDS)
POWER_SCHEMA: pa.Schema = pa.schema([pa.field(name, typ) for name, typ in POWER_FIELDS])

#: The identity columns of a metrics row (the axes, the id, the layout, the repeat).
IDENTITY_FIELDS: list[tuple[str, pa.DataType]] = [
    ("cell_id", pa.string()), ("model", pa.string()), ("dataset", pa.string()),
    ("gpu", pa.string()), ("shards", pa.int32()), ("nodes", pa.int32()),
    ("batch_size", pa.int32()), ("max_gen_len", pa.int32()), ("power_cap_w", pa.float64()),
    ("engine", pa.string()), ("precision", pa.string()), ("repeat", pa.int32()),
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
    # the precision's cost in logits against fp16 (cellfiles.Fidelity; null with a reason)
    ("logit_rel_diff", pa.float64()), ("logit_rel_diff_max", pa.float64()),
    ("token_kl_nats", pa.float64()), ("top1_agree", pa.float64()),
    ("fidelity_positions", pa.int64()), ("fidelity_reason", pa.string()),
    ("schema_version", pa.int32()),
]
METRICS_SCHEMA = _schema(METRICS_FIELDS)
METRIC_COLUMNS = [name for name, _ in METRICS_FIELDS]


PARQUET_MAGIC = b"PAR1"


def output_problem(path: Path, accept: Callable[[str], bool] | None = None) -> str | None:
    """Why an existing cell output is unusable, else None.

    Cheap: a Parquet file must start and end with ``PAR1`` (else truncated or
    corrupt); ``cell.json`` must parse as a JSON object whose ``status`` passes
    ``accept``: a cell recorded ``incomplete`` or ``failed`` is not finished,
    even where its job's end raced Snakemake's cleanup of failed outputs.
    """
    try:
        if path.suffix == ".parquet":
            size = path.stat().st_size
            if size < 12:
                return f"{size} bytes, too short for Parquet"
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(-4, 2)
                tail = f.read(4)
            if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
                return "not a Parquet file (bad magic bytes)"
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            return "not a JSON object"
        status = str(data.get("status"))
        return None if accept is None or accept(status) else f"status {status}, not finished"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable: {exc}"
