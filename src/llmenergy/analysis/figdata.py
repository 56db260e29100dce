"""The data side of the figures: which rows a figure shows and how its caption says so.

A figure plots one metric against one matrix axis (``x``), one line per value of
a second (``hue``), one panel per value combination of the facets (model, GPU
type) and of every other axis that varies (:func:`layout`), so no point mixes
cells and every measured cell is drawn; an axis with one value is named in the
caption. Past :data:`MAX_PANELS` panels an axis is held fixed (the uncapped
power limit when there is one, else the value that covers the most x × hue
points) and the caption says so. Each
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
from llmenergy.analysis.flags import DERIVED_FROM, by_kind, reason_clauses, row_flags
from llmenergy.arch import ENGINES, PRECISIONS

log = logging.getLogger(__name__)

#: The axes of the matrix, in the order captions name them.
AXES = ["model", "dataset", "gpu", "shards", "batch_size", "max_gen_len", "power_cap_w", "engine",
        "precision"]
CONFIG_KEYS = [a for a in AXES if a != "power_cap_w"]
MAX_HUES = 8
MAX_PANELS = 24
#: The axis a figure draws one line per value of, when its own hue has one value.
HUE_ORDER = ["engine", "precision", "dataset", "shards", "batch_size", "power_cap_w", "max_gen_len", "gpu"]
#: Past MAX_PANELS, the axes held fixed first.
HOLD_FIRST = ["max_gen_len", "dataset", "power_cap_w", "shards", "batch_size", "engine", "precision"]
SHORT_NAMES = {"shards": "shards", "batch_size": "batch", "max_gen_len": "len",
               "power_cap_w": "cap", "engine": "engine", "precision": "precision"}
AXIS_NAMES = {
    "model": "model", "dataset": "dataset", "gpu": "GPU type", "shards": "shards (GPUs)",
    "batch_size": "batch size", "max_gen_len": "max generation length (tokens)",
    "power_cap_w": "power cap", "engine": "engine", "precision": "precision (weights)",
}
CI_TEXT = "95 % Student-t interval over the cell's ok repeats (as in the table)"


class FigureSkipped(Exception):
    """No data for a figure; the message says why."""


def ok_rows(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """The ``ok`` rows with every column of ``cols`` present; ``_flagged`` marks the rows
    :func:`llmenergy.analysis.flags.row_flags` flags for these columns (drawn hollow)."""
    df = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise FigureSkipped(f"summary has no column(s) {', '.join(missing)}")
    df = df.dropna(subset=list(cols))
    return df.assign(_flagged=row_flags(df, cols).ne("").to_numpy(bool))



def null_reason(summary: pd.DataFrame, column: str) -> str | None:
    """Why ``column`` is null in the ``ok`` rows that lack it, from their ``energy_reason``:
    the clauses naming it, those that differ only in their numbers given once with the
    count of repeats that say so (at most two kinds, then a count), or None when none says."""
    df = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    if column not in df.columns or "energy_reason" not in df.columns:
        return None
    kinds = by_kind((None, clause) for text in df.loc[df[column].isna(), "energy_reason"]
                    for col, clause in reason_clauses(text) if col == column)
    if not kinds and column in DERIVED_FROM:  # e.g. active energy needs the idle power
        why = null_reason(summary[summary[column].isna()], DERIVED_FROM[column])
        return f"{column} null where {why}" if why else None
    if not kinds:
        return None
    parts = []
    for said in list(kinds.values())[:2]:
        numbers = "; the numbers are the first's" if len({c for _, c in said}) > 1 else ""
        parts.append(said[0][1] + (f" ({len(said)} repeats{numbers})" if len(said) > 1 else ""))
    more = f" (and {len(kinds) - 2} more)" if len(kinds) > 2 else ""
    return "; ".join(parts) + more


def below_resolution(summary: pd.DataFrame, column: str) -> bool:
    """Whether some ok row's ``column`` is null because its windows are below the sensor's
    resolution (the ``energy_reason`` clause says "sensor update periods")."""
    why = null_reason(summary, column)
    return why is not None and "sensor update periods" in why


def energy_rows(summary: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """Like :func:`ok_rows`, skipping with the reason when no ok row has the energy columns:
    no sensor (the power source named), else the ``energy_reason`` of the null column."""
    df = ok_rows(summary, *cols)
    if len(df) == 0:
        ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
        src = sorted({str(s) for s in ok.get("power_source", pd.Series(dtype=str)).dropna()})
        if not src or src == ["none"]:
            raise FigureSkipped("no energy data: no power sensor (power source: none), so the "
                                "energy columns are empty")
        empty = [c for c in cols if ok[c].isna().all()] or [c for c in cols if ok[c].isna().any()]
        whys = [null_reason(summary, c) or f"{c} null in every ok repeat" for c in empty]
        raise FigureSkipped("no ok repeat has every value this figure needs (power source: "
                            + ", ".join(src) + "); " + "; ".join(whys or ["no ok repeat"]))
    return df


def matched(df: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, str]:
    """The rows of the settings measured at two or more values of ``axis`` with every other
    axis equal (what a comparison of ``axis`` can set side by side), and a caption sentence
    naming the cells left out ("" when none is). Skips when no setting has two values."""
    others = [a for a in AXES if a in df.columns and a != axis]
    if others:
        n = df.groupby(others, dropna=False)[axis].transform("nunique")
    else:
        n = pd.Series(df[axis].nunique(), index=df.index)
    keep = (n >= 2).to_numpy()
    name = AXIS_NAMES.get(axis, axis)
    if not keep.any():
        raise FigureSkipped(f"no setting was measured with two values of {name}, every other "
                            "axis equal: nothing to compare (each cell is in the other figures)")
    left = df.loc[~keep, "cell_id"].nunique() if "cell_id" in df.columns else int((~keep).sum())
    text = (f"Left out: {left} cell(s) whose setting was measured with one {name} only (each is "
            "in the other figures)." if left else "")
    return df[keep], text


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


#: Characters per line of a panel title (the settings that tell panels apart).
TITLE_WIDTH = 34
#: Axes whose values have an order of their own (legends, panels, tables): the paper's
#: engine first, then ours; precisions from the widest weights to the narrowest.
VALUE_ORDER: dict[str, tuple[str, ...]] = {"engine": ENGINES, "precision": PRECISIONS}


def sorted_values(series: pd.Series) -> list[Any]:
    """The distinct values of an axis column in order (numbers ascending, :data:`VALUE_ORDER`
    for the axes named there, else by name), a null last."""
    vals = series.dropna().unique().tolist()
    order = VALUE_ORDER.get(str(series.name))
    if order is not None:
        vals = sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), str(v)))
    else:
        try:
            vals = sorted(vals)
        except TypeError:
            vals = sorted(vals, key=str)
    return vals + ([math.nan] if series.isna().any() else [])


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def varying(df: pd.DataFrame, axes: Sequence[str] = AXES) -> list[str]:
    """The axes of ``axes`` with two or more values in ``df`` (no cap counts as a value)."""
    return [a for a in axes if a in df.columns and len(sorted_values(df[a])) >= 2]


def _pick(grp: pd.DataFrame, axis: str, free: list[str]) -> Any:
    """The value of ``axis`` to keep in one panel when there are too many panels."""
    if axis == "power_cap_w" and grp[axis].isna().any():
        return math.nan
    best, best_cov = None, -1
    values = sorted_values(grp[axis])
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


def short_value(axis: str, value: Any) -> str:
    """A panel-title form: ``batch 16``, ``cap 250 W``, ``alpaca``."""
    text = fmt_value(axis, value).replace(" (uncapped)", "")
    prefix = SHORT_NAMES.get(axis, "")
    return f"{prefix} {text}" if prefix else text


@dataclass
class Layout:
    """Which rows a figure draws, in which panel and line, and what its caption says of the rest.

    Every axis with two or more values is the x axis, the hue (one line per value) or
    a panel axis (one panel per value combination), so no point mixes cells and no
    cell is left out; an axis with one value is named in the caption. Only past
    ``MAX_PANELS`` panels is an axis held fixed (the caption then says at which value).
    """

    rows: pd.DataFrame
    x: str
    hue: str | None
    panel_axes: list[str]
    constant: dict[str, Any] = field(default_factory=dict)
    #: axis -> {panel key -> the value kept}, only for axes held fixed past MAX_PANELS
    fixed: dict[str, dict[tuple, Any]] = field(default_factory=dict)
    available: dict[str, list[Any]] = field(default_factory=dict)
    hue_dropped: list[Any] = field(default_factory=list)

    def panels(self) -> list[tuple[tuple, pd.DataFrame]]:
        if not self.panel_axes:
            return [((), self.rows)]
        groups = self.rows.groupby(self.panel_axes, sort=True, dropna=False)
        out = [((k if isinstance(k, tuple) else (k,)), g) for k, g in groups]
        # no cap (NaN) first: the default setting leads, as in the tables; then each axis's
        # own order (sorted_values: engines and precisions as in the legends)
        rank = {a: {v: i for i, v in enumerate(sorted_values(self.rows[a])) if not _is_nan(v)}
                for a in self.panel_axes}
        return sorted(out, key=lambda kg: tuple((0, 0) if _is_nan(v) else (1, rank[a].get(v, len(rank[a])))
                                                for a, v in zip(self.panel_axes, kg[0], strict=True)))

    def ncols(self, n_panels: int) -> int:
        """Columns of the panel grid: one per value of the last panel axis when that makes
        a grid of 2–4 columns, else up to 4."""
        if n_panels > 4 and self.panel_axes:
            last = len(sorted_values(self.rows[self.panel_axes[-1]]))
            if 2 <= last <= 4:
                return last
        return max(1, min(n_panels, 4))

    def panel_title(self, key: tuple) -> str:
        named = dict(zip(self.panel_axes, key, strict=True))
        first = [str(named.get(a, self.constant.get(a))) for a in ("model", "gpu")
                 if a in named or a in self.constant]
        rest = [short_value(a, v) for a, v in named.items() if a not in ("model", "gpu")]
        rest += [short_value(a, per[key]) for a, per in self.fixed.items()
                 if len({fmt_value(a, v) for v in per.values()}) > 1]
        lines = [" · ".join(first)] if first else []
        for item in rest:  # lines of at most TITLE_WIDTH characters: a 4-panel row's titles must not overlap
            if len(lines) > (1 if first else 0) and len(lines[-1]) + 2 + len(item) <= TITLE_WIDTH:
                lines[-1] += ", " + item
            else:
                lines.append(item)
        return "\n".join(lines) or "all cells"

    def caption(self) -> str:
        """``Constant: dataset = alpaca; engine = reference.`` and any axis held fixed."""
        out = []
        if self.constant:
            out.append("Same in every cell: " + "; ".join(
                f"{AXIS_NAMES.get(a, a)} = {fmt_value(a, v)}" for a, v in self.constant.items())
                + ".")
        parts = []
        for axis, per_panel in self.fixed.items():
            values = sorted({fmt_value(axis, v) for v in per_panel.values()})
            measured = ", ".join(fmt_value(axis, v).replace(" (uncapped)", "")
                                 for v in self.available.get(axis, []))
            parts.append(f"{AXIS_NAMES.get(axis, axis)} = {' / '.join(values)} "
                         f"(measured: {measured})")
        if parts:
            out.append(f"Held fixed, to keep at most {MAX_PANELS} panels: " + "; ".join(parts)
                       + ".")
        if self.hue_dropped:
            out.append("Not shown, to keep lines apart: " + ", ".join(map(str, self.hue_dropped))
                       + ".")
        return " ".join(out)


def layout(df: pd.DataFrame, x: str, hue: str | None, facets: Sequence[str] = ("model", "gpu"),
           *, hue_fixed: bool = False, max_panels: int = MAX_PANELS) -> Layout:
    """Lay out ``df``: ``x``, a hue (``hue`` if it varies, else the first varying axis of
    :data:`HUE_ORDER`; always ``hue`` with ``hue_fixed``) and a panel per value combination
    of ``facets`` and every other varying axis."""
    present = [a for a in AXES if a in df.columns]
    var = varying(df, present)
    if not hue_fixed and (hue not in var or hue == x):
        hue = next((a for a in HUE_ORDER if a in var and a != x and a not in facets), None)
    panel_axes = [f for f in facets if f in var and f not in (x, hue)]
    panel_axes += [a for a in present if a in var and a not in (x, hue) and a not in panel_axes]
    constant = {a: sorted_values(df[a])[0] for a in present
                if a not in var and a not in (x, hue) and len(df)}
    out = Layout(df, x, hue, panel_axes, constant)
    held = []
    for axis in HOLD_FIRST:
        if not panel_axes or len(df[panel_axes].drop_duplicates()) <= max_panels:
            break
        if axis in panel_axes and axis not in facets:
            panel_axes.remove(axis)
            held.append(axis)
    if held:
        free = [c for c in (x, hue) if c]
        out.available = {a: sorted_values(df[a]) for a in held}
        out.fixed = {a: {} for a in held}
        parts = []
        groups = df.groupby(panel_axes, sort=True, dropna=False) if panel_axes else [((), df)]
        for key, grp in groups:
            key = key if isinstance(key, tuple) else (key,)
            for axis in held:
                value = _pick(grp, axis, free)
                out.fixed[axis][key] = value
                grp = grp[_same(grp[axis], value)]
            parts.append(grp)
        out.rows = pd.concat(parts)
    if hue and hue in out.rows.columns:
        values = sorted_values(out.rows[hue])
        kept = thin_hues(values)
        out.hue_dropped = [fmt_value(hue, v) for v in values if v not in kept]
        if out.hue_dropped:
            out.rows = out.rows[out.rows[hue].isin(kept)]  # isin matches NaN (no cap)
    return out


@dataclass
class FigureData:
    """What a drawn figure shows: the cells behind its points and, for some, a key table."""

    cells: list[str]
    flagged: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


def attach(fig: Any, rows: pd.DataFrame, table: list[dict[str, Any]] | None = None) -> None:
    """Record on ``fig`` the cells whose rows it draws (read back with :func:`figure_data`)."""
    cells = sorted({str(c) for c in rows["cell_id"].dropna()}) if "cell_id" in rows else []
    flagged = []
    if "_flagged" in rows.columns:
        flagged = sorted({str(c) for c in rows.loc[rows["_flagged"], "cell_id"]})
    fig.llmenergy_data = FigureData(cells, flagged, table or [])


def figure_data(fig: Any) -> FigureData:
    """The :class:`FigureData` a builder attached (empty when none)."""
    return getattr(fig, "llmenergy_data", FigureData([]))

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
    if lo == hi:
        return f"n = {lo} repeat{'' if lo == 1 else 's'} per point"
    return f"n = {lo}–{hi} repeats per point"
