"""The energy balance of one cell: where the energy of its whole span went.

The span runs from the start of the cell's first event to the end of its last
(``idle`` … last ``decode``), as rank 0 stamped them. Its counter energy
(``balance_total_j``, summed over the cell's GPU-domain devices) splits into

* ``balance_idle_j`` (the ``settle`` interval and the ``idle`` window), ``balance_load_j``, ``compile_j``, ``balance_warmup_j``:
  the events of those phases (``compile`` includes a short last batch's compile
  inside a repeat); 0 when the cell has no such event;
* ``balance_measured_j``: every repeat's prefill and decode events;
* ``balance_prefill_only_j``: every repeat's prefill-only loop (the measured prefill);
* ``balance_gaps_j``: the time between the first measured event and the last
  one that no event covers (host work between batches and between repeats);
* ``balance_unattributed_j``: the rest of the span (e.g. between the idle
  window and the load), ``total − all of the above``.

Counter differences over adjacent windows add up exactly, so the parts close on
the total by construction; what a short window cannot tell is *which side* of
its edges up to one sensor update period of energy belongs to. A phase whose
windows are shorter than :data:`~llmenergy.analysis.energy.RESOLUTION_PERIODS`
update periods is published as null, and a reason names it; windows of a part less
than :data:`JOIN_GAP_PERIODS` of a period apart count as one (a prefill and its decode,
batches after a host gap that short) while those gaps stay within :data:`JOIN_GAP_SHARE`
of the stretch. The gaps and the unattributed rest are residuals
and are always published, with their durations.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from llmenergy.analysis.energy import GPU_DOMAINS, RESOLUTION_PERIODS, attribute_events, unresolved_clause

log = logging.getLogger(__name__)

#: Phase groups of the balance: column → phases of ``events.parquet``.
BALANCE_PHASES: dict[str, tuple[str, ...]] = {
    "balance_idle_j": ("settle", "idle"),  # the idle window and the settle interval before it
    "balance_load_j": ("load",),
    "compile_j": ("compile",),
    "balance_warmup_j": ("warmup",),
    "balance_measured_j": ("prefill", "decode"),
    "balance_prefill_only_j": ("prefill_only",),
}
#: Windows of one part closer together than this many update periods count as one for the
#: resolution rule: across such a gap g the interpolated counter, and the sensor's lag, can
#: misplace at most about 2 g × the power swing, against a quarter period's worth at a
#: window's outer edges. On the H200 the batches of a repeat are 1.5-2.4 ms
#: apart (the period is 100 ms): each lasts under 1 s, the repeat's stretch 5 s or more.
JOIN_GAP_PERIODS = 0.1
#: ... and only while those gaps add up to at most this share of the stretch, so that what
#: they can misplace stays below what the stretch's outer edges can (on the H200: 0.3-0.6 %).
JOIN_GAP_SHARE = 0.02
#: Per-cell columns this module fills (repeated on every repeat row of the cell).
BALANCE_COLUMNS = (
    "balance_window_s", "balance_total_j", *BALANCE_PHASES, "compile_duration_s",
    "balance_gaps_j", "balance_gaps_s", "balance_unattributed_j", "balance_unattributed_pct",
)


def _uncovered(intervals: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of ``[lo, hi]`` that no ``[start, end]`` row of ``intervals`` covers."""
    out: list[tuple[int, int]] = []
    cursor = lo
    for start, end in sorted((int(a), int(b)) for a, b in intervals):
        if end <= cursor:
            continue
        if start > cursor:
            out.append((cursor, min(start, hi)))
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    if cursor < hi:
        out.append((cursor, hi))
    return [(a, b) for a, b in out if b > a]


def _stretches_s(ev: pd.DataFrame, join_ns: int) -> np.ndarray:
    """Duration (s) of each stretch of a part's windows for the resolution rule. Touching
    windows (a prefill and its decode) are one; windows less than ``join_ns`` apart (the
    next batch after a short host gap) join a stretch as long as the gaps inside it add up
    to at most :data:`JOIN_GAP_SHARE` of it, else its windows are judged one by one."""
    windows: list[list[int]] = []
    for s, e in sorted(zip(ev["start_ns"].astype("int64"), ev["end_ns"].astype("int64"), strict=True)):
        if windows and s <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], e)
        else:
            windows.append([s, e])
    stretches: list[list[list[int]]] = []
    for w in windows:
        if stretches and w[0] - stretches[-1][-1][1] < join_ns:
            stretches[-1].append(w)
        else:
            stretches.append([w])
    out: list[int] = []
    for st in stretches:
        span = st[-1][1] - st[0][0]
        gaps = span - sum(e - s for s, e in st)
        out += [span] if gaps <= JOIN_GAP_SHARE * span else [e - s for s, e in st]
    return np.asarray(out, dtype=np.float64) / 1e9


def cell_balance(att: pd.DataFrame | None, power: pd.DataFrame | None) -> tuple[dict[str, Any], list[str]]:
    """The balance columns of a cell (:data:`BALANCE_COLUMNS`) and the reasons for nulls.

    ``att`` is :func:`~llmenergy.analysis.energy.attribute_events` of the cell's
    events over ``power``. Everything is null without events or power samples.
    """
    out: dict[str, Any] = dict.fromkeys(BALANCE_COLUMNS)
    if (att is None or len(att) == 0 or power is None or "domain" not in power.columns
            or not power["domain"].isin(GPU_DOMAINS).any()):
        return out, []  # nothing to balance: no events, or no GPU-domain samples (e.g. RAPL only)
    col = "energy_j" if att["energy_j"].notna().any() else "energy_instant_j"
    w0, w1 = int(att["start_ns"].min()), int(att["end_ns"].max())
    out["balance_window_s"] = (w1 - w0) / 1e9
    measured = att[att["phase"].isin(BALANCE_PHASES["balance_measured_j"])]
    gaps: list[tuple[int, int]] = []
    if len(measured):
        gaps = _uncovered(att[["start_ns", "end_ns"]].to_numpy(), int(measured["start_ns"].min()),
                          int(measured["end_ns"].max()))
    windows = pd.DataFrame({"start_ns": [w0] + [a for a, _ in gaps], "end_ns": [w1] + [b for _, b in gaps]})
    wa = attribute_events(windows, power)
    total = float(wa.loc[0, col])
    if not np.isfinite(total):
        who = wa.loc[0, "uncovered_devices"]
        if bool(wa.loc[0, "power_out_of_range"]):
            return out, [f"balance_total_j null: the samples{' of ' + str(who) if who else ''} do not "
                         "cover the cell's span"]
        return out, ["balance_total_j null: the energy counter went down in the cell's span, or its "
                     "start or end lies in a gap of the power samples"]
    out["balance_total_j"] = total
    period = float(att["update_period_s"].iloc[0])
    min_s = RESOLUTION_PERIODS * period
    reasons: list[str] = []
    parts = 0.0
    for name, phases in BALANCE_PHASES.items():
        ev = att[att["phase"].isin(phases)]
        value = float(ev[col].sum(min_count=0)) if ev[col].notna().all() else float("nan")
        parts += value
        durations = _stretches_s(ev, int(JOIN_GAP_PERIODS * period * 1e9))
        short = durations[durations < min_s]
        if len(short):
            reasons.append(unresolved_clause(name, short.tolist(), len(durations), period))
            value = float("nan")
        elif not np.isfinite(value):
            reasons.append(f"{name} null: some of its windows have no energy (not covered by every "
                           "device's samples, or across a gap or reset in them)")
        out[name] = value
    compile_ev = att[att["phase"] == "compile"]
    out["compile_duration_s"] = float(compile_ev["duration_s"].sum())
    gaps_j = wa[col].iloc[1:]
    out["balance_gaps_j"] = float(gaps_j.sum()) if gaps_j.notna().all() else None
    out["balance_gaps_s"] = float(sum(b - a for a, b in gaps)) / 1e9
    if out["balance_gaps_j"] is not None and np.isfinite(parts):
        rest = total - parts - out["balance_gaps_j"]
        out["balance_unattributed_j"] = rest
        out["balance_unattributed_pct"] = 100.0 * rest / total if total > 0 else None
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}, reasons
