#!/usr/bin/env python3
"""The gap rule on a real NVML trace: how far off a decode window's energy is when the
collector missed the polls around one of its edges, and which gaps the rule withholds.

Input: a raw trace of ``bench/nvml_probe.py`` (one H100, 7B decode, ~6 ms polls) and its
windows. The trace is thinned to the collector's default 40 ms power polls, the decode
windows are metered as the pipeline meters them (``attribute_events``), and that is the
reference. Then, for each decode window, each of its two edges, each gap length and each
place of the edge inside the gap, the polls inside the gap are removed (the fault comes from
outside the code: the samples are edited, not the rule) and the window metered again.

    python bench/gap_rule.py bench/results/session2/h100x1_probe_trace.npz \\
        bench/results/session2/h100x1_probe_windows.npz --out bench/results/session23/gap_rule.json
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmenergy.analysis.energy import GAP_PERIODS, attribute_events

GAPS_S = (0.25, 0.5, 1.0, 1.5, 1.9, 2.5, 4.0)
#: where the edge lies inside the gap, as a fraction of the gap from its start
PLACES = (0.1, 0.5, 0.9)


def trace_frame(trace: Path, poll_ms: float) -> pd.DataFrame:
    """The probe's trace as the collector's rows, one poll every ``poll_ms``."""
    z = np.load(trace)
    t = z["t0_ns"].astype(np.int64)
    grid = np.arange(t[0], t[-1], int(poll_ms * 1e6))
    keep = np.unique(np.clip(np.searchsorted(t, grid), 0, len(t) - 1))
    return pd.DataFrame({
        "node": "n0", "device": "GPU-probe", "device_index": np.int32(0), "domain": "gpu",
        "timestamp_ns": t[keep], "energy_mj": z["counter_mj"][keep], "power_w": z["f186_mw"][keep] / 1000.0,
        "gpu_util_pct": np.nan, "mem_util_pct": np.nan, "source": "nvml",
    })


def decode_events(windows: Path) -> pd.DataFrame:
    w = np.load(windows)
    dec = np.flatnonzero(w["phase"] == "decode")
    return pd.DataFrame({
        "cell_id": "probe", "repeat": np.int32(0), "phase": "decode",
        "batch_index": np.arange(len(dec), dtype=np.int32),
        "start_ns": w["start_ns"][dec], "end_ns": w["end_ns"][dec],
        "n_seqs": np.int32(1), "tokens_in": 0, "tokens_out": 1,
    })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("windows", type=Path)
    ap.add_argument("--poll-ms", type=float, default=40.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the rule's own warnings are what this counts

    power = trace_frame(args.trace, args.poll_ms)
    events = decode_events(args.windows)
    ref = attribute_events(events, power)
    period = float(ref["update_period_s"].iloc[0])
    cases = []
    for k, ev in events.iterrows():
        one = events.loc[[k]].reset_index(drop=True)
        ref_j = float(ref.loc[k, "energy_j"])
        for edge_name in ("start_ns", "end_ns"):
            edge = int(ev[edge_name])
            for gap_s in GAPS_S:
                for place in PLACES:
                    lo, hi = edge - int(place * gap_s * 1e9), edge + int((1 - place) * gap_s * 1e9)
                    t = power["timestamp_ns"]
                    att = attribute_events(one, power[(t <= lo) | (t >= hi)])
                    e = float(att.loc[0, "energy_j"])
                    cases.append({"window": int(k), "edge": edge_name[:-3], "gap_s": gap_s, "place": place,
                                  "duration_s": float(ref.loc[k, "duration_s"]), "reference_j": ref_j,
                                  "energy_j": None if np.isnan(e) else e,
                                  "withheld": bool(np.isnan(e)), "sample_gap": bool(att.loc[0, "sample_gap"]),
                                  "error_pct": None if np.isnan(e) else 100.0 * (e - ref_j) / ref_j})
    df = pd.DataFrame(cases)
    rows = []
    for gap_s, grp in df.groupby("gap_s"):
        err = grp["error_pct"].dropna().abs()
        rows.append({"gap_s": gap_s, "cases": len(grp), "withheld": int(grp["withheld"].sum()),
                     "median_abs_error_pct": float(err.median()) if len(err) else None,
                     "max_abs_error_pct": float(err.max()) if len(err) else None})
    print(f"update period {period * 1e3:.1f} ms (measured), gap limit {GAP_PERIODS * period:.2f} s; "
          f"{len(events)} decode windows of {events.eval('(end_ns - start_ns) / 1e9').min():.1f}-"
          f"{events.eval('(end_ns - start_ns) / 1e9').max():.1f} s, polls every {args.poll_ms:g} ms")
    print(f"{'gap (s)':>8} {'cases':>6} {'withheld':>9} {'median |err| %':>15} {'max |err| %':>12}")
    for r in rows:
        med = "-" if r["median_abs_error_pct"] is None else f"{r['median_abs_error_pct']:.2f}"
        mx = "-" if r["max_abs_error_pct"] is None else f"{r['max_abs_error_pct']:.2f}"
        print(f"{r['gap_s']:>8.2f} {r['cases']:>6} {r['withheld']:>9} {med:>15} {mx:>12}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"trace": str(args.trace), "poll_ms": args.poll_ms,
                                        "update_period_s": period, "gap_limit_s": GAP_PERIODS * period,
                                        "summary": rows, "cases": cases}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
