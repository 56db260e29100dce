"""What a power table says about its sensors, before any energy is attributed.

The domains that count as GPU energy (:data:`GPU_DOMAINS`) and CPU energy
(:data:`CPU_DOMAINS`), the source a table's GPU rows came from
(:func:`power_source_of`), and :func:`align_to_sensor`, which stamps each value of a
polled counter (NVML) when the sensor updated it rather than when it was read.
:mod:`llmenergy.analysis.energy` reads the table only after this.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

#: Domains whose energy is the GPU energy (a sensor's, or the planning estimate's).
GPU_DOMAINS = ("gpu", "estimate")
#: RAPL domains: their energy goes to ``cpu_energy_j``.
CPU_DOMAINS = ("cpu_package", "dram")


def power_source_of(power: pd.DataFrame | None) -> str:
    """The GPU-domain power source(s) of a power table: e.g. ``nvml``; ``none`` if no GPU data."""
    if power is None or len(power) == 0 or "domain" not in power.columns:
        return "none"
    gpu = power[power["domain"].isin(GPU_DOMAINS)]
    if len(gpu) == 0:
        return "none"
    if "source" not in gpu.columns:
        return "estimate" if (gpu["domain"] == "estimate").all() else "unknown"
    sources = sorted({str(s) for s in gpu["source"].dropna().unique()} - {"none"})
    return "+".join(sources) if sources else "none"


#: Sources whose counter values are stamped when polled, not when the sensor updated them.
POLLED_COUNTER_SOURCES = ("nvml", "nvml-avg")
#: A device's counter is a staircase (polled faster than it updates) when at most this
#: share of its polls show a new value; only then are its values restamped.
STAIRCASE_MAX_CHANGED = 0.9
#: A poll this many median poll spacings after the one before follows missed polls: the value
#: it first shows may have come anywhere in the gap, so it keeps its poll time.
MISSED_POLLS = 5


def align_to_sensor(power: pd.DataFrame | None) -> pd.DataFrame | None:
    """``power`` with each polled counter value (NVML) stamped when the sensor updated it.

    NVML's energy counter takes a new value about every 100 ms; the collector polls it
    faster and stamps each sample when read. A value first seen at poll ``t_k`` (the
    previous poll, ``t_{k-1}``, still showed the old value) was updated somewhere in
    ``(t_{k-1}, t_k]``: it is stamped at the midpoint ``t_k − (t_k − t_{k-1}) / 2``, at
    most half that poll interval from the update. Only the counter moves: the row's
    other readings (instant power, utilisation) keep their poll time, the counter going
    to a row of its own. A device's first sample (no earlier poll), the repeats of an
    unchanged value, a value first seen after missed polls (its poll more than
    :data:`MISSED_POLLS` times the device's median poll spacing after the one before), a counter that changes at more
    than :data:`STAIRCASE_MAX_CHANGED` of its polls (it updates as fast as it is read), and sources that carry the
    sensor's own sample times (DCGM) or are not polled counters are left as they are. What this does not remove is the
    sensor's own lag behind the energy it reports (docs/measurement.md).
    """
    if power is None or len(power) == 0 or "source" not in power.columns or "energy_mj" not in power.columns:
        return power
    polled = power["source"].isin(POLLED_COUNTER_SOURCES) & power["energy_mj"].notna()
    if not polled.any():
        return power
    power = power.reset_index(drop=True)
    polled = polled.reset_index(drop=True)
    keys = ["node", "device"] if "node" in power.columns else ["device"]
    sub = power.loc[polled, [*keys, "timestamp_ns", "energy_mj"]].sort_values([*keys, "timestamp_ns"])
    t_ns = sub["timestamp_ns"].to_numpy(np.int64)
    prev_ns = np.concatenate([t_ns[:1], t_ns[:-1]])
    same_device = (sub[keys] == sub[keys].shift(1)).all(axis=1)
    changed = same_device & (sub["energy_mj"] != sub["energy_mj"].shift(1)) & pd.Series(t_ns > prev_ns, sub.index)
    # only devices polled faster than their counter updates (a staircase): a counter that
    # changes at (nearly) every poll is as fresh as the poll and keeps its time
    label = sub[keys].astype(str).agg("/".join, axis=1)
    share = changed.groupby(label).sum() / same_device.groupby(label).sum().clip(lower=1)
    changed &= label.map(share <= STAIRCASE_MAX_CHANGED).astype(bool)
    # after missed polls the update may lie anywhere in the gap: it keeps its poll time
    spacing = pd.Series(np.where(same_device, t_ns - prev_ns, np.nan), sub.index)
    usual = label.map(spacing.groupby(label).median())
    changed &= (spacing <= MISSED_POLLS * usual).fillna(False)
    moved = sub.index[changed.to_numpy()]
    if len(moved) == 0:
        return power
    counter_rows = power.loc[moved].copy()
    kept = (*keys, "device_index", "domain", "source", "timestamp_ns", "energy_mj")
    for col in (c for c in counter_rows.columns if c not in kept):  # the poll's other readings stay put
        numeric = pd.api.types.is_numeric_dtype(counter_rows[col]) and not pd.api.types.is_bool_dtype(counter_rows[col])
        counter_rows[col] = np.nan if numeric else None
    at = sub.index.get_indexer(moved)
    counter_rows["timestamp_ns"] = t_ns[at] - (t_ns[at] - prev_ns[at]) // 2
    out = power.copy()
    out.loc[moved, "energy_mj"] = np.nan
    out = pd.concat([out, counter_rows], ignore_index=True)
    return out.sort_values("timestamp_ns", kind="stable").reset_index(drop=True)
