"""Why a number is withheld or flagged: the ``energy_reason`` clauses of a repeat's windows.

Each function reads the attribution columns of :func:`~llmenergy.analysis.energy.attribute_events`
for some windows and returns one clause, ``<column> null: why`` for a withheld number (the sensor
could not resolve the windows, the samples do not cover them, a gap at an edge, a counter reset)
or a flag that keeps the number (an edge in a shorter gap), or None when there is nothing to say.
"""
from __future__ import annotations

import pandas as pd

from llmenergy.analysis.energy import FLAG_GAP_PERIODS, GAP_PERIODS, unresolved_clause


#: What lengthens the windows of a column the sensor could not resolve (said in its reason).
LONGER_WINDOWS = {
    "idle_power_w": "a longer collector.idle_baseline_s resolves it",
    "prefill_energy_j": "the prefill-only loop (collector.prefill_window_s) meters the prefill on its own",
    "decode_energy_j": "a longer max_gen_len lengthens each decode window",
    "prefill_only_energy_j": "a longer collector.prefill_window_s resolves it",
}


def short_reason(column: str, windows: pd.DataFrame) -> str | None:
    """Why ``column`` is null when some of ``windows`` are below the sensor's resolution
    (and, where the config can change it, what lengthens them: :data:`LONGER_WINDOWS`)."""
    short = windows[windows["below_resolution"].astype(bool)]
    if len(short) == 0:
        return None
    return unresolved_clause(column, short["duration_s"].tolist(), len(windows),
                             float(windows["update_period_s"].iloc[0]), LONGER_WINDOWS.get(column, ""))


def uncovered_reason(ev: pd.DataFrame, column: str = "energy_j") -> str | None:
    bad = ev[ev["power_out_of_range"].astype(bool)]
    if len(bad) == 0:
        return None
    who = sorted({d for u in bad["uncovered_devices"].dropna() for d in str(u).split(", ")})
    return (f"{column} null: the samples of {', '.join(who) or 'a device'} do not cover "
            f"{len(bad)} of {len(ev)} window(s)")


def sample_reason(ev: pd.DataFrame, column: str = "energy_j") -> str | None:
    """Why ``column`` is null when the samples reach past ``ev``'s windows but a counter went
    down in one, or one begins or ends in a gap of the samples (:mod:`.energy`)."""
    drop = ev[ev["counter_drop"].astype(bool)]
    if len(drop):
        return (f"{column} null: the energy counter went down in {len(drop)} of {len(ev)} "
                "window(s) (a reset?)")
    gap = ev[ev["sample_gap"].astype(bool)]
    if len(gap):
        return (f"{column} null: {len(gap)} of {len(ev)} window(s) begin or end in a gap of up to "
                f"{float(gap['edge_gap_s'].max()):.2f} s in the power samples (over "
                f"{GAP_PERIODS} sensor update periods): their energy would be interpolated")
    return None


def _edge_note(ev: pd.DataFrame, column: str, gap: str, period: str, samples: str, off: str) -> str | None:
    if len(ev) == 0 or gap not in ev.columns:
        return None
    limit_s = FLAG_GAP_PERIODS * float(ev[period].iloc[0])
    wide = ev[ev[gap].fillna(0.0) > limit_s]
    if len(wide) == 0:
        return None
    return (f"{column} interpolated across a gap in the {samples}: {len(wide)} of {len(ev)} window(s) "
            f"begin or end in a gap of up to {float(wide[gap].max()):.2f} s (over {FLAG_GAP_PERIODS} "
            f"{off}, docs/measurement.md)")


def wide_edge_note(ev: pd.DataFrame, column: str = "energy_j") -> str | None:
    """A flag (not a null) on ``column`` when some of ``ev``'s windows begin or end in a gap of
    the power samples over :data:`~llmenergy.analysis.energy.FLAG_GAP_PERIODS` update periods
    (a longer one withholds the energy): the energy across it is interpolated."""
    return _edge_note(ev, column, "edge_gap_s", "update_period_s", "power samples",
                      "sensor update periods, up to ~4 % off")


def cpu_edge_note(ev: pd.DataFrame) -> str | None:
    """The same flag on ``cpu_energy_j`` for gaps in the RAPL samples (over 10 times the period of
    its gap limit: 1 s at polls of 100 ms or faster); the error across such a gap is not measured."""
    return _edge_note(ev, "cpu_energy_j", "cpu_edge_gap_s", "cpu_update_period_s", "RAPL samples",
                      "RAPL poll periods of at least 100 ms, an error not measured")


def cpu_reason(ev: pd.DataFrame) -> str | None:
    """Why ``cpu_energy_j`` is null where RAPL was collected but does not meter every window."""
    cpu_null = ev["cpu_energy_null"].dropna()
    if len(cpu_null) == 0:  # no RAPL samples at all: nothing was to be metered
        return None
    return f"cpu_energy_j null: {len(cpu_null)} of {len(ev)} window(s), e.g. {cpu_null.iloc[0]}"


def shared_note(ev: pd.DataFrame, column: str = "energy_j") -> str | None:
    """A flag (not a null) when a metered GPU counted another process holding a compute
    context during some of ``ev``'s windows: the counter meters the whole GPU, so another
    process's draw, if it drew any, is in ``column`` (the energy, or the idle power that
    ``active_energy_j`` subtracts)."""
    shared = ev["shared_devices"].dropna() if "shared_devices" in ev.columns else ev.iloc[:0]
    if len(shared) == 0:
        return None
    who = sorted({d for text in shared for d in str(text).split(", ")})
    what = "power" if column.endswith("_w") else "energy"
    return (f"{column} shared: {len(shared)} of {len(ev)} window(s) ran while {', '.join(who)} "
            "counted other processes holding a compute context on the GPU (not the job's ranks or "
            f"their children): their draw, if any, is in this {what}")
