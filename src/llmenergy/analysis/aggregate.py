"""Aggregate every cell's ``metrics.parquet`` into ``summary.parquet`` and ``summary_stats.parquet``.

The per-cell files are read as one ``pyarrow.dataset`` with the versioned
:data:`llmenergy.cellfiles.METRICS_SCHEMA`. Every fragment's footer and schema is
validated first; unreadable files are named in the result and in
``aggregate_problems.json`` and skipped. No cell vanishes: a cell without usable
metrics (and any planned cell without a directory) becomes a row with status
``missing`` (or its ``cell.json`` status) and a reason.

Confidence intervals: 95 % two-sided, Student t with n-1 degrees of freedom,
half-width ``t * std / sqrt(n)``. t quantiles come from scipy when installed,
else from a built-in table (df 1-30, 40, 60, 120, ∞; interpolated in 1/df).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from llmenergy.analysis.balance import BALANCE_COLUMNS
from llmenergy.analysis.metrics import (
    J_PER_KWH,
    RULES_VERSION,
    cell_identity,
    read_records,
    rules_version,
    to_table,
)
from llmenergy.analysis.remeter import remeter
from llmenergy.atomic import file_sha256, write_json, write_parquet
from llmenergy.cellfiles import (
    IDENTITY_COLUMNS,
    METRICS_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    CellRecord,
)
from llmenergy.errors import RecordError, UserError
from llmenergy.layout import CellFiles, RunLayout

log = logging.getLogger(__name__)

SUMMARY_NAME = RunLayout(Path()).summary.name
STATS_NAME = RunLayout(Path()).summary_stats.name
PROBLEMS_NAME = RunLayout(Path()).problems.name
#: Metrics summarised over repeats in ``summary_stats.parquet``.
STAT_METRICS = (
    "duration_s", "tokens_per_s", "words_per_s", "responses_per_s", "energy_j", "avg_power_w",
    "avg_power_per_gpu_w", "j_per_token", "j_per_word", "j_per_response", "active_energy_j",
    "latency_p50_s", "latency_p95_s", "energy_discrepancy_pct", "accuracy", "gco2e",
)

# Two-sided 95 % Student t quantiles t_{0.975, df}.
_T975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060,
    9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
    16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739,
    23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
    30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
_T975_INF = 1.9600


def _t975_table(df: np.ndarray) -> np.ndarray:
    """t_{0.975, df} from the table; linear in 1/df between entries; NaN for df < 1."""
    keys = np.array(sorted(_T975), dtype=np.float64)
    inv_keys = np.concatenate([[0.0], 1.0 / keys[::-1]])
    vals = np.concatenate([[_T975_INF], np.array([_T975[int(k)] for k in keys[::-1]])])
    d = np.asarray(df, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.interp(1.0 / np.where(d >= 1, d, np.nan), inv_keys, vals)
    return np.where(d >= 1, out, np.nan)


def t_quantile_975(df: np.ndarray) -> tuple[np.ndarray, str]:
    """Vector of t_{0.975, df} and the method used (``scipy`` or ``table``)."""
    d = np.asarray(df, dtype=np.float64)
    try:
        from scipy import stats  # type: ignore[import-not-found]
    except ImportError:
        return _t975_table(d), "table"
    with np.errstate(invalid="ignore"):
        return np.where(d >= 1, stats.t.ppf(0.975, np.where(d >= 1, d, 1)), np.nan), "scipy"


@dataclass
class AggregateResult:
    summary_path: Path
    stats_path: Path
    problems_path: Path
    n_rows: int
    n_cells: int
    status_counts: dict[str, int]
    problems: list[dict[str, str]] = field(default_factory=list)
    t_method: str = "table"


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected or pa.types.is_null(actual):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    if any(f(actual) for f in numeric) and any(f(expected) for f in numeric):
        return True
    strings = (pa.types.is_string, pa.types.is_large_string, pa.types.is_dictionary)
    return any(f(actual) for f in strings) and any(f(expected) for f in strings)


def _validate(fragment: ds.ParquetFileFragment) -> str | None:
    """Why a fragment cannot be used, or None (reads only its footer)."""
    try:
        _ = fragment.metadata.num_rows
        physical = fragment.physical_schema
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable: {str(exc).splitlines()[0]}"
    for name in ("cell_id", "status"):
        if physical.get_field_index(name) < 0:
            return f"no column {name!r}"
    for f in physical:
        idx = METRICS_SCHEMA.get_field_index(f.name)
        if idx >= 0 and not _compatible(f.type, METRICS_SCHEMA.field(idx).type):
            return f"column {f.name!r} has type {f.type}, expected {METRICS_SCHEMA.field(idx).type}"
    return None


def _scan(cells_dir: Path) -> tuple[list[str], list[Path]]:
    files: list[str] = []
    without: list[Path] = []
    with os.scandir(cells_dir) as it:
        for entry in it:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            path = str(CellFiles(Path(entry.path)).metrics)
            if os.path.exists(path):
                files.append(path)
            else:
                without.append(Path(entry.path))
    files.sort()
    return files, without


def _read_all(files: list[str], problems: list[dict[str, str]], stale: list[Path]) -> pa.Table:
    """Every readable metrics file's rows; an unreadable one goes to ``problems``, and the
    folders of those computed under older rules (:data:`~.metrics.RULES_VERSION`) to ``stale``."""
    if not files:
        return METRICS_SCHEMA.empty_table()
    dataset = ds.dataset(files, format="parquet", schema=METRICS_SCHEMA)
    good: list[ds.Fragment] = []
    older: list[Path] = []
    for frag in dataset.get_fragments():
        why = _validate(frag)
        if why is None:
            good.append(frag)
            if rules_version(frag.physical_schema.metadata) < RULES_VERSION:
                older.append(Path(frag.path).parent)
        else:
            problems.append({"path": frag.path, "cell_id": Path(frag.path).parent.name, "error": why})
    valid = ds.FileSystemDataset(good, schema=METRICS_SCHEMA, format=ds.ParquetFileFormat(),
                                 filesystem=dataset.filesystem)
    try:
        table = valid.to_table(use_threads=True)
    except (OSError, pa.ArrowException):
        log.warning("a metrics file failed to decode: reading fragments one by one to find it")
        tables = []
        for frag in good:
            try:
                tables.append(frag.to_table(schema=METRICS_SCHEMA))
            except (OSError, pa.ArrowException) as exc:
                problems.append({"path": frag.path, "cell_id": Path(frag.path).parent.name,
                                 "error": f"unreadable: {str(exc).splitlines()[0]}"})
        table = pa.concat_tables(tables) if tables else METRICS_SCHEMA.empty_table()
    unread = {Path(p["path"]).parent for p in problems}
    stale += [d for d in older if d not in unread]  # an unreadable file is a problem, not a cell to redo
    return table


def _placeholder(cell_id: str, ident: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    row = {k: v for k, v in ident.items() if k in IDENTITY_COLUMNS}
    row.update(cell_id=cell_id, status=status, reason=reason, repeat=None,
               power_source="none", schema_version=SCHEMA_VERSION)
    return row


def _failed_record(output_dir: Path, cell_id: str) -> CellRecord | None:
    """``failed/{cell}.json``: the last failure of a cell (Snakemake removes a failed job's cell.json)."""
    path = RunLayout(output_dir).failed_record(cell_id)
    try:
        return CellRecord.read(path) if path.exists() else None
    except RecordError as exc:
        log.warning("%s", exc)
        return None


def _cell_row(cdir: Path, reason: str) -> dict[str, Any]:
    record, spec = read_records(cdir)
    status = "missing"
    if record is not None and record.status != "ok":
        status = record.status
        reason = f"{reason}; cell.json: {record.reason or status}"
    elif record is None and (failed := _failed_record(cdir.parent.parent, cdir.name)) is not None:
        status = failed.status
        reason = f"{failed.status}: {failed.reason or 'no reason recorded'}"
    return _placeholder(cdir.name, cell_identity(record, spec), status, reason)


def cell_stats(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per cell over repeats: identity, status, n_repeats, n_ok and mean/std/n/ci95 per metric."""
    if len(summary) == 0:
        return pd.DataFrame(columns=["cell_id"]), "table"
    by_cell = summary.groupby("cell_id", sort=True, dropna=False)
    cells = by_cell[[c for c in IDENTITY_COLUMNS if c != "cell_id"]].first()
    cells["n_repeats"] = by_cell.size()
    if "fingerprint" in summary.columns:
        cells["fingerprint"] = by_cell["fingerprint"].first()
    is_ok = summary["status"] == "ok"
    cells["n_ok"] = is_ok.groupby(summary["cell_id"]).sum().astype("int64")
    cell_key = summary["cell_id"]
    bad = summary.loc[~is_ok, ["cell_id", "status", "reason"]]
    worst = (bad.groupby(["cell_id", "status"], dropna=False).size().rename("k").reset_index()
             .sort_values(["cell_id", "k"], ascending=[True, False], kind="stable")
             .drop_duplicates("cell_id").set_index("cell_id")["status"])
    cells["status"] = "ok"
    cells.loc[worst.index, "status"] = worst
    cells["reason"] = bad.groupby("cell_id")["reason"].first()
    sources = summary[["cell_id", "power_source"]].dropna().drop_duplicates()
    multi = sources["cell_id"].duplicated(keep=False)
    joined = sources[~multi].set_index("cell_id")["power_source"]
    if multi.any():
        joined = pd.concat([joined, sources[multi].groupby("cell_id")["power_source"].agg(
            lambda s: "+".join(sorted(s)))])
    cells["power_source"] = joined.reindex(cells.index).fillna("none")
    cells["short_window_any"] = (summary["short_window"].fillna(False).astype(bool)
                                 .groupby(cell_key).any())
    cells["max_abs_discrepancy_pct"] = (summary["energy_discrepancy_pct"].abs()
                                        .groupby(cell_key).max())
    # per cell already (repeated on each row): the balance, once; energy complete only if every row is
    present = [c for c in BALANCE_COLUMNS if c in summary.columns]
    if present:
        cells = cells.join(by_cell[present].first())
    if "energy_complete" in summary.columns:
        flags = summary["energy_complete"].astype("boolean")
        cells["energy_complete"] = flags.groupby(cell_key).agg(
            lambda s: pd.NA if s.isna().all() else bool(s.fillna(False).all()))
    ok = summary[is_ok].groupby("cell_id")[list(STAT_METRICS)]
    mean, std, n = ok.mean(), ok.std(ddof=1), ok.count()
    t, method = t_quantile_975(n.to_numpy() - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = pd.DataFrame(t * std.to_numpy() / np.sqrt(n.to_numpy()), index=std.index,
                          columns=std.columns)
    parts = [cells]
    for name, frame in (("mean", mean), ("std", std), ("n", n), ("ci95", ci)):
        parts.append(frame.add_suffix(f"_{name}"))
    out = pd.concat(parts, axis=1).reset_index()
    for col in (f"{m}_n" for m in STAT_METRICS):
        out[col] = out[col].fillna(0).astype("int64")
    return out, method


def _with_metadata(table: pa.Table, extra: dict[str, str]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[SCHEMA_VERSION_KEY] = str(SCHEMA_VERSION).encode()
    meta.update({f"llmenergy.{k}".encode(): v.encode() for k, v in extra.items()})
    return table.replace_schema_metadata(meta)


def _fill_precision(summary: pd.DataFrame, cells_dir: Path) -> pd.DataFrame:
    """The precision of rows from metrics written before it was a column: the cell's record says."""
    missing = summary["precision"].isna()
    for cid in summary.loc[missing, "cell_id"].unique():
        path = CellFiles(cells_dir / str(cid)).record
        try:
            precision = CellRecord.read(path).cell.precision
        except RecordError:
            continue  # left null: the cell has no readable record (the row says why it is not ok)
        summary.loc[summary["cell_id"] == cid, "precision"] = precision
    return summary


def read_summary(path: Path) -> tuple[pd.DataFrame, str]:
    """A summary and the SHA-256 of the very bytes read (what its figures, statistics and
    problems record): one read, so a summary rewritten meanwhile cannot pair with another's digest."""
    raw = Path(path).read_bytes()
    return pd.read_parquet(io.BytesIO(raw)), hashlib.sha256(raw).hexdigest()


def aggregate(output_dir: Path, *, grid_gco2_per_kwh: float | None = None,
              expected_cells: list[dict[str, Any]] | None = None) -> AggregateResult:
    """Write ``summary.parquet``, ``summary_stats.parquet`` and ``aggregate_problems.json``."""
    output_dir = Path(output_dir)
    cells_dir = RunLayout(output_dir).cells
    if not cells_dir.is_dir() and not expected_cells:
        raise UserError(f"{cells_dir}: no such directory (nothing to aggregate)")
    files, without = _scan(cells_dir) if cells_dir.is_dir() else ([], [])
    problems: list[dict[str, str]] = []
    stale: list[Path] = []
    table = _read_all(files, problems, stale)
    redone = remeter(table, stale)
    table = redone.table

    extra_rows = [_cell_row(Path(p["path"]).parent, f"metrics.parquet {p['error']}")
                  for p in problems]
    extra_rows += [_cell_row(d, "no metrics.parquet (queued, running, or crashed)")
                   for d in without]
    seen = set(table.column("cell_id").to_pylist()) | {r["cell_id"] for r in extra_rows}
    for cell in expected_cells or []:
        cid = str(cell.get("cell_id", ""))
        if cid and cid not in seen:
            extra_rows.append(_placeholder(cid, cell, "missing",
                                           "not run yet (queued, or not submitted): no cell directory"))
            seen.add(cid)
    if extra_rows:
        table = pa.concat_tables([table, to_table(extra_rows)])

    summary = _fill_precision(table.to_pandas(), cells_dir)
    mixed = summary.groupby("cell_id")["fingerprint"].nunique()
    if (mixed > 1).any():  # one metrics file per cell folder: only a hand-made file can do this
        raise RecordError(f"{cells_dir}: cell(s) {', '.join(mixed[mixed > 1].index)} hold rows of "
                          "more than one fingerprint; move the stale metrics.parquet aside")
    if grid_gco2_per_kwh is not None:
        summary["gco2e"] = summary["energy_j"] / J_PER_KWH * float(grid_gco2_per_kwh)
    summary = summary.sort_values(["cell_id", "repeat"], na_position="last", kind="stable")
    summary_table = pa.Table.from_pandas(summary, schema=METRICS_SCHEMA, preserve_index=False)
    stats, method = cell_stats(summary)

    summary_path = output_dir / SUMMARY_NAME
    stats_path = output_dir / STATS_NAME
    problems_path = output_dir / PROBLEMS_NAME
    write_parquet(summary_path, _with_metadata(summary_table, {}))
    digest = file_sha256(summary_path)  # the stats and problems name the summary they go with
    write_parquet(stats_path, _with_metadata(pa.Table.from_pandas(stats, preserve_index=False),
                                             {"t_method": method, "ci": "95% two-sided Student t",
                                              "summary_sha256": digest}))
    # cells a narrower matrix no longer plans: measured under their own definitions, kept, and named
    planned = {str(c.get("cell_id", "")) for c in expected_cells} if expected_cells is not None else None
    not_in_plan = ([] if planned is None else
                   sorted(str(c) for c in summary["cell_id"].unique() if str(c) not in planned))
    if not_in_plan:
        log.warning("%d cell(s) in %s are not in the config's plan (an earlier matrix): %s",
                    len(not_in_plan), cells_dir, ", ".join(not_in_plan))
    write_json(problems_path, {"problems": problems, "n_files": len(files), "not_in_plan": not_in_plan,
                               "remetered": redone.done, "older_rules_kept": redone.kept,
                               "status_changed": redone.status_changed,
                               "rules_version": RULES_VERSION, "summary_sha256": digest})
    counts = {str(k): int(v) for k, v in summary["status"].value_counts().items()}
    for p in problems:
        log.error("skipped %s: %s", p["path"], p["error"])
    log.info("aggregated %d row(s) of %d cell(s) into %s; statuses %s", len(summary),
             summary["cell_id"].nunique(), summary_path, counts)
    return AggregateResult(summary_path, stats_path, problems_path, len(summary),
                           int(summary["cell_id"].nunique()), counts, problems, method)
