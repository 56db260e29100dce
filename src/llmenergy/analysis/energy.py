"""Attribution of power samples to phase events.

For each event ``[start_ns, end_ns]`` and each device, the energy is the
difference of the cumulative counter (``energy_mj``) linearly interpolated at
the two boundaries. It is cross-checked against the trapezoid integral of the
instant power (``power_w``), with the boundary values interpolated too. Device
energies are summed. Events that are not fully inside a device's sampled range
get a null energy and ``power_out_of_range = True``: nothing is extrapolated.

Only GPU-domain devices (``gpu``, ``estimate``) count as GPU energy; CPU RAPL
domains (``cpu_package``, ``dram``) go to ``cpu_energy_j``, under the same coverage,
gap and reset rules (``cpu_energy_null`` says why an event's is null).

Polled counters (NVML) are first restamped by :func:`llmenergy.analysis.sensor.align_to_sensor`: each new
value at the midpoint between the poll that first showed it and the one before.

Resolution: a sensor reports a new value every *update period* (NVML's counter
and instant power: about 100 ms). An edge of a window can misplace up to one
period's energy, so a window shorter than :data:`RESOLUTION_PERIODS` periods is
``below_resolution`` (the metrics then publish its phase energy as null). The
period is measured from the data (the median spacing of a device's distinct
counter values, else of its instant-power values; the coarsest device counts),
or taken from :data:`DEFAULT_UPDATE_PERIOD_S` when a device shows fewer than
three updates.

Gaps and resets: a window edge that falls in a gap of a device's counter samples longer than
:data:`GAP_PERIODS` update periods (a collector that missed polls) would put an interpolated,
not a measured, share of the gap's energy in the window; its counter energy is null
(``sample_gap``). The instant integral is null likewise where such a gap lies anywhere in
or around the window. An edge in a gap over :data:`FLAG_GAP_PERIODS` periods keeps its energy
(``edge_gap_s`` says how wide; the metrics flag it). A counter that goes down inside a window (a reset) nulls that
window's counter energy (``counter_drop``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmenergy.analysis.sensor import CPU_DOMAINS, GPU_DOMAINS, align_to_sensor, power_source_of

log = logging.getLogger(__name__)

SHORT_WINDOW_S = 5.0
#: A window shorter than this many sensor update periods is below the sensor's resolution.
RESOLUTION_PERIODS = 10
#: The update period of a source when the data show too few updates to measure it.
DEFAULT_UPDATE_PERIOD_S = {"nvml": 0.1, "nvml-avg": 0.1, "dcgm": 0.1, "rapl": 0.001, "estimate": 0.1,
                           "replay": 0.1}
FALLBACK_UPDATE_PERIOD_S = 0.1
_MIN_UPDATES = 3
#: A sample gap longer than this many update periods at a window's edge withholds its energy:
#: about 20 missed polls in a row (2 s with NVML or DCGM). Shorter gaps are the collector's
#: scheduling on a loaded host (up to 0.75 s seen on a 2-core machine running the test suite)
#: and are interpolated, as an edge between two updates is.
GAP_PERIODS = 20
#: An edge in a gap longer than this many update periods (but not :data:`GAP_PERIODS`) keeps its
#: energy, flagged: on a real H100 trace (bench/gap_rule.py) gaps of 1-1.9 s put a 5-8 s decode
#: window up to 3.8 % off, gaps up to 1 s up to 1.9 %.
FLAG_GAP_PERIODS = 10


def unresolved_clause(column: str, short_s: Sequence[float], n_windows: int, update_period_s: float,
                      hint: str = "") -> str:
    """The ``energy_reason`` clause of ``column`` left null because the windows lasting
    ``short_s`` (of ``n_windows``) are under :data:`RESOLUTION_PERIODS` update periods."""
    lo, hi = f"{min(short_s):.3f}", f"{max(short_s):.3f}"
    span = lo if lo == hi else f"{lo}-{hi}"
    return (f"{column} null: {len(short_s)} of {n_windows} window(s) last {span} s, under "
            f"{RESOLUTION_PERIODS} sensor update periods ({RESOLUTION_PERIODS * update_period_s:.2f} s)"
            + (f", {hint}" if hint else ""))


#: Columns added by :func:`attribute_events`.
ATTRIBUTION_COLUMNS = (
    "duration_s",
    "energy_j",
    "energy_instant_j",
    "energy_discrepancy_pct",
    "avg_power_w",
    "short_window",
    "n_devices",
    "power_source",
    "power_out_of_range",
    "max_sample_gap_s",
    "gpu_util_pct",
    "mem_util_pct",
    "cpu_energy_j",
    "cpu_energy_null",
    "cpu_edge_gap_s",
    "cpu_update_period_s",
    "update_period_s",
    "below_resolution",
    "uncovered_devices",
    "sample_gap",
    "counter_drop",
    "edge_gap_s",
    "shared_devices",
)


@dataclass
class _Series:
    """One device's samples of one quantity, sorted by time (seconds as ns floats)."""

    t_ns: np.ndarray
    values: np.ndarray


def _series(df: pd.DataFrame, column: str) -> _Series | None:
    if column not in df.columns:
        return None
    sub = df.loc[df[column].notna(), ["timestamp_ns", column]]
    if len(sub) < 2:
        return None
    sub = sub.sort_values("timestamp_ns").drop_duplicates("timestamp_ns", keep="last")
    if len(sub) < 2:
        return None
    return _Series(sub["timestamp_ns"].to_numpy(np.float64), sub[column].to_numpy(np.float64))


def _counter_series(s: _Series | None) -> _Series | None:
    """The counter at its update instants.

    NVML's energy counter changes about every 100 ms while the collector polls
    it at up to 50 Hz, so raw samples form a staircase. Keeping only the first
    sample of each new value (plus the last sample) and interpolating between
    those treats power as constant between updates, instead of putting a
    whole step's energy at one edge of an event. ``s``: the counter as polled.
    """
    if s is None:
        return None
    changed = np.empty(len(s.values), dtype=bool)
    changed[0] = True
    changed[1:] = s.values[1:] != s.values[:-1]
    changed[-1] = True
    if changed.sum() < 2:
        return s
    return _Series(s.t_ns[changed], s.values[changed])


def _update_spacing_s(s: _Series | None) -> float | None:
    """Median spacing (s) of the instants where a series takes a new value; None if < 3 updates."""
    if s is None:
        return None
    new = np.flatnonzero(s.values[1:] != s.values[:-1]) + 1
    if len(new) < _MIN_UPDATES:
        return None
    return float(np.median(np.diff(s.t_ns[new]))) / 1e9


def update_period_s(power: pd.DataFrame | None,
                    domains: Sequence[str] = GPU_DOMAINS) -> tuple[float | None, str]:
    """The update period (s) of the ``domains`` samples of ``power`` (GPU by default) and how
    it was found.

    Per device: the median spacing of its distinct counter values (else of its
    instant-power values); a device with fewer than three updates takes its
    source's default (:data:`DEFAULT_UPDATE_PERIOD_S`). The coarsest device
    counts, since a sum over devices is only as fine as its coarsest part.
    ``(None, "no samples")`` without samples of those domains.
    """
    if power is None or len(power) == 0 or "domain" not in power.columns:
        return None, "no samples"
    gpu = power[power["domain"].isin(domains)]
    if len(gpu) == 0:
        return None, "no samples"
    keys = ["node", "device"] if "node" in gpu.columns else ["device"]
    periods: list[tuple[float, str]] = []
    for _, dev in gpu.groupby(keys, sort=True, dropna=False):
        measured = _update_spacing_s(_series(dev, "energy_mj"))
        if measured is None:
            measured = _update_spacing_s(_series(dev, "power_w"))
        if measured is not None:
            periods.append((measured, "measured"))
            continue
        src = str(dev["source"].dropna().iloc[0]) if "source" in dev.columns and dev["source"].notna().any() else ""
        periods.append((DEFAULT_UPDATE_PERIOD_S.get(src, FALLBACK_UPDATE_PERIOD_S),
                        f"default for {src or 'an unknown source'}"))
    period, how = max(periods)
    return period, how


def _in_range(s: _Series, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return (start >= s.t_ns[0]) & (end <= s.t_ns[-1]) & (end >= start)


def _counter_energy_j(s: _Series, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Counter difference (mJ → J) interpolated at the boundaries; NaN outside the range."""
    ok = _in_range(s, start, end)
    e_start = np.interp(start, s.t_ns, s.values)
    e_end = np.interp(end, s.t_ns, s.values)
    energy = (e_end - e_start) / 1000.0
    return np.where(ok, energy, np.nan)


def _counter_drops(s: _Series, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Per window: whether the counter goes down between samples in or around it (a reset:
    the difference across the window would then be wrong, even where it stays positive)."""
    out = np.zeros(len(start), dtype=bool)
    for i in np.flatnonzero(np.diff(s.values) < 0):
        out |= (s.t_ns[i + 1] > start) & (s.t_ns[i] < end)
    return out


def _edge_gap_s(s: _Series, x: np.ndarray) -> np.ndarray:
    """The spacing of the two samples around each instant ``x`` (0 outside the range)."""
    t = s.t_ns
    i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
    inside = (x >= t[0]) & (x <= t[-1])
    return np.where(inside, (t[i + 1] - t[i]) / 1e9, 0.0)


def _cumulative_integral_j(s: _Series, x_ns: np.ndarray) -> np.ndarray:
    """Exact integral (J) of the piecewise-linear power from the first sample to ``x_ns``."""
    t = s.t_ns
    p = s.values
    dt_s = np.diff(t) / 1e9
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * dt_s)])
    x = np.clip(x_ns, t[0], t[-1])
    i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
    h_s = (x - t[i]) / 1e9
    slope = (p[i + 1] - p[i]) / (dt_s[i])
    return cum[i] + p[i] * h_s + 0.5 * slope * h_s * h_s


def _instant_energy_j(s: _Series, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    ok = _in_range(s, start, end)
    energy = _cumulative_integral_j(s, end) - _cumulative_integral_j(s, start)
    return np.where(ok, energy, np.nan)


def _max_gap_s(s: _Series, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Largest spacing between samples that bracket or fall inside each window."""
    t = s.t_ns
    gaps = np.diff(t) / 1e9
    lo = np.clip(np.searchsorted(t, start, side="right") - 1, 0, len(gaps) - 1)
    hi = np.clip(np.searchsorted(t, end, side="left"), 1, len(t) - 1)
    out = np.empty(len(start))
    for k in range(len(start)):
        seg = gaps[lo[k]:max(hi[k], lo[k] + 1)]
        out[k] = float(seg.max()) if len(seg) else np.nan
    return out


def _window_sum_count(df: pd.DataFrame, column: str, start: np.ndarray,
                      end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of a column's non-null samples with start <= t <= end."""
    if column not in df.columns:
        return np.zeros(len(start)), np.zeros(len(start))
    sub = df.loc[df[column].notna(), ["timestamp_ns", column]].sort_values("timestamp_ns")
    t = sub["timestamp_ns"].to_numpy(np.float64)
    v = sub[column].to_numpy(np.float64)
    cs = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.searchsorted(t, start, side="left")
    hi = np.searchsorted(t, end, side="right")
    return cs[hi] - cs[lo], (hi - lo).astype(np.float64)


def _sum_domain(power: pd.DataFrame, start: np.ndarray, end: np.ndarray,
                gap_limit_s: float | None = None) -> dict[str, Any]:
    """Per-event sums over the devices of ``power`` (already filtered to one domain group).

    A sum is null for an event unless every device of ``power`` covers it with
    the quantity summed: never a partial sum over the devices that happen to.
    ``uncovered`` lists, per event, the ``node/device`` labels that do not cover it.
    With ``gap_limit_s``, a device's counter sum is also null where a sample gap longer
    than that holds an edge of the event (``sample_gap``), its instant integral where
    one lies in or around it; a counter that goes down in or around it nulls its
    counter sum (``counter_drop``).
    """
    n = len(start)
    counter = np.zeros(n)
    counter_ok = np.ones(n, dtype=bool)
    instant = np.zeros(n)
    instant_ok = np.ones(n, dtype=bool)
    covered = np.zeros(n, dtype=np.int64)
    out_of_range = np.zeros(n, dtype=bool)
    gap = np.full(n, np.nan)
    sample_gap = np.zeros(n, dtype=bool)
    counter_drop = np.zeros(n, dtype=bool)
    edge_gap = np.zeros(n)
    uncovered: list[list[str]] = [[] for _ in range(n)]
    keys = ["node", "device"] if "node" in power.columns else ["device"]
    for key, dev in power.groupby(keys, sort=True, dropna=False):
        label = "/".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        polls = _series(dev, "energy_mj")  # the counter as polled: its spacing shows missed polls
        cs = _counter_series(polls)
        ps = _series(dev, "power_w")
        ref = cs if cs is not None else ps
        if ref is None:  # a device with fewer than two samples covers nothing
            counter_ok[:] = False
            instant_ok[:] = False
            out_of_range[:] = True
            for u in uncovered:
                u.append(label)
            continue
        if cs is not None:
            e = _counter_energy_j(cs, start, end)
            drop = _counter_drops(cs, start, end)
            counter_drop |= drop
            e[drop] = np.nan
            # the polls' spacing, not the updates' (a flat counter is no gap)
            spacing = np.fmax(_edge_gap_s(polls, start), _edge_gap_s(polls, end))
            edge_gap = np.fmax(edge_gap, spacing)
            if gap_limit_s is not None:
                sample_gap |= spacing > gap_limit_s
                e[spacing > gap_limit_s] = np.nan
            counter_ok &= ~np.isnan(e)
            counter += np.nan_to_num(e)
        else:
            counter_ok[:] = False
        if ps is not None:
            e = _instant_energy_j(ps, start, end)
            if cs is None:  # the integral is the energy: a gap anywhere in or around it counts
                edge_gap = np.fmax(edge_gap, _max_gap_s(ps, start, end))
            if gap_limit_s is not None:
                wide = _max_gap_s(ps, start, end) > gap_limit_s
                sample_gap |= wide & (cs is None)  # the instant integral is the energy only without a counter
                e[wide] = np.nan
            instant_ok &= ~np.isnan(e)
            instant += np.nan_to_num(e)
        else:
            instant_ok[:] = False
        ok = _in_range(ref, start, end)
        covered += ok.astype(np.int64)
        out_of_range |= ~ok
        for k in np.flatnonzero(~ok):
            uncovered[k].append(label)
        gap = np.fmax(gap, _max_gap_s(ref, start, end))
    return {
        "counter": np.where(counter_ok, counter, np.nan),
        "instant": np.where(instant_ok, instant, np.nan),
        "covered": covered,
        "out_of_range": out_of_range,
        "gap": gap,
        "sample_gap": sample_gap,
        "counter_drop": counter_drop,
        "edge_gap": edge_gap,
        "uncovered": [", ".join(u) if u else None for u in uncovered],
    }


def _cpu_energy_j(cpu: pd.DataFrame, start: np.ndarray, end: np.ndarray) -> dict[str, Any]:
    """CPU (RAPL) energy per event (``cpu_energy_j``), where null why (``cpu_energy_null``: a
    phrase, else None), the widest sample gap at its edges (``cpu_edge_gap_s``) and the period
    its gap limit counts in (``cpu_update_period_s``).

    The gap and reset rules are the GPU's; RAPL updates every millisecond and is read at each
    poll, so the gap limit is :data:`GAP_PERIODS` times the larger of the measured spacing and
    :data:`FALLBACK_UPDATE_PERIOD_S` (2 s, as for NVML): late polls on a loaded host are not
    missed samples. The instant integral stands in only where no CPU device has a counter.
    """
    period, _ = update_period_s(cpu, CPU_DOMAINS)
    period = max(period or 0.0, FALLBACK_UPDATE_PERIOD_S)
    c = _sum_domain(cpu, start, end, GAP_PERIODS * period)
    has_counter = "energy_mj" in cpu.columns and bool(cpu["energy_mj"].notna().any())
    energy = c["counter"] if has_counter else c["instant"]
    why: list[str | None] = []
    for k in range(len(start)):
        if not np.isnan(energy[k]):
            why.append(None)
        elif c["uncovered"][k]:
            why.append(f"the samples of {c['uncovered'][k]} do not cover it")
        elif c["counter_drop"][k]:
            why.append("the RAPL counter went down in it (a reset?)")
        elif c["sample_gap"][k]:
            why.append(f"it begins or ends in a gap of up to {c['edge_gap'][k]:.2f} s in the RAPL samples")
        else:  # every device covers it, but not all with the quantity summed
            why.append("some RAPL zones have an energy counter and others only power: no one sum covers it")
    return {"cpu_energy_j": energy, "cpu_energy_null": pd.Series(why, dtype=object),
            "cpu_edge_gap_s": c["edge_gap"], "cpu_update_period_s": np.full(len(start), period)}


def _shared_devices(gpu: pd.DataFrame, start: np.ndarray, end: np.ndarray) -> pd.Series:
    """Per event: ``node/device (N)`` of each GPU whose sample inside it counted N > 0 other
    processes holding a compute context (not the job's ranks or their children: another job's, a
    leftover rank's, a notebook's; :mod:`llmenergy.power.processes`); None where none did or none
    was counted."""
    out: list[list[str]] = [[] for _ in range(len(start))]
    if "other_processes" in gpu.columns:
        many = gpu[gpu["other_processes"].fillna(0) > 0]
        keys = ["node", "device"] if "node" in many.columns else ["device"]
        for key, dev in many.groupby(keys, sort=True, dropna=False):
            label = "/".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            t = dev["timestamp_ns"].to_numpy(np.float64)
            count = dev["other_processes"].to_numpy(np.float64)
            for k in range(len(start)):
                inside = (t >= start[k]) & (t <= end[k])
                if inside.any():
                    out[k].append(f"{label} ({int(count[inside].max())})")
    return pd.Series([", ".join(o) if o else None for o in out], dtype=object)


def attribute_events(events: pd.DataFrame, power: pd.DataFrame | None) -> pd.DataFrame:
    """Return a copy of ``events`` with the energy columns of :data:`ATTRIBUTION_COLUMNS`.

    ``energy_j`` comes from the cumulative counter (null if no GPU device has one);
    ``energy_instant_j`` from integrating ``power_w``; both are sums over GPU-domain
    devices and null when any device's samples do not cover the whole event.
    """
    power = align_to_sensor(power)
    out = events.copy().reset_index(drop=True)
    n = len(out)
    start = out["start_ns"].to_numpy(np.float64) if n else np.zeros(0)
    end = out["end_ns"].to_numpy(np.float64) if n else np.zeros(0)
    duration_s = (end - start) / 1e9
    out["duration_s"] = duration_s
    out["short_window"] = duration_s < SHORT_WINDOW_S
    source = power_source_of(power)
    out["power_source"] = source

    has_power = power is not None and len(power) > 0 and "domain" in power.columns
    gpu = power[power["domain"].isin(GPU_DOMAINS)] if has_power else None
    cpu = power[power["domain"].isin(CPU_DOMAINS)] if has_power else None

    period, _ = update_period_s(power)
    if gpu is not None and len(gpu) > 0 and n > 0:
        g = _sum_domain(gpu, start, end, None if period is None else GAP_PERIODS * period)
        out["energy_j"] = g["counter"]
        out["energy_instant_j"] = g["instant"]
        out["n_devices"] = g["covered"]
        out["power_out_of_range"] = g["out_of_range"]
        out["max_sample_gap_s"] = g["gap"]
        out["uncovered_devices"] = g["uncovered"]
        out["sample_gap"] = g["sample_gap"]
        out["counter_drop"] = g["counter_drop"]
        out["edge_gap_s"] = g["edge_gap"]
        if g["counter_drop"].any():
            log.warning("energy counter went down in or around %d event(s): counter reset? energy set to null",
                        int(g["counter_drop"].sum()))
        out["shared_devices"] = _shared_devices(gpu, start, end)
        for col in ("gpu_util_pct", "mem_util_pct"):
            total, count = _window_sum_count(gpu, col, start, end)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[col] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    else:
        for col in ("energy_j", "energy_instant_j", "max_sample_gap_s", "gpu_util_pct", "mem_util_pct"):
            out[col] = np.full(n, np.nan)
        out["n_devices"] = np.zeros(n, dtype=np.int64)
        out["power_out_of_range"] = np.zeros(n, dtype=bool)
        out["uncovered_devices"] = pd.Series([None] * n, dtype=object)
        out["sample_gap"] = np.zeros(n, dtype=bool)
        out["counter_drop"] = np.zeros(n, dtype=bool)
        out["edge_gap_s"] = np.full(n, np.nan)
        out["shared_devices"] = pd.Series([None] * n, dtype=object)
    out["update_period_s"] = np.full(n, np.nan if period is None else period)
    out["below_resolution"] = (duration_s < RESOLUTION_PERIODS * period) if period is not None \
        else np.zeros(n, dtype=bool)

    if cpu is not None and len(cpu) > 0 and n > 0:
        for col, values in _cpu_energy_j(cpu, start, end).items():
            out[col] = values
    else:
        for col in ("cpu_energy_j", "cpu_edge_gap_s", "cpu_update_period_s"):
            out[col] = np.full(n, np.nan)
        out["cpu_energy_null"] = pd.Series([None] * n, dtype=object)

    e = out["energy_j"].to_numpy(np.float64)
    ei = out["energy_instant_j"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["energy_discrepancy_pct"] = np.where(e > 0, 100.0 * (ei - e) / e, np.nan)
        best = np.where(np.isnan(e), ei, e)
        out["avg_power_w"] = np.where(duration_s > 0, best / duration_s, np.nan)
    n_oor = int(out["power_out_of_range"].sum()) if n else 0
    if n_oor:
        missing = sorted({d for u in out["uncovered_devices"].dropna() for d in str(u).split(", ")})
        log.warning("%d of %d event(s) are not fully covered by the samples of %s: energy left null",
                    n_oor, n, ", ".join(missing))
    return out
