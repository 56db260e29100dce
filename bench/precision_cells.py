"""The same cells through ``llmenergy run-group`` and through ``bench/engines.py`` (issue 24).

    python bench/precision_cells.py bench-results/h200x1_precision bench/results/h200_precision_all.json

For each cell of the results directory (``cells/<id>/metrics.parquet`` and ``cell.json``:
engine, precision, batch size), the bench run of the same engine, precision and batch
size; prints tokens/s and J/token of both and the pipeline's difference from the bench
in percent (the issue asks within 3 %), and writes them as JSON with ``--out``.  Tokens/s
is output tokens over the measured prefill and decode windows in both (the repeat's
median in the pipeline); J/token is the GPU energy counter's over the same windows.

Tokens/s counts the prefill, which is bound by the host and varied 21.6-50 ms a batch
between the bench's own runs on one H200 (session 20): the decode of a batch (the median
of the cell's ``decode`` events against the bench's ``decode_s``) is compared as well, and
each cell's place in its job (``provenance.group.position``; ``new engine`` when it did
not keep the previous cell's, and ``after a reset`` when built after a reset of the
compiled code: session 21 found that slower).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from decode_table import phase_medians_s  # bench/, the script's folder

log = logging.getLogger("precision_cells")
LIMIT_PCT = 3.0


#: The cell's logits against the same load's fp16 weights (int8/fp8; docs/precision.md).
FIDELITY = ("logit_rel_diff", "logit_rel_diff_max", "token_kl_nats", "top1_agree", "fidelity_positions",
            "fidelity_reason")


def _first(m: pd.DataFrame, col: str) -> Any:
    vals = m[col].dropna() if col in m else []
    return None if len(vals) == 0 else vals.iloc[0].item() if hasattr(vals.iloc[0], "item") else vals.iloc[0]


def pipeline_rows(results: Path) -> list[dict[str, Any]]:
    rows = []
    for cell_dir in sorted(p.parent for p in results.glob("cells/*/cell.json")):
        record = json.loads((cell_dir / "cell.json").read_text())
        status = record.get("status")
        metrics = cell_dir / "metrics.parquet"
        if not metrics.exists():
            rows.append({"cell": cell_dir.name, "status": status})
            continue
        m = pd.read_parquet(metrics)
        rows.append({"cell": cell_dir.name, "status": status, "engine": str(m["engine"].iloc[0]),
                     "precision": str(m["precision"].iloc[0]), "batch": int(m["batch_size"].iloc[0]),
                     "tokens_per_s": float(m["tokens_per_s"].median()),
                     "j_per_token": float(m["j_per_token"].median()),
                     **{f"{phase}_s": sec for phase, sec in phase_medians_s(cell_dir / "events.parquet").items()},
                     **_place(record),
                     **{c: _first(m, c) for c in FIDELITY}})
    return rows


def _place(record: dict[str, Any]) -> dict[str, Any]:
    """Where the cell ran in its job: position (None for a cell alone) and a new engine or not."""
    prov = record.get("provenance") or {}
    group, load = prov.get("group") or {}, prov.get("load") or {}
    return {"job_position": group.get("position"), "shared_engine": load.get("shared_engine"),
            "engine_after_reset": load.get("engine_after_reset")}  # None: recorded before session 21


def compare(results: Path, bench: Path) -> list[dict[str, Any]]:
    runs = json.loads(bench.read_text())["runs"]
    out = []
    for row in pipeline_rows(results):
        match = [r for r in runs if (r["engine"], r["precision"], r["batch"])
                 == (row.get("engine"), row.get("precision"), row.get("batch"))]
        if match and "tokens_per_s" in row:
            b = match[0]
            row["bench_tokens_per_s"] = b["tokens_per_s"]
            row["bench_j_per_token"] = b["j_per_token"]
            row["tokens_per_s_diff_pct"] = 100 * (row["tokens_per_s"] / b["tokens_per_s"] - 1)
            if b["j_per_token"] and row["j_per_token"] == row["j_per_token"]:
                row["j_per_token_diff_pct"] = 100 * (row["j_per_token"] / b["j_per_token"] - 1)
            for phase in ("prefill", "decode"):
                if row.get(f"{phase}_s") and b.get(f"{phase}_s"):
                    row[f"bench_{phase}_s"] = b[f"{phase}_s"]
                    row[f"{phase}_diff_pct"] = 100 * (row[f"{phase}_s"] / b[f"{phase}_s"] - 1)
            row["bench_engines_before"] = b.get("engines_before")  # in the bench's process
            row["bench_resets_before"] = b.get("resets_before")
        out.append(row)
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="the run-group output directory")
    p.add_argument("bench", type=Path, help="bench/engines.py's JSON")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = compare(args.results, args.bench)
    for r in rows:
        if "tokens_per_s_diff_pct" not in r:
            log.info("%-48s %s: no metrics or no bench run", r["cell"], r.get("status"))
            continue
        energy = ("J/token - (not metered)" if r["j_per_token"] != r["j_per_token"] else
                  f"J/token {r['j_per_token']:.4f} (bench not metered)" if r["bench_j_per_token"] is None else
                  f"J/token {r['j_per_token']:.4f} (bench {r['bench_j_per_token']:.4f}, "
                  f"{r.get('j_per_token_diff_pct', float('nan')):+5.1f}%)")
        log.info("%-48s %s  tok/s %8.1f (bench %8.1f, %+5.1f%%)  %s%s",
                 r["cell"], r["status"], r["tokens_per_s"], r["bench_tokens_per_s"],
                 r["tokens_per_s_diff_pct"], energy,
                 "" if abs(r["tokens_per_s_diff_pct"]) <= LIMIT_PCT else f"  (over {LIMIT_PCT} %)")
        if "decode_diff_pct" in r:
            place = ("alone" if r["job_position"] is None else
                     f"job position {r['job_position']}, {'kept engine' if r['shared_engine'] else 'new engine'}")
            place += ", after a reset" if r.get("engine_after_reset") else ""
            if r.get("bench_engines_before") is not None:
                place += f"; the bench's engine {r['bench_engines_before'] + 1} of its process"
                place += ", after a reset" if r.get("bench_resets_before") else ""
            log.info("%-48s decode %7.2f ms a batch (bench %7.2f, %+5.1f%%)  prefill %6.2f ms (bench %6.2f)  %s",
                     "", 1e3 * r["decode_s"], 1e3 * r["bench_decode_s"], r["decode_diff_pct"],
                     1e3 * r["prefill_s"], 1e3 * r.get("bench_prefill_s", float("nan")), place)
    for r in rows:
        if r.get("logit_rel_diff") is not None:
            log.info("%-48s logits vs fp16: rel diff %.4g (max %.4g), KL %.3g nats, top-1 %.3f over %s positions",
                     r["cell"], r["logit_rel_diff"], r["logit_rel_diff_max"], r["token_kl_nats"],
                     r["top1_agree"], r["fidelity_positions"])
        elif r.get("fidelity_reason"):
            log.info("%-48s logits vs fp16: %s", r["cell"], r["fidelity_reason"])
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
