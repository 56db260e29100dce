"""Per-cell metrics: one row per repeat, computed from a cell directory.

Inputs (any may be missing for a failed cell): ``cell.json`` / ``spec.json``,
``events.parquet``, ``responses.parquet``, ``power.parquet``. Output: a
``pyarrow.Table`` with :data:`METRICS_SCHEMA` (the summary columns of the design
plus attribution detail). A failed cell still yields rows, with its status and
reason and null measurements.

Energy: ``energy_j`` is the counter-based energy of the repeat's prefill and
decode events; where no GPU device has a counter it falls back to the instant
power integral and ``energy_method`` says ``instant_integral``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.analysis.energy import SHORT_WINDOW_S, attribute_events, power_source_of
from llmenergy.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"llmenergy.schema_version"
J_PER_KWH = 3.6e6

IDENTITY_FIELDS: list[tuple[str, pa.DataType]] = [
    ("cell_id", pa.string()), ("model", pa.string()), ("dataset", pa.string()),
    ("gpu", pa.string()), ("shards", pa.int32()), ("nodes", pa.int32()),
    ("batch_size", pa.int32()), ("max_gen_len", pa.int32()), ("power_cap_w", pa.float64()),
    ("engine", pa.string()), ("repeat", pa.int32()),
]
IDENTITY_COLUMNS = [name for name, _ in IDENTITY_FIELDS if name != "repeat"]

_FIELDS: list[tuple[str, pa.DataType]] = IDENTITY_FIELDS + [
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
    ("gco2e", pa.float64()), ("weights_synthetic", pa.bool_()),
    ("schema_version", pa.int32()),
]
METRICS_SCHEMA = pa.schema(
    [pa.field(n, t) for n, t in _FIELDS],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
METRIC_COLUMNS = [name for name, _ in _FIELDS]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable parquet (%s)", path, exc)
        return None


def identity_from(*docs: dict[str, Any] | None) -> dict[str, Any]:
    """Identity columns looked up in ``doc["cell"]``, ``doc["identity"]`` or ``doc`` itself."""
    ident: dict[str, Any] = {}
    for doc in docs:
        if not doc:
            continue
        for scope in (doc.get("cell"), doc.get("identity"), doc):
            if not isinstance(scope, dict):
                continue
            for key in IDENTITY_COLUMNS:
                if key not in ident and key in scope and not isinstance(scope[key], dict):
                    ident[key] = scope[key]
    if "model" not in ident:
        for doc in docs:
            model = (doc or {}).get("model")
            if isinstance(model, dict) and "name" in model:
                ident["model"] = model["name"]
                break
    return ident


def _nested(docs: tuple[dict[str, Any] | None, ...], *path: str) -> Any:
    for doc in docs:
        cur: Any = doc
        for key in path:
            cur = cur.get(key) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
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


def _opt(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else float(x)


def _idle_power_w(att: pd.DataFrame) -> float | None:
    idle = att[att["phase"] == "idle"]
    if len(idle) == 0:
        return None
    energy = idle["energy_j"].where(idle["energy_j"].notna(), idle["energy_instant_j"])
    return _div(_total(energy), float(idle["duration_s"].sum()))


def _repeat_row(r: int, att: pd.DataFrame | None, resp: pd.DataFrame | None,
                idle_power_w: float | None, base: dict[str, Any],
                grid_gco2_per_kwh: float | None) -> dict[str, Any]:
    row: dict[str, Any] = dict(base)
    row["repeat"] = r
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
    if energy is not None:
        row["energy_method"] = "counter" if use_counter else "instant_integral"
        for phase in ("prefill", "decode"):
            row[f"{phase}_energy_j"] = _total(ev.loc[ev["phase"] == phase, col])
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
    return row


def _derive_status(cell: dict[str, Any] | None, events: pd.DataFrame | None) -> tuple[str, str | None]:
    if cell and cell.get("status"):
        return str(cell["status"]), cell.get("reason")
    if events is None:
        return "incomplete", "no events.parquet and no cell.json"
    return "ok", None


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a table with :data:`METRICS_SCHEMA` from row dicts (missing keys → null)."""
    cols = {name: [_clean(r.get(name)) for r in rows] for name in METRIC_COLUMNS}
    return pa.Table.from_pydict(cols, schema=METRICS_SCHEMA)


def _clean(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def _gpu_names(cell: dict[str, Any] | None) -> str | None:
    """The devices the ranks really ran on (provenance), e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
    gpus = ((cell or {}).get("provenance") or {}).get("gpus") or []
    names = sorted({str(g.get("name")) for g in gpus if g.get("name")})
    return "+".join(names) or None


def compute_cell_metrics(cell_dir: Path, *, status: str | dict[str, Any] | None = None,
                         reason: str | None = None,
                         grid_gco2_per_kwh: float | None = None) -> pa.Table:
    """One row per repeat with the summary columns for the cell at ``cell_dir``.

    ``status`` overrides ``cell.json`` (``launch`` computes metrics before it writes
    ``cell.json``): either a status string (with ``reason``) or the cell.json document
    itself. Without either, a cell with events is ``ok`` and one without is
    ``incomplete``; an ``ok`` repeat without events becomes ``incomplete``.
    ``grid_gco2_per_kwh`` defaults to ``spec.json``'s value, if any.
    """
    cell_dir = Path(cell_dir)
    if not cell_dir.is_dir():
        raise UserError(f"{cell_dir}: cell directory does not exist")
    cell = _read_json(cell_dir / "cell.json")
    if isinstance(status, dict):
        cell, reason, status = status, status.get("reason"), status.get("status")
    spec = _read_json(cell_dir / "spec.json")
    if grid_gco2_per_kwh is None and spec and spec.get("grid_gco2_per_kwh") is not None:
        grid_gco2_per_kwh = float(spec["grid_gco2_per_kwh"])
    events = _read_parquet(cell_dir / "events.parquet")
    resp = _read_parquet(cell_dir / "responses.parquet")
    power = _read_parquet(cell_dir / "power.parquet")
    if resp is not None and "words_out" not in resp.columns and "text" in resp.columns:
        resp["words_out"] = resp["text"].fillna("").astype(str).str.split().str.len()
    docs = (cell, spec)

    derived_status, derived_reason = _derive_status(cell, events)
    base: dict[str, Any] = identity_from(cell, spec)
    base.setdefault("cell_id", cell_dir.name)
    base["status"] = status or derived_status
    base["reason"] = reason if status else derived_reason
    base["n_prompts"] = _nested(docs, "dataset", "n_prompts")
    weights = _nested(docs, "model", "weights") or _nested(docs, "weights")
    base["weights_synthetic"] = None if weights is None else str(weights) == "synthetic"
    source = power_source_of(power)  # from the samples, not from what cell.json planned
    base["power_source"] = source
    base["gpu_name"] = _gpu_names(cell)
    base["schema_version"] = SCHEMA_VERSION

    att = attribute_events(events, power) if events is not None and len(events) else None
    idle_power_w = _idle_power_w(att) if att is not None else None
    repeats: list[int] = []
    if att is not None:
        repeats = sorted(int(r) for r in att["repeat"].unique() if r >= 0)
    n_rep = _nested(docs, "repeats")
    if isinstance(n_rep, int) and n_rep > 0:
        repeats = sorted(set(repeats) | set(range(n_rep)))
    rows = [_repeat_row(r, att, resp, idle_power_w, base, grid_gco2_per_kwh) for r in repeats]
    if not rows:
        row = dict(base)
        row["repeat"] = None
        if row["status"] == "ok":
            row["status"], row["reason"] = "incomplete", "no repeats recorded"
        rows = [row]
    log.info("%s: %d metrics row(s), status %s, power %s", base["cell_id"], len(rows),
             base["status"], source)
    return to_table(rows)
