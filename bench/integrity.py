"""Issue 22's acceptance figures from a results directory of real cells (GPU, NVML).

    python bench/integrity.py bench-results/h200x1_integrity --out bench/results/h200_integrity.json

Per cell (``cells/<id>/metrics.parquet`` and ``cell.json``, as `llmenergy run-group`
writes them), three figures against the issue's limits:

* the energy balance closes: ``balance_unattributed_pct`` (the share of the cell's
  counter energy over its whole span that no phase, gap or window explains) ≤ 1 %;
* the measured prefill is repeatable: the spread of ``prefill_j_per_token_in`` (the
  prefill-only loop of each repeat) across repeats, ``(max − min) / mean`` ≤ 5 %;
* counter and instant power agree over long windows: ``energy_discrepancy_pct`` of
  every repeat whose window lasts ≥ 30 s (prefill and decode of the repeat; decode is
  ≥ 95 % of it) within ± 1 %.

A figure that is null in the data (withheld, with its reason) is reported as null and
fails its check. Prints one line per cell and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

LIMITS = {"unattributed_pct": 1.0, "prefill_spread_pct": 5.0, "discrepancy_pct": 1.0, "window_s": 30.0}


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def cell_figures(cell_dir: Path) -> dict[str, Any]:
    """The acceptance figures of one cell directory."""
    info = json.loads((cell_dir / "cell.json").read_text())
    m = pd.read_parquet(cell_dir / "metrics.parquet").sort_values("repeat")
    unattributed = _num(m["balance_unattributed_pct"].iloc[0]) if "balance_unattributed_pct" in m else None
    prefill = [_num(v) for v in m.get("prefill_j_per_token_in", pd.Series(dtype=float))]
    spread = None
    if prefill and all(v is not None for v in prefill) and len(prefill) >= 2:
        mean = sum(prefill) / len(prefill)
        spread = 100.0 * (max(prefill) - min(prefill)) / mean if mean > 0 else None
    long = m[m["duration_s"] >= LIMITS["window_s"]]
    disc = [_num(v) for v in long["energy_discrepancy_pct"]]
    worst = max((abs(v) for v in disc if v is not None), default=None)
    checks = {
        "unattributed": unattributed is not None and abs(unattributed) <= LIMITS["unattributed_pct"],
        "prefill_spread": spread is not None and spread <= LIMITS["prefill_spread_pct"],
        "discrepancy": bool(disc) and None not in disc and worst is not None and worst <= LIMITS["discrepancy_pct"],
    }
    return {
        "cell_id": cell_dir.name, "status": info.get("status"), "engine": m["engine"].iloc[0],
        "batch_size": int(m["batch_size"].iloc[0]), "repeats": len(m),
        "duration_s": [round(float(v), 2) for v in m["duration_s"]],
        "energy_j": [_num(v) for v in m["energy_j"]],
        "j_per_token": [_num(v) for v in m["j_per_token"]] if "j_per_token" in m else None,
        "balance_total_j": _num(m["balance_total_j"].iloc[0]) if "balance_total_j" in m else None,
        "balance_unattributed_pct": unattributed,
        "compile_j": _num(m["compile_j"].iloc[0]) if "compile_j" in m else None,
        "prefill_j_per_token_in": prefill, "prefill_spread_pct": spread,
        "energy_discrepancy_pct": [_num(v) for v in m["energy_discrepancy_pct"]],
        "long_windows": len(long), "max_abs_discrepancy_pct_long": worst,
        "checks": checks, "flags": info.get("energy_incomplete_reason"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("results", type=Path, help="the config's output_dir")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cells = sorted(p.parent for p in (args.results / "cells").glob("*/metrics.parquet"))
    if not cells:
        print(f"{args.results}: no cells/*/metrics.parquet", file=sys.stderr)
        return 2
    rows = [cell_figures(c) for c in cells]
    for r in rows:
        print(f"{r['engine']:9s} bs{r['batch_size']:<3d} {r['status']:10s} windows {r['duration_s']} s  "
              f"unattributed {r['balance_unattributed_pct']}%  prefill spread {r['prefill_spread_pct']}%  "
              f"|counter-instant| (>=30 s) {r['max_abs_discrepancy_pct_long']}%  checks {r['checks']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"limits": LIMITS, "cells": rows}, indent=1, default=str))
    return 0 if all(all(r["checks"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
