"""Per-cell metrics: one row per repeat, computed from a cell directory.

Inputs (any may be missing for a failed cell): ``cell.json`` / ``spec.json``,
``events.parquet``, ``responses.parquet``, ``power.parquet``. Output: a
``pyarrow.Table`` with :data:`METRICS_SCHEMA` (the summary columns of the design
plus attribution detail). A failed cell still yields rows, with its status and
reason and null measurements.

Energy: ``energy_j`` is the counter-based energy of the repeat's prefill and
decode events; where no GPU device has a counter it falls back to the instant
power integral and ``energy_method`` says ``instant_integral``. The measured prefill
(``prefill_only_*``, ``prefill_j_per_token_in``) comes from the repeat's
``prefill_only`` loop, outside ``energy_j``.

Nothing is published that the data cannot support; each null says why in
``energy_reason``:

* a phase energy (``prefill_energy_j``, ``decode_energy_j``, ``idle_power_w``
  and the balance's phases) is null when any of its windows is shorter than
  :data:`~llmenergy.analysis.energy.RESOLUTION_PERIODS` sensor update periods
  (``update_period_s``);
* a repeat's energy is null when a device's samples do not cover one of its
  windows, or when a GPU the ranks used (``cell.json``'s ``provenance.gpus``)
  has no samples at all; ``energy_complete`` is then False, and
  :func:`energy_incomplete_reason` says so in one line for the launcher.

Flagged, not null: a node whose clock was more than :data:`CLOCK_FLAG_MS` off rank 0's
(``clock_offset_max_ms``; its power timestamps are corrected by the measured offset).

The per-cell balance (:mod:`llmenergy.analysis.balance`) is repeated on every row.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.analysis.balance import cell_balance
from llmenergy.analysis.energy import GPU_DOMAINS, SHORT_WINDOW_S, attribute_events, power_source_of, update_period_s
from llmenergy.analysis.flags import CLAUSE_SEP, join_clauses
from llmenergy.analysis.reasons import (
    cpu_edge_note,
    cpu_reason,
    sample_reason,
    shared_note,
    short_reason,
    uncovered_reason,
    wide_edge_note,
)
from llmenergy.cellfiles import METRICS_SCHEMA, METRIC_COLUMNS, SCHEMA_VERSION, CellRecord, CellSpec
from llmenergy.errors import RecordError, UserError
from llmenergy.layout import CellFiles

log = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
#: The version of the rules that turn samples into these numbers, in each ``metrics.parquet``'s
#: schema metadata (:data:`RULES_KEY`); raised whenever a change publishes other numbers or
#: reasons from the same raw files, so that ``aggregate`` recomputes older cells' rows.
#: 1: files without the key (before 2026-12-05). 2: RAPL under the gap and reset rules, edges in
#: gaps of 10-20 update periods flagged, NVML averaged power flagged, a GPU shared with another
#: process flagged. 3: the idle window's shared GPU flagged (idle_power_w, active_energy_j). 4: RAPL
#: edges in gaps of 10-20 periods flagged (cpu_energy_j), the prefill-only loop's shared GPU flagged,
#: no clause holds '; ', sharing counts only processes outside the job (power.parquet other_processes).
RULES_VERSION = 4
RULES_KEY = b"llmenergy.metrics_rules"
#: A node's clock offset to rank 0 above this is flagged in ``energy_reason`` (it is corrected).
CLOCK_FLAG_MS = 5.0


def read_records(cell_dir: Path) -> tuple[CellRecord | None, CellSpec | None]:
    """A cell's ``cell.json`` and ``spec.json``; an absent or unreadable one is ``None`` (logged)."""
    files = CellFiles(Path(cell_dir))
    out: list[Any] = []
    for cls, path in ((CellRecord, files.record), (CellSpec, files.spec)):
        try:
            out.append(cls.read(path) if path.exists() else None)
        except RecordError as exc:
            log.warning("%s", exc)
            out.append(None)
    return out[0], out[1]


def cell_identity(record: CellRecord | None, spec: CellSpec | None) -> dict[str, Any]:
    """The identity columns of a cell's rows, from its record, else its spec."""
    cell = record.cell if record is not None else spec.cell if spec is not None else None
    ident: dict[str, Any] = cell.identity() if cell is not None else {}
    if spec is not None:
        ident["nodes"] = spec.nodes
    return ident


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable parquet (%s)", path, exc)
        return None


def _sum(df: pd.DataFrame | None, col: str) -> int | None:
    if df is None or col not in df.columns or len(df) == 0:
        return None
    return int(df[col].fillna(0).sum())


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return float(a) / float(b)


def _total(values: pd.Series) -> float | None:
    """Sum that is null if any part is null (never a silent partial sum)."""
    if len(values) == 0 or values.isna().any():
        return None
    return float(values.sum())


def _idle_power_w(att: pd.DataFrame) -> tuple[float | None, list[str]]:
    """The idle baseline's power and its clauses (why it is null, or the notes that flag it)."""
    idle = att[att["phase"] == "idle"]
    if len(idle) == 0:
        return None, []
    why = short_reason("idle_power_w", idle)
    if why:
        return None, [why]
    energy = idle["energy_j"].where(idle["energy_j"].notna(), idle["energy_instant_j"])
    power = _div(_total(energy), float(idle["duration_s"].sum()))
    if power is None:
        return None, [uncovered_reason(idle, "idle_power_w") or sample_reason(idle, "idle_power_w")
                      or "idle_power_w null: no power samples cover the idle window"]
    return power, [n for n in (wide_edge_note(idle, "idle_power_w"), shared_note(idle, "idle_power_w")) if n]


def missing_devices(record: CellRecord | None, power: pd.DataFrame | None) -> list[str]:
    """``node/uuid (rank r)`` of each GPU the ranks used that has no GPU-domain sample.

    Compared by UUID (unique across nodes); the node is the one ``provenance.gpus``
    names. CPU ranks (uuid ``cpu``) and an ``estimate`` source (one estimate per
    node, no per-device samples) are not compared.
    """
    if record is None or not record.provenance.gpus:
        return []
    if power is not None and "domain" in power.columns and (power["domain"] == "estimate").any():
        return []
    metered: set[str] = set()
    if power is not None and len(power) and "domain" in power.columns:
        metered = {str(d) for d in power.loc[power["domain"].isin(GPU_DOMAINS), "device"].dropna()}
    out = []
    for g in record.provenance.gpus:
        uuid = g.get("uuid")
        if uuid and uuid != "cpu" and str(uuid) not in metered:
            out.append(f"{g.get('node', '?')}/{uuid} (rank {g.get('rank', '?')})")
    return sorted(set(out))


def _has_gpu_samples(power: pd.DataFrame | None) -> bool:
    return power is not None and "domain" in power.columns and bool(power["domain"].isin(GPU_DOMAINS).any())


def _metered(spec: CellSpec | None, record: CellRecord | None, power: pd.DataFrame | None) -> bool:
    """Whether a null GPU energy is a gap: a collector was configured and there was GPU
    energy to meter (a GPU rank, or GPU-domain samples). CPU ranks with only RAPL
    samples (no GPU-domain energy by design) are not."""
    if spec is None:
        return _has_gpu_samples(power)
    if spec.collector.backend == "none":
        return False
    gpus = record.provenance.gpus if record is not None else []
    gpu_ranks = any(g.get("uuid") not in (None, "cpu") for g in gpus)
    return gpu_ranks or spec.device == "cuda" and not gpus or _has_gpu_samples(power)


def _clock_offsets(record: CellRecord | None) -> tuple[float | None, str | None]:
    """``clock_offset_max_ms`` (the largest node's offset to rank 0, None when not measured)
    and a flag when it exceeds :data:`CLOCK_FLAG_MS`."""
    offsets = record.provenance.clock_offsets_ns if record is not None else None
    if not offsets:
        return None, None
    node, worst = max(offsets.items(), key=lambda kv: abs(kv[1]))
    worst_ms = abs(worst) / 1e6
    if worst_ms <= CLOCK_FLAG_MS:
        return worst_ms, None
    return worst_ms, (f"clock of node {node} off rank 0's by {worst / 1e6:+.1f} ms "
                      f"(> {CLOCK_FLAG_MS:g} ms, its power timestamps were corrected)")


def _repeat_row(r: int, att: pd.DataFrame | None, resp: pd.DataFrame | None,
                idle_power_w: float | None, base: dict[str, Any],
                grid_gco2_per_kwh: float | None, missing: list[str],
                cell_reasons: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(base)
    row["repeat"] = r
    reasons: list[str] = []
    row.update(_energy_of_repeat(r, att, resp, idle_power_w, row, grid_gco2_per_kwh, missing, reasons))
    if (base.get("metered") and row.get("energy_j") is None and row["status"] == "ok"
            and not any(r.startswith("energy_j") for r in reasons)):
        reasons.insert(0, "energy_j null: no power samples cover this repeat")
    if base.get("metered"):
        row["energy_complete"] = row.get("energy_j") is not None and not missing
    row["energy_reason"] = join_clauses(reasons + cell_reasons)
    return row


def _energy_of_repeat(r: int, att: pd.DataFrame | None, resp: pd.DataFrame | None,
                      idle_power_w: float | None, base: dict[str, Any],
                      grid_gco2_per_kwh: float | None, missing: list[str],
                      reasons: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(base)
    ev = att[(att["repeat"] == r) & att["phase"].isin(["prefill", "decode"])] if att is not None else None
    rs = resp[resp["repeat"] == r] if resp is not None and "repeat" in resp.columns else None
    if base["status"] == "ok" and (ev is None or len(ev) == 0):
        row["status"] = "incomplete"
        row["reason"] = row.get("reason") or f"no prefill/decode events for repeat {r}"
    row["responses"] = int(len(rs)) if rs is not None else None
    if row.get("n_prompts") is None:
        row["n_prompts"] = row["responses"]
    if rs is not None and "template" in rs.columns and rs["template"].notna().any():
        row["template"] = "+".join(sorted(rs["template"].dropna().unique()))
    row["tokens_in"] = _sum(rs, "tokens_in")
    row["tokens_out"] = _sum(rs, "tokens_out")
    row["words_out"] = _sum(rs, "words_out")
    if rs is not None and "tokens_after_eos" in rs.columns and rs["tokens_after_eos"].notna().any():
        row["tokens_after_eos"] = _sum(rs, "tokens_after_eos")
    elif base.get("stop_at_eos") and rs is not None and len(rs):
        row["tokens_after_eos"] = 0  # generation stopped at EOS: nothing after it
    if rs is not None and "correct" in rs.columns and rs["correct"].notna().any():
        graded = rs["correct"].dropna().astype(bool)
        row["n_correct"] = int(graded.sum())
        row["accuracy"] = float(graded.mean())
    if ev is None or len(ev) == 0:
        return row
    if row["tokens_in"] is None:
        row["tokens_in"] = _sum(ev[ev["phase"] == "prefill"], "tokens_in")
    if row["tokens_out"] is None:
        row["tokens_out"] = _sum(ev[ev["phase"] == "decode"], "tokens_out")

    duration_s = float(ev["duration_s"].sum())
    row["duration_s"] = duration_s
    row["short_window"] = duration_s < SHORT_WINDOW_S
    for key, count in (("tokens_per_s", "tokens_out"), ("words_per_s", "words_out"),
                       ("responses_per_s", "responses")):
        row[key] = _div(row[count], duration_s)
    for phase in ("prefill", "decode"):
        ph = ev[ev["phase"] == phase]
        row[f"{phase}_duration_s"] = float(ph["duration_s"].sum())
        row[f"{phase}_energy_j"] = None
    per_batch = ev.groupby("batch_index")["duration_s"].sum().to_numpy(np.float64)
    if len(per_batch):
        row["latency_p50_s"] = float(np.percentile(per_batch, 50))
        row["latency_p95_s"] = float(np.percentile(per_batch, 95))
    w = ev["duration_s"].to_numpy(np.float64)
    for col in ("gpu_util_pct", "mem_util_pct"):
        v = ev[col].to_numpy(np.float64)
        ok = ~np.isnan(v)
        row[col] = float(np.average(v[ok], weights=w[ok])) if ok.any() and w[ok].sum() > 0 else None
    row["power_out_of_range"] = bool(ev["power_out_of_range"].any())
    row["cpu_energy_j"] = _total(ev["cpu_energy_j"])
    n_dev = int(ev["n_devices"].max())
    row["n_devices"] = n_dev

    counter = _total(ev["energy_j"])
    instant = _total(ev["energy_instant_j"])
    use_counter = ev["energy_j"].notna().any() or instant is None
    energy = counter if use_counter else instant
    col = "energy_j" if use_counter else "energy_instant_j"
    if missing:
        reasons.append(f"energy_j null: no power samples of {', '.join(missing)}")
        energy = counter = instant = None
    elif energy is None and (why := uncovered_reason(ev) or sample_reason(ev)):
        reasons.append(why)
    if energy is not None:
        row["energy_method"] = "counter" if use_counter else "instant_integral"
        for note in (wide_edge_note(ev), shared_note(ev)):
            if note:
                reasons.append(note)
        if not use_counter and "nvml-avg" in str(base.get("power_source", "")).split("+"):
            reasons.append("energy_j from NVML's averaged power (nvml-avg, no energy counter): a 1-s "
                           "average lags the load, so windows of a few seconds may be off")
        for phase in ("prefill", "decode"):
            ph = ev[ev["phase"] == phase]
            why = short_reason(f"{phase}_energy_j", ph)
            if why:
                reasons.append(why)
            else:
                row[f"{phase}_energy_j"] = _total(ph[col])
    row.update(_prefill_only(att[(att["repeat"] == r) & (att["phase"] == "prefill_only")], col,
                             energy is not None, reasons))
    row["energy_j"] = energy
    row["energy_instant_j"] = instant
    if counter is not None and instant is not None and counter > 0:
        row["energy_discrepancy_pct"] = 100.0 * (instant - counter) / counter
    row["avg_power_w"] = _div(energy, duration_s)
    row["avg_power_per_gpu_w"] = _div(row["avg_power_w"], n_dev) if n_dev else None
    row["j_per_token"] = _div(energy, row["tokens_out"])
    row["j_per_word"] = _div(energy, row["words_out"])
    row["j_per_response"] = _div(energy, row["responses"])
    row["j_per_correct"] = _div(energy, row.get("n_correct"))
    row["idle_power_w"] = idle_power_w
    if energy is not None and idle_power_w is not None:
        row["active_energy_j"] = energy - idle_power_w * duration_s
    if energy is not None and grid_gco2_per_kwh is not None:
        row["gco2e"] = energy / J_PER_KWH * float(grid_gco2_per_kwh)
    why = cpu_reason(ev) if row["cpu_energy_j"] is None else cpu_edge_note(ev)
    if why:
        reasons.append(why)
    return row


def _prefill_only(po: pd.DataFrame, col: str, metered_all: bool, reasons: list[str]) -> dict[str, Any]:
    """The repeat's measured prefill (its ``prefill_only`` loop): duration, prompt tokens,
    energy (``col``: the repeat's counter or instant) and J per prompt token. The energy is
    null when the loop is below the sensor's resolution or not covered by every device, and
    whenever the repeat's own energy is (``metered_all`` False: its reason says why)."""
    if len(po) == 0:
        return {}
    row: dict[str, Any] = {"prefill_only_duration_s": float(po["duration_s"].sum()),
                           "prefill_only_tokens_in": _sum(po, "tokens_in")}
    why = short_reason("prefill_only_energy_j", po)
    energy = _total(po[col]) if metered_all and not why else None
    if why:
        reasons.append(why)
    elif metered_all and energy is None:
        reasons.append("prefill_only_energy_j null: its window is not covered by every device's samples")
    elif energy is not None:
        reasons += [n for n in (wide_edge_note(po, "prefill_only_energy_j"),
                                shared_note(po, "prefill_only_energy_j")) if n]
    row["prefill_only_energy_j"] = energy
    row["prefill_j_per_token_in"] = _div(energy, row["prefill_only_tokens_in"])
    return row


def _derive_status(record: CellRecord | None, events: pd.DataFrame | None) -> tuple[str, str | None]:
    if record is not None:
        return record.status, record.reason
    if events is None:
        return "incomplete", "no events.parquet and no cell.json"
    return "ok", None


def _fidelity_columns(record: CellRecord | None) -> dict[str, Any]:
    """The precision's cost in logits (:class:`~llmenergy.cellfiles.Fidelity`) as columns."""
    fid = record.fidelity if record is not None else None
    if fid is None:
        return {}
    return {"logit_rel_diff": fid.logit_rel_diff, "logit_rel_diff_max": fid.logit_rel_diff_max,
            "token_kl_nats": fid.token_kl_nats, "top1_agree": fid.top1_agree,
            "fidelity_positions": fid.positions or None, "fidelity_reason": fid.reason}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a table with :data:`METRICS_SCHEMA` from row dicts (missing keys → null)."""
    cols = {name: [_clean(r.get(name)) for r in rows] for name in METRIC_COLUMNS}
    table = pa.Table.from_pydict(cols, schema=METRICS_SCHEMA)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), RULES_KEY: str(RULES_VERSION).encode()})


def rules_version(metadata: dict[bytes, bytes] | None) -> int:
    """The :data:`RULES_VERSION` a metrics file's schema metadata records (1 without one)."""
    try:
        return int((metadata or {}).get(RULES_KEY, b"1"))
    except ValueError:
        return 1


def cell_metrics(cell_dir: Path, *, record: CellRecord | None, spec: CellSpec | None) -> tuple[pa.Table, str | None]:
    """A finished cell's metrics, and why its energy is incomplete when its record says ``ok``
    (:func:`energy_incomplete_reason`; the rows then say ``incomplete`` with that reason)."""
    table = compute_cell_metrics(cell_dir, record=record, spec=spec)
    why = energy_incomplete_reason(table) if record is not None and record.status == "ok" else None
    if why is not None:
        table = compute_cell_metrics(cell_dir, record=record, spec=spec, status="incomplete", reason=why)
    return table, why


def _clean(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def _gpu_names(record: CellRecord | None) -> str | None:
    """The devices the ranks really ran on (provenance), e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
    gpus = record.provenance.gpus if record is not None else []
    names = sorted({str(g.get("name")) for g in gpus if g.get("name")})
    return "+".join(names) or None


def compute_cell_metrics(cell_dir: Path, *, record: CellRecord | None = None, spec: CellSpec | None = None,
                         status: str | None = None, reason: str | None = None,
                         grid_gco2_per_kwh: float | None = None) -> pa.Table:
    """One row per repeat with the summary columns for the cell at ``cell_dir``.

    ``record`` and ``spec`` default to the cell's ``cell.json`` and ``spec.json``
    (``launch`` passes the record it is about to write). ``status`` (with
    ``reason``) overrides the record's. Without a record, a cell with events is
    ``ok`` and one without is ``incomplete``; an ``ok`` repeat without events
    becomes ``incomplete``. ``grid_gco2_per_kwh`` defaults to the spec's, if any.
    """
    cell_dir = Path(cell_dir)
    if not cell_dir.is_dir():
        raise UserError(f"{cell_dir}: cell directory does not exist")
    read_record, read_spec = read_records(cell_dir)
    record = record if record is not None else read_record
    spec = spec if spec is not None else read_spec
    if grid_gco2_per_kwh is None and spec is not None and spec.grid_gco2_per_kwh is not None:
        grid_gco2_per_kwh = float(spec.grid_gco2_per_kwh)
    files = CellFiles(cell_dir)
    events = _read_parquet(files.events)
    resp = _read_parquet(files.responses)
    power = _read_parquet(files.power)
    if resp is not None and "words_out" not in resp.columns and "text" in resp.columns:
        resp["words_out"] = resp["text"].fillna("").astype(str).str.split().str.len()
    derived_status, derived_reason = _derive_status(record, events)
    base: dict[str, Any] = cell_identity(record, spec)
    if base.get("cell_id", cell_dir.name) != cell_dir.name:
        log.warning("%s: its records describe cell %s; the rows keep the folder's name",
                    cell_dir, base["cell_id"])
    base["cell_id"] = cell_dir.name
    base["status"] = status or derived_status
    base["reason"] = reason if status else derived_reason
    base["n_prompts"] = spec.dataset.n_prompts if spec is not None else None
    base["weights_synthetic"] = None if spec is None else spec.weights == "synthetic"
    base["fingerprint"] = record.fingerprint if record is not None else None
    base.update(_fidelity_columns(record))
    source = power_source_of(power)  # from the samples, not from what cell.json planned
    base["power_source"] = source
    base["gpu_name"] = _gpu_names(record)
    base["schema_version"] = SCHEMA_VERSION
    base["update_period_s"], _ = update_period_s(power)
    metered = _metered(spec, record, power)
    base["metered"] = metered  # not a column: says whether a null energy is a gap
    base["stop_at_eos"] = spec.stop_at_eos if spec is not None else None

    att = attribute_events(events, power) if events is not None and len(events) else None
    idle_power_w, idle_clauses = _idle_power_w(att) if att is not None else (None, [])
    missing = missing_devices(record, power) if metered else []
    balance, cell_reasons = cell_balance(att, power)
    base.update(balance)
    cell_reasons = idle_clauses + cell_reasons
    base["clock_offset_max_ms"], clock_flag = _clock_offsets(record)
    cell_reasons += [clock_flag] if clock_flag else []
    repeats: list[int] = []
    if att is not None:
        repeats = sorted(int(r) for r in att["repeat"].unique() if r >= 0)
    n_rep = record.repeats if record is not None else spec.repeats if spec is not None else None
    if isinstance(n_rep, int) and n_rep > 0:
        repeats = sorted(set(repeats) | set(range(n_rep)))
    rows = [_repeat_row(r, att, resp, idle_power_w, base, grid_gco2_per_kwh, missing, cell_reasons)
            for r in repeats]
    if not rows:
        row = dict(base)
        row["repeat"] = None
        if row["status"] == "ok":
            row["status"], row["reason"] = "incomplete", "no repeats recorded"
        rows = [row]
    log.info("%s: %d metrics row(s), status %s, power %s", base["cell_id"], len(rows),
             base["status"], source)
    return to_table(rows)


def energy_incomplete_reason(table: pa.Table) -> str | None:
    """One line saying why a cell's energy is incomplete, or None when it is complete.

    Incomplete: an ``ok`` row whose ``energy_complete`` is False (a repeat's energy
    is null while a collector was configured, or a GPU the ranks used has no
    samples). Rows of cells run without a collector (``energy_complete`` null)
    never are. Also incomplete: a cell whose run ended ``ok`` but one of whose repeats is
    not (it left no events), said first. The launcher records such a cell ``incomplete``
    with this reason, so that it reruns.
    """
    rows = table.select(["repeat", "status", "reason", "energy_complete", "energy_reason"]).to_pylist()
    lost = [r for r in rows if r["status"] != "ok"]  # a repeat of an ok run that left no events
    if lost:
        return (f"{len(lost)} of {len(rows)} repeat(s) not measured (repeat {lost[0]['repeat']}: "
                f"{lost[0]['reason'] or lost[0]['status']})")
    bad = [r for r in rows if r["energy_complete"] is False]
    if not bad:
        return None
    first = bad[0]["energy_reason"] or "energy_j null"
    return (f"energy incomplete in {len(bad)} repeat(s) (repeat {bad[0]['repeat']}: "
            f"{first.split(CLAUSE_SEP)[0]})")
