"""The self-contained HTML report (``results/report.html``).

jinja2 with autoescape on; figures are embedded as base64 PNG data URIs, CSS is
inline, and a Content-Security-Policy forbids any fetch, so the file works
offline and leaks nothing. Sections: a short answer (the lowest-J/token setting
per model × GPU against the paper's engine), banners about the power source,
matrix and status counts, findings (comparison sentences, the paper's findings
checked), comparisons (ratios with 95 % intervals, :mod:`~llmenergy.analysis.compare`),
figures (and skipped ones), all cells, failed and flagged cells (a flagged
repeat is marked ⚑ wherever its cell's number is read, with the reason as a
tooltip and a link to the flagged-repeats table), aggregate problems, accuracy,
provenance, how to rerun. Every table wraps to fit a 1,280-px window.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import pyarrow.parquet as pq

from llmenergy import __version__
from llmenergy.analysis.aggregate import (
    PROBLEMS_NAME,
    STATS_NAME,
    SUMMARY_NAME,
    cell_stats,
    read_summary,
)
from llmenergy.analysis.compare import METHOD_TEXT, pair_records, pairs, summarise, summary_records
from llmenergy.analysis.energy import RESOLUTION_PERIODS
from llmenergy.analysis.figdata import sorted_values
from llmenergy.analysis.findings import paper_findings, short_answer
from llmenergy.analysis.flags import (
    DISCREPANCY_LIMIT_PCT,
    HEADLINE_COLUMNS,
    cell_flags,
    clause_kind,
    flag_kinds,
    flagged_rows,
    reason_clauses,
)
from llmenergy.analysis.plots import FigureInfo, load_manifest, make_figures
from llmenergy.analysis.precision import precision_costs
from llmenergy.analysis.remeter import kept_entries
from llmenergy.atomic import write_text
from llmenergy.cellfiles import AXES, FIDELITY_TAIL, CellRecord
from llmenergy.errors import RecordError, UserError
from llmenergy.layout import RunLayout

log = logging.getLogger(__name__)

MATRIX_AXES = list(AXES)
CONFIG_COLUMNS = ["gpu", "shards", "batch_size", "max_gen_len", "power_cap_w", "dataset", "engine",
                  "precision"]


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers to short text; None/NaN → an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        if pd.isna(value):
            return "—"
    except (TypeError, ValueError):
        pass
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e12):
        return f"{int(value):,}"
    if isinstance(value, float):
        if 1000 <= abs(value) < 1e6:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def _axis_values(summary: pd.DataFrame, axis: str) -> list[str]:
    """Distinct values of one matrix axis in the figures' order (numbers ascending, engines and
    precisions in their own order); a null cap reads ``default``."""
    out = [_fmt(v) for v in sorted_values(summary[axis].dropna())]
    if axis == "power_cap_w" and summary.loc[summary["status"] != "missing", axis].isna().any():
        out.append("default")
    return out


def _records(df: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    cols = [c for c in columns if c in df.columns]
    return df[cols].astype(object).where(df[cols].notna(), None).to_dict("records")


def _figures(output_dir: Path, summary: pd.DataFrame, digest: str, own: bool) -> list[dict[str, Any]]:
    """The figures drawn from the summary whose SHA-256 is ``digest``: those in the results
    folder when its manifest names that summary, else drawn again (a date says nothing: a copy
    or an older run's figures can be newer than the summary). Drawn again into the folder only
    for its ``own`` summary; another's go to a temporary folder (the report embeds them)."""
    figdir = RunLayout(output_dir).figures
    infos = load_manifest(figdir)
    fresh = (bool(infos) and all(i.summary_sha256 == digest for i in infos)
             and all(i.skipped or (i.png is not None and i.png.exists()) for i in infos))
    if fresh:
        return _embed(infos or [])
    if infos and own:
        log.info("%s: figures drawn from another summary (or before they named it): drawing them again",
                 figdir)
    if own:
        return _embed(make_figures(summary, figdir, summary_sha256=digest))
    with tempfile.TemporaryDirectory(prefix="llmenergy-figures-") as tmp:
        return _embed(make_figures(summary, Path(tmp), summary_sha256=digest))


def _embed(infos: list[FigureInfo]) -> list[dict[str, Any]]:
    """The report's figure items, each PNG inline as a data URI."""
    out = []
    for info in infos:
        item: dict[str, Any] = {"name": info.name, "caption": info.caption,
                                "skipped": info.skipped, "reason": info.reason,
                                "power_source": info.power_source, "table": info.table,
                                "n_flagged": len(info.flagged)}
        if not info.skipped and info.png is not None:
            item["data_uri"] = "data:image/png;base64," + base64.b64encode(
                Path(info.png).read_bytes()).decode("ascii")
        out.append(item)
    return out


#: how the compiled engine ran, from a cell's ``provenance.load`` (docs/internals.md): the
#: report's row, the key, and the words for a value; a run that mixes them shows the count
#: of each (a switch such as ``LLMENERGY_DENSE_GEMV`` changes J/token, not the cell's id)
ENGINE_SETTINGS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("compiled: decode attention", "decode_key_buckets",
     lambda v: "keys written so far (key lengths)" if len(v) > 1 else "whole KV cache"),
    ("compiled: prefill", "prefill", str),
    ("compiled: fp16/bf16 linears", "dense_gemv",  # F.linear: cuBLAS on a GPU
     lambda v: "our GEMV at batch 1 (LLMENERGY_DENSE_GEMV=1)" if v else "torch's F.linear"),
    ("compiled: engine in its job", "engine_place", str),  # _engine_place
)


def _engine_place(load: dict[str, Any]) -> str | None:
    """Which engine of its job a compiled cell ran on (``engine_index``), and whether it was
    built after the job's compiled code was reset (``engine_after_reset``; every later engine
    before session 21): such an engine decoded ~3.5 % slower on an H200 (docs/measurement.md)."""
    if "decode_key_buckets" not in load or load.get("engine_index") is None:
        return None  # not the compiled engine, or recorded before session 20
    if load["engine_index"] == 0:
        return "its job's first engine"
    if not load.get("engine_after_reset", True):
        return "a later engine of its job, the compiled code before it kept"
    return ("a later engine of its job, built after a reset of the compiled code "
            "(such fp16 cells decoded 3.4–3.6 % slower on an H200: docs/measurement.md)")


def _settings_rows(loads: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A row per :data:`ENGINE_SETTINGS` some cell recorded: each value with its cells."""
    rows = []
    for label, key, words in ENGINE_SETTINGS:
        counts = Counter(words(load[key]) for load in loads if load.get(key) is not None)
        if counts:
            rows.append((label, ", ".join(f"{v}: {n} cell{'s' if n > 1 else ''}"
                                          for v, n in sorted(counts.items()))))
    return rows


def _provenance(output_dir: Path, cell_ids: list[str]) -> dict[str, Any]:
    keys = ("llmenergy", "torch", "python", "git_commit", "driver")
    seen: dict[str, set[str]] = {k: set() for k in keys}
    gpus: set[str] = set()
    hosts: set[str] = set()
    jobs: set[str] = set()
    started: list[str] = []
    finished: list[str] = []
    loads: list[dict[str, Any]] = []
    n_read = 0
    for cid in cell_ids:
        path = RunLayout(output_dir).cell(cid).record
        try:
            prov = CellRecord.read(path).provenance
        except RecordError:
            continue
        n_read += 1
        values = {"llmenergy": prov.versions.get("llmenergy"), "torch": prov.versions.get("torch"),
                  "python": prov.versions.get("python"), "git_commit": prov.git_commit, "driver": prov.driver}
        for k, v in values.items():
            if v is not None:
                seen[k].add(str(v))
        gpus.update(str(g.get("name")) for g in prov.gpus if isinstance(g, dict))
        hosts.update(str(h) for h in prov.hosts)
        if prov.slurm_job_id:
            jobs.add(str(prov.slurm_job_id))
        loads += [{**prov.load, "engine_place": _engine_place(prov.load)}] if isinstance(prov.load, dict) else []
        started += [prov.started_at] if prov.started_at else []
        finished += [prov.finished_at] if prov.finished_at else []
    labels = {"llmenergy": "llmenergy version", "torch": "torch version", "python": "python version",
              "git_commit": "git commit", "driver": "GPU driver"}
    rows = [(labels[k], ", ".join(sorted(v)) or "—") for k, v in seen.items()]
    rows += [("GPU names", ", ".join(sorted(gpus)) or "—"),
             ("hosts", f"{len(hosts)}: " + ", ".join(sorted(hosts)[:20])
              + (" …" if len(hosts) > 20 else "") if hosts else "—"),
             ("Slurm jobs", str(len(jobs)) if jobs else "—"),
             ("first start", min(started) if started else "—"),
             ("last finish", max(finished) if finished else "—")]
    return {"rows": rows + _settings_rows(loads), "n_read": n_read, "n_cells": len(cell_ids)}


def _banners(summary: pd.DataFrame) -> list[dict[str, str]]:
    ok = summary[summary["status"] == "ok"]
    sources = ok["power_source"].fillna("none").astype(str)
    out = []
    if len(ok) and (sources == "none").all():
        out.append({"level": "error", "text": "No power sensor: energy columns are empty. "
                    "Throughput and latency are measured; energy is not."})
    elif (sources == "none").any():
        n = ok.loc[sources == "none", "cell_id"].nunique()
        out.append({"level": "warn", "text": f"No power sensor for {n} cell(s): their energy "
                    "columns are empty."})
    if sources.str.contains("estimate").any():
        n = ok.loc[sources.str.contains("estimate"), "cell_id"].nunique()
        out.append({"level": "warn", "text": f"Energy is an ESTIMATE for {n} cell(s) (power "
                    "source 'estimate': modelled, not measured by a sensor)."})
    if len(ok) == 0:
        out.append({"level": "error", "text": "No cell finished successfully."})
    return out


def _key_findings(stats: pd.DataFrame) -> list[dict[str, Any]]:
    ok = stats[(stats["status"] == "ok") & stats["j_per_token_mean"].notna()]
    rows = []
    for model, grp in ok.groupby("model"):
        best = grp.loc[grp["j_per_token_mean"].idxmin()]
        config = ", ".join(
            f"{c}={'default' if c == 'power_cap_w' and pd.isna(best[c]) else _fmt(best[c])}"
            for c in CONFIG_COLUMNS if c in best.index)
        rows.append({"model": model, "j_per_token": best["j_per_token_mean"],
                     "ci95": best["j_per_token_ci95"], "tokens_per_s": best["tokens_per_s_mean"],
                     "config": config, "cell_id": best["cell_id"],
                     "power_source": best["power_source"], "n": best["j_per_token_n"]})
    return rows


def _logs(output_dir: Path, cell_id: str) -> list[str]:
    """Where to look for a cell's failure: the paths that exist, relative to ``output_dir``."""
    rel = RunLayout(Path())
    candidates = [rel.failed_record(cell_id), rel.rule_log("run_cell", cell_id), rel.cell(cell_id).logs]
    return [str(p) + ("/" if p.name == "logs" else "") for p in candidates if (output_dir / p).exists()]


def _not_measured(output_dir: Path, stats: pd.DataFrame, summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Cells without an ok measurement (failed, missing, queued, ...) with reasons and log paths."""
    rows = _records(stats[stats["status"] != "ok"], ["cell_id", "status", "n_ok", "n_repeats", "reason"])
    energy = ({} if "energy_reason" not in summary.columns else
              summary.dropna(subset=["energy_reason"]).groupby("cell_id")["energy_reason"].first())
    for row in rows:
        row["logs"] = _logs(output_dir, str(row["cell_id"]))
        why = energy.get(row["cell_id"]) if len(energy) else None
        # the energy clauses too, unless the cell's reason already quotes them
        row["energy_reason"] = why if why and why.split("; ")[0] not in str(row.get("reason")) else None
    return rows


#: The balance table's parts, in the order of the cell's life: (label, energy column, seconds column).
BALANCE_PARTS = [("Idle", "balance_idle_j", None), ("Load", "balance_load_j", None),
                 ("Compile", "compile_j", "compile_duration_s"),
                 ("Warm-up", "balance_warmup_j", None),
                 ("Measured (prefill + decode)", "balance_measured_j", None),
                 ("Gaps", "balance_gaps_j", "balance_gaps_s"),
                 ("Unattributed", "balance_unattributed_j", None)]


def _cell_reasons(summary: pd.DataFrame) -> dict[str, dict[str, str]]:
    """cell_id → {column → the first ``energy_reason`` clause naming it} over the cell's rows."""
    out: dict[str, dict[str, str]] = {}
    if "energy_reason" not in summary.columns:
        return out
    for cid, text in summary[["cell_id", "energy_reason"]].dropna().itertuples(index=False):
        for column, clause in reason_clauses(text):
            if column is not None:
                out.setdefault(str(cid), {}).setdefault(column, clause)
    return out


def _balance(summary: pd.DataFrame, stats: pd.DataFrame) -> dict[str, Any]:
    """The energy balance table: per cell with a balance, each part in J and % of the total,
    a null part with its reason; and the sensor's update period the resolution rule used."""
    periods = pd.to_numeric(summary.get("update_period_s", pd.Series(dtype=float)),
                            errors="coerce").dropna()
    period = float(periods.max()) if len(periods) else None
    resolution = {"periods": RESOLUTION_PERIODS, "period_s": period,
                  "min_s": RESOLUTION_PERIODS * period if period else None}
    if "balance_total_j" not in stats.columns:
        return {"rows": [], "nulls": [], "present": False, **resolution}
    reasons = _cell_reasons(summary)
    has = stats[stats["balance_total_j"].notna() | stats["cell_id"].astype(str).isin(
        [c for c, r in reasons.items() if any(k.startswith("balance_") for k in r)])]
    rows = []
    for _, c in has.iterrows():
        cid = str(c["cell_id"])
        total = c["balance_total_j"]
        parts = []
        for label, col, secs in BALANCE_PARTS:
            value = c.get(col)
            value = None if value is None or pd.isna(value) else float(value)
            pct = (100.0 * value / float(total) if value is not None and pd.notna(total)
                   and float(total) > 0 else None)
            why = reasons.get(cid, {}).get(col)
            if value is None and why is None:
                withheld = [p["label"] for p in parts if p["j"] is None]
                why = (reasons.get(cid, {}).get("balance_total_j",
                                                "null: the cell's span is not covered by every device's samples")
                       if pd.isna(total) else
                       f"null: the rest of the total is unknown while {', '.join(withheld)} "
                       f"{'is' if len(withheld) == 1 else 'are'} withheld" if withheld else
                       "null: a part it depends on is null")
            parts.append({"label": label, "j": value, "pct": pct, "reason": why,
                          "s": c.get(secs) if secs else None})
        rows.append({"cell_id": cid, "status": c.get("status"),
                     "window_s": c.get("balance_window_s"), "total_j": total,
                     "parts": parts, "complete": c.get("energy_complete"),
                     "total_reason": reasons.get(cid, {}).get("balance_total_j")})
    # the same reason in many cells, each with its own numbers: one line, the first's numbers
    by_reason: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for r in rows:
        for p in r["parts"]:
            if p["j"] is None:
                why = str(p["reason"])
                by_reason.setdefault((p["label"], clause_kind(why)), []).append((r["cell_id"], why))
    nulls = [([c for c, _ in said], label,
              said[0][1] + (" (the numbers are the first cell's)" if len({w for _, w in said}) > 1 else ""))
             for (label, _), said in by_reason.items()]
    return {"rows": rows, "nulls": nulls, "present": True, **resolution}


def _flags(summary: pd.DataFrame, stats: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    failed = stats[stats["status"] != "ok"]
    ok = summary[summary["status"] == "ok"]

    def col(name: str, default: Any) -> pd.Series:
        return ok[name] if name in ok.columns else pd.Series(default, index=ok.index)

    short = ok[col("short_window", False).fillna(False).astype(bool)]
    disc = ok[col("energy_discrepancy_pct", float("nan")).abs() > DISCREPANCY_LIMIT_PCT]
    oor = ok[col("power_out_of_range", False).fillna(False).astype(bool)]
    src = ok[ok["power_source"].fillna("none").str.contains("none|estimate")]
    src = src.groupby("cell_id", as_index=False)["power_source"].first()
    flagged = flagged_rows(summary)
    repeats = []  # repeats of a cell with the same reasons share a row
    for (cid, why), grp in flagged.groupby(["cell_id", "flag_reasons"], sort=False):
        reps = [r for r in grp["repeat"].tolist() if pd.notna(r)]
        repeats.append({"cell_id": cid, "flag_reasons": why,
                        "repeat": ", ".join(str(int(r)) for r in sorted(reps)) if reps else None})
    seen: set[str] = set()
    for r in repeats:  # the first row of a cell carries the anchor the tables link to
        r["anchor"] = str(r["cell_id"]) not in seen
        seen.add(str(r["cell_id"]))
    return {
        "failed": _records(failed, ["cell_id", "status", "n_ok", "n_repeats", "reason"]),
        "repeats": repeats,
        "kinds": flag_kinds(flagged),
        "short": _records(short, ["cell_id", "repeat", "duration_s"]),
        "discrepancy": _records(disc, ["cell_id", "repeat", "energy_discrepancy_pct",
                                       "energy_j", "energy_instant_j"]),
        "out_of_range": _records(oor, ["cell_id", "repeat"]),
        "source": _records(src, ["cell_id", "power_source"]),
    }


def _accuracy(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Per graded cell: accuracy and J per correct answer over its ``ok`` repeats; a cell
    with repeats that are not ``ok`` says so (``withheld``), its means left empty."""
    acc = summary[summary["accuracy"].notna()]
    if len(acc) == 0:
        return []
    out = []
    for cid, rows in acc.groupby("cell_id", sort=True):
        ok = rows[rows["status"] == "ok"]
        bad = sorted(set(rows["status"]) - {"ok"})
        out.append({"cell_id": cid, "model": rows["model"].iloc[0], "dataset": rows["dataset"].iloc[0],
                    "accuracy": None if bad else float(ok["accuracy"].mean()),
                    "j_per_correct": None if bad else ok["j_per_correct"].mean(),
                    "synthetic": bool(rows["weights_synthetic"].any()),
                    "withheld": (f"{len(rows) - len(ok)} of {len(rows)} repeat(s) {', '.join(bad)}: "
                                 "the cell is not finished" if bad else None)})
    return out


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("llmenergy", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


def _stats(path: Path, summary: pd.DataFrame, digest: str) -> pd.DataFrame:
    """The per-cell statistics ``aggregate`` wrote beside the summary whose SHA-256 is
    ``digest``; computed again from ``summary`` when the file is absent or goes with another."""
    if path.exists():
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"llmenergy.summary_sha256", b"").decode() == digest:
            return pd.read_parquet(path)
        log.info("%s goes with another summary: statistics computed from this one", path)
    return cell_stats(summary)[0]


def _problems(path: Path, digest: str) -> dict[str, Any] | None:
    """What ``aggregate`` found for the summary whose SHA-256 is ``digest`` (unreadable cell
    files, cells outside the plan, cells metered under older rules); None (not known) without
    such a file, or when it goes with another summary."""
    if not path.exists():
        log.warning("%s: none beside the summary: the report cannot say which metrics files were skipped", path)
        return None
    read = json.loads(path.read_text())
    if read.get("summary_sha256") != digest:
        log.warning("%s goes with another summary (or an older aggregate): its problems are not shown; "
                    "run `llmenergy aggregate` again", path)
        return None
    return read


def render_report(output_dir: Path, *, summary_path: Path | None = None,
                  out_path: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Render ``report.html`` from the aggregate outputs in ``output_dir``; return its path."""
    output_dir = Path(output_dir)
    summary_path = Path(summary_path) if summary_path else output_dir / SUMMARY_NAME
    out_path = Path(out_path) if out_path else RunLayout(output_dir).report
    if not summary_path.exists():
        raise UserError(f"{summary_path}: no summary; run `llmenergy aggregate` first")
    summary, digest = read_summary(summary_path)
    stats = _stats(output_dir / STATS_NAME, summary, digest)
    found = _problems(output_dir / PROBLEMS_NAME, digest)
    own = summary_path.resolve() == (output_dir / SUMMARY_NAME).resolve()
    figures = _figures(output_dir, summary, digest, own)
    pair_rows = pairs(summary)
    sums = summarise(pair_rows)
    flags_by_cell = cell_flags(summary)
    by_status_rows = summary["status"].value_counts().sort_index()
    by_status_cells = stats["status"].value_counts().sort_index()
    axes = {a: _axis_values(summary, a) for a in MATRIX_AXES if a in summary}
    ctx = {
        "title": f"llmenergy report: {output_dir.resolve().name}",
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "output_dir": str(output_dir),
        "banners": _banners(summary),
        "axes": axes,
        "status_rows": list(by_status_rows.items()),
        "status_cells": list(by_status_cells.items()),
        "n_cells": len(stats),
        "n_rows": len(summary),
        "findings": _key_findings(stats),
        "answer": short_answer(summary),
        "comparisons": summary_records(sums),
        "pairs": pair_records(pair_rows),
        "compare_method": METHOD_TEXT,
        "paper": paper_findings(sums, summary),
        "cell_flags": flags_by_cell,
        "headline_flags": cell_flags(summary, HEADLINE_COLUMNS),
        "figures": [f for f in figures if not f["skipped"]],
        "skipped_figures": [f for f in figures if f["skipped"]],
        "cells": _records(stats, ["cell_id", "model", "dataset", "gpu", "shards", "batch_size",
                                  "max_gen_len", "power_cap_w", "engine", "precision", "status", "n_ok",
                                  "n_repeats",
                                  "tokens_per_s_mean", "tokens_per_s_ci95", "j_per_token_mean",
                                  "j_per_token_ci95", "avg_power_w_mean", "power_source"]),
        "flags": _flags(summary, stats),
        "not_measured": _not_measured(output_dir, stats, summary),
        "balance": _balance(summary, stats),
        "discrepancy_limit_pct": DISCREPANCY_LIMIT_PCT,
        "problems": (found or {}).get("problems", []),
        "problems_known": found is not None,
        "problems_file": PROBLEMS_NAME,
        "remetered": (found or {}).get("remetered", []),
        "older_rules_kept": kept_entries(found),
        "status_changed": (found or {}).get("status_changed", []),
        "rules_version": (found or {}).get("rules_version"),
        "not_in_plan": (found or {}).get("not_in_plan", []),
        "accuracy": _accuracy(summary),
        "precision_costs": precision_costs(summary, pair_rows),
        "fidelity_tail": FIDELITY_TAIL,
        "provenance": _provenance(output_dir, sorted(stats["cell_id"].astype(str))),
        "extra": extra or {},
    }
    html = _env().get_template("report.html.j2").render(**ctx)
    write_text(out_path, html)
    log.info("wrote %s (%d cells, %d figures, %d skipped)", out_path, len(stats),
             len(ctx["figures"]), len(ctx["skipped_figures"]))
    return out_path
