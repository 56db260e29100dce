"""The data side of the figures: which rows a figure shows and how its caption says so.

A figure plots one metric against one matrix axis (``x``), one line per value of
a second (``hue``), one panel per facet (model, GPU type). Every other axis is
*held fixed*: per panel, :func:`hold_fixed` keeps one value of each (the
uncapped power limit when there is one, else the value that covers the most
x × hue points; ties go to the smallest value) so no point mixes cells. Each
plotted point is then the mean over the ``ok`` repeats of one cell, with the
95 % two-sided Student-t interval over those repeats, the same interval as the
report's table (:func:`llmenergy.analysis.aggregate.t_quantile_975`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llmenergy.analysis.aggregate import t_quantile_975

log = logging.getLogger(__name__)

#: The axes of the matrix, in the order captions name them.
AXES = ["model", "dataset", "gpu", "shards", "batch_size", "max_gen_len", "power_cap_w", "engine",
        "precision"]
CONFIG_KEYS = [a for a in AXES if a != "power_cap_w"]
MAX_HUES = 8
AXIS_NAMES = {
    "model": "model", "dataset": "dataset", "gpu": "GPU type", "shards": "shards (GPUs)",
    "batch_size": "batch size", "max_gen_len": "max generation length (tokens)",
    "power_cap_w": "power cap", "engine": "engine", "precision": "precision (weights)",
}
CI_TEXT = "95 % Student-t interval over the cell's ok repeats (as in the table)"


class FigureSkipped(Exception):
    """No data for a figure; the message says why."""


def ok_rows(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """The ``ok`` rows with every column of ``cols`` present."""
    df = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise FigureSkipped(f"summary has no column(s) {', '.join(missing)}")
    return df.dropna(subset=list(cols))


def energy_rows(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """Like :func:`ok_rows`, skipping with the power source named when energy is empty."""
    df = ok_rows(summary, *cols)
    if len(df) == 0:
        src = sorted({str(s) for s in summary.get("power_source", pd.Series(dtype=str)).dropna()})
        raise FigureSkipped("no energy data (power source: " + (", ".join(src) or "none")
                            + "): energy columns are empty")
    return df


def power_label(df: pd.DataFrame) -> str:
    sources = sorted({str(s) for s in df.get("power_source", pd.Series(dtype=str)).dropna()})
    text = "power: " + ("+".join(sources) if sources else "none")
    return text + " (ESTIMATE)" if any("estimate" in s for s in sources) else text


def fmt_value(axis: str, value: Any) -> str:
    """One axis value as text: ``250 W``, ``default`` for no cap, ``16`` not ``16.0``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "default (uncapped)" if axis == "power_cap_w" else "—"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, np.integer):
        value = int(value)
    return f"{value} W" if axis == "power_cap_w" else str(value)


def fmt_number(v: float) -> str:
    """Tick text: ``0.1``, ``2``, ``1050``, ``2.5e+04`` (no ``1.05e+03`` below 10^5)."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else ""
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.2g}"


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(low, high) of the 95 % Student-t interval of the mean; the mean twice when n < 2."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (math.nan, math.nan)
    mean = float(v.mean())
    if len(v) < 2:
        return (mean, mean)
    t, _ = t_quantile_975(np.array([len(v) - 1]))
    half = float(t[0]) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return (mean - half, mean + half)


def _same(series: pd.Series, value: Any) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    return series == value


@dataclass
class Held:
    """The rows a figure plots and the values of the axes it holds fixed."""

    rows: pd.DataFrame
    facets: list[str]
    #: axis -> {facet key -> the value kept}
    fixed: dict[str, dict[tuple, Any]] = field(default_factory=dict)
    #: axis -> every value the candidate rows had
    available: dict[str, list[Any]] = field(default_factory=dict)
    hue_dropped: list[Any] = field(default_factory=list)

    def caption(self) -> str:
        """``Held fixed: dataset = alpaca (of alpaca, gsm8k); shards = 1 for …``."""
        parts = []
        for axis, per_facet in self.fixed.items():
            name = AXIS_NAMES.get(axis, axis)
            by_value: dict[str, list[str]] = {}
            for key, value in per_facet.items():
                by_value.setdefault(fmt_value(axis, value), []).append(" / ".join(map(str, key)))
            if len(by_value) == 1:
                text = f"{name} = {next(iter(by_value))}"
            else:
                text = f"{name} = " + "; ".join(f"{v} for {', '.join(k)}" for v, k in by_value.items())
            others = [fmt_value(axis, v).replace(" (uncapped)", "")
                      for v in self.available.get(axis, [])]
            if len(others) > 1:
                text += f" (measured: {', '.join(others)})"
            parts.append(text)
        out = "Held fixed: " + "; ".join(parts) + "." if parts else ""
        if self.hue_dropped:
            out += (" Not shown, to keep lines apart: " + ", ".join(map(str, self.hue_dropped))
                    + ".")
        return out

    def panel_note(self, key: tuple) -> str:
        """The fixed values that differ between panels, for a panel's title."""
        notes = []
        for axis, per_facet in self.fixed.items():
            if len({fmt_value(axis, v) for v in per_facet.values()}) > 1:
                short = {"shards": "shards", "batch_size": "batch", "max_gen_len": "len",
                         "power_cap_w": "cap"}.get(axis, axis)
                notes.append(f"{short} {fmt_value(axis, per_facet[key])}")
        return ", ".join(notes)


def _sorted_values(series: pd.Series) -> list[Any]:
    vals = series.dropna().unique().tolist()
    try:
        vals = sorted(vals)
    except TypeError:
        vals = sorted(vals, key=str)
    return vals + ([math.nan] if series.isna().any() else [])


def _pick(grp: pd.DataFrame, axis: str, free: list[str]) -> Any:
    """The value of ``axis`` to keep in one panel."""
    if axis == "power_cap_w" and grp[axis].isna().any():
        return math.nan
    best, best_cov = None, -1
    values = _sorted_values(grp[axis])
    if axis == "power_cap_w":
        values = values[::-1]  # ties: the highest cap, nearest the default limit
    for value in values:
        sub = grp[_same(grp[axis], value)]
        cov = len(sub[free].drop_duplicates()) if free else len(sub)
        if cov > best_cov:
            best, best_cov = value, cov
    return best


def thin_hues(values: list[Any], limit: int = MAX_HUES) -> list[Any]:
    """At most ``limit`` values, evenly spread, first and last kept."""
    if len(values) <= limit:
        return values
    idx = sorted({round(i * (len(values) - 1) / (limit - 1)) for i in range(limit)})
    return [values[i] for i in idx]


def hold_fixed(df: pd.DataFrame, facets: Sequence[str], x: str, hue: str | None) -> Held:
    """Keep, per facet, one value of every axis that is neither ``x``, ``hue`` nor a facet."""
    facets = [f for f in facets if f in df.columns]
    free = [c for c in (x, hue) if c]
    fixed_axes = [a for a in AXES if a in df.columns and a not in free and a not in facets]
    held = Held(df.iloc[0:0], facets,
                available={a: _sorted_values(df[a]) for a in fixed_axes})
    held.fixed = {a: {} for a in fixed_axes}
    parts = []
    groups = df.groupby(facets, sort=True, dropna=False) if facets else [((), df)]
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        for axis in fixed_axes:
            value = _pick(grp, axis, [c for c in free if c in grp.columns])
            held.fixed[axis][key] = value
            grp = grp[_same(grp[axis], value)]
        parts.append(grp)
    rows = pd.concat(parts) if parts else df.iloc[0:0]
    if hue and hue in rows.columns:
        values = _sorted_values(rows[hue])
        kept = thin_hues(values)
        held.hue_dropped = [fmt_value(hue, v) for v in values if v not in kept]
        if held.hue_dropped:
            rows = rows[rows[hue].isin(kept)]
    held.rows = rows
    return held


def points(rows: pd.DataFrame, keys: Sequence[str], y: str) -> pd.DataFrame:
    """Per ``keys``: mean, 95 % t-interval (low, high) and n of ``y``."""
    g = rows.groupby(list(keys), sort=True, dropna=False)[y]
    out = g.agg(["mean", "count"]).rename(columns={"count": "n"})
    ci = g.apply(lambda s: t_interval(s.to_numpy()))
    out["low"] = [c[0] for c in ci]
    out["high"] = [c[1] for c in ci]
    return out.reset_index()


def n_text(counts: Sequence[int] | np.ndarray) -> str:
    counts = [int(c) for c in counts]
    if not counts:
        return "n = 0"
    lo, hi = min(counts), max(counts)
    return f"n = {lo} repeats per point" if lo == hi else f"n = {lo}–{hi} repeats per point"
