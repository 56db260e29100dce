"""Matched comparisons: cells that differ in one axis only, as ratios with 95 % intervals.

For each axis of :data:`COMPARE_AXES` with two or more values among the ``ok``
cells, cells are grouped by every *other* matrix axis; within a group each value
is paired with the axis's baseline (engine ``reference``, the paper's; precision
``fp16``; no power cap, else the highest cap; else the smallest value or the first name).

The ratio of a pair is the ratio of the two cells' means over their ok repeats,
``R = mean(a) / mean(b)``. Its interval comes from the delta method on the log
scale: ``Var(log R) ≈ s_a² / (n_a·ā²) + s_b² / (n_b·b̄²)``, with a Student-t
quantile at the Welch–Satterthwaite degrees of freedom, and is
``R · exp(± t · sqrt(Var))`` (asymmetric, never negative). A pair with fewer than
two repeats on either side has no interval.

Over the k pairs of one axis value, the pooled ratio is the geometric mean of the
pair ratios; its interval uses ``Var = Σ Var_i / k²`` (the pairs are different
cells, so independent) with Welch–Satterthwaite degrees of freedom. It carries
the repeat-to-repeat uncertainty only: how much the ratio itself changes from one
configuration to the next is shown as the range of the pair ratios beside it.
See docs/paper-findings.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmenergy.analysis.aggregate import t_quantile_975
from llmenergy.analysis.figdata import AXES, AXIS_NAMES, fmt_value, sorted_values
from llmenergy.analysis.flags import HEADLINE_COLUMNS, row_flags

log = logging.getLogger(__name__)

COMPARE_AXES = ["engine", "precision", "dataset", "gpu", "shards", "power_cap_w", "batch_size"]
#: Ratios computed for each pair: J/token, tokens/s and energy per second (power).
RATIO_METRICS = ("j_per_token", "tokens_per_s", "avg_power_w")
METHOD_TEXT = ("ratio of the two cells' means over their ok repeats; 95 % interval by the delta "
               "method on the log ratio with a Welch–Satterthwaite Student-t quantile; pooled "
               "over pairs as a geometric mean (repeat-to-repeat uncertainty only; the range "
               "of the pair ratios shows how the ratio varies between configurations)")


@dataclass
class Ratio:
    """One ratio: value, 95 % interval (NaN when not computable) and its log variance parts."""

    value: float
    low: float
    high: float
    var_log: float = math.nan
    #: Σ v²/df over the parts of ``var_log`` (for Welch–Satterthwaite when pooled)
    welch_den: float = math.nan

    @property
    def has_interval(self) -> bool:
        """False for a ratio of single repeats (or any other without a computable interval)."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def text(self, digits: int = 2) -> str:
        """``0.47× (0.45–0.49)``, or ``0.47×`` without an interval."""
        if not math.isfinite(self.value):
            return "—"
        out = f"{self.value:.{digits}f}×"
        if self.has_interval:
            out += f" ({self.low:.{digits}f}–{self.high:.{digits}f})"
        return out


def _interval(log_r: float, var: float, den: float) -> tuple[float, float]:
    if not math.isfinite(var):
        return (math.nan, math.nan)
    if var == 0:
        return (math.exp(log_r), math.exp(log_r))
    df = var * var / den if den > 0 else math.inf
    t = float(t_quantile_975(np.array([min(df, 1e9)]))[0][0])
    half = t * math.sqrt(var)
    return (math.exp(log_r - half), math.exp(log_r + half))


def ratio(a: np.ndarray | pd.Series, b: np.ndarray | pd.Series) -> Ratio:
    """``mean(a) / mean(b)`` with its delta-method 95 % interval (see the module docstring)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0 or a.mean() <= 0 or b.mean() <= 0:
        return Ratio(math.nan, math.nan, math.nan)
    log_r = math.log(a.mean() / b.mean())
    if len(a) < 2 or len(b) < 2:
        return Ratio(math.exp(log_r), math.nan, math.nan)
    parts = [(x.var(ddof=1) / (len(x) * x.mean() ** 2), len(x) - 1) for x in (a, b)]
    var = sum(v for v, _ in parts)
    den = sum(v * v / df for v, df in parts)
    low, high = _interval(log_r, var, den)
    return Ratio(math.exp(log_r), low, high, var, den)


def pooled(ratios: list[Ratio]) -> Ratio:
    """Geometric mean of ``ratios`` with the interval of the mean log ratio."""
    good = [r for r in ratios if math.isfinite(r.value) and r.value > 0]
    if not good:
        return Ratio(math.nan, math.nan, math.nan)
    k = len(good)
    log_r = sum(math.log(r.value) for r in good) / k
    if any(not math.isfinite(r.var_log) for r in good):
        return Ratio(math.exp(log_r), math.nan, math.nan)
    var = sum(r.var_log for r in good) / k**2
    den = sum(r.welch_den for r in good) / k**4
    low, high = _interval(log_r, var, den)
    return Ratio(math.exp(log_r), low, high, var, den)


def baseline_of(axis: str, values: list[Any]) -> Any:
    """The value every other value of ``axis`` is compared with."""
    if axis == "engine" and "reference" in values:
        return "reference"
    if axis == "precision" and "fp16" in values:
        return "fp16"
    if axis == "power_cap_w":
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            return math.nan
        return max(values)
    return values[0]


def _same(series: pd.Series, value: Any) -> pd.Series:
    if isinstance(value, float) and math.isnan(value):
        return series.isna()
    return series == value


def value_text(axis: str, value: Any) -> str:
    """How a sentence names a value: ``engine compiled``, ``batch 64``, ``shards 4``, ``cap 175 W``."""
    v = fmt_value(axis, value)
    return {"batch_size": f"batch {v}", "shards": f"shards {v}",
            "power_cap_w": "no cap" if "uncapped" in v else f"cap {v}",
            "max_gen_len": f"max generation length {v}", "engine": f"engine {v}",
            "dataset": f"dataset {v}", "gpu": f"GPU {v}", "precision": f"precision {v}"}.get(axis, v)


def pairs(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per matched pair: axis, value, baseline, the shared values, cells, n, ratios."""
    ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    ok = ok.assign(_flag=row_flags(ok, HEADLINE_COLUMNS).ne("").to_numpy(bool))
    present = [a for a in AXES if a in ok.columns]
    rows: list[dict[str, Any]] = []
    for axis in [a for a in COMPARE_AXES if a in present]:
        values = sorted_values(ok[axis])
        if len(values) < 2:
            continue
        base = baseline_of(axis, values)
        others = [a for a in present if a != axis]
        for _, grp in ok.groupby(others, sort=True, dropna=False):
            b_rows = grp[_same(grp[axis], base)]
            if len(b_rows) == 0:
                continue
            for value in values:
                if fmt_value(axis, value) == fmt_value(axis, base):
                    continue
                a_rows = grp[_same(grp[axis], value)]
                if len(a_rows) == 0:
                    continue
                row: dict[str, Any] = {
                    "axis": axis, "value": fmt_value(axis, value),
                    "baseline": fmt_value(axis, base),
                    "value_text": value_text(axis, value), "baseline_text": value_text(axis, base),
                    "shared": ", ".join(f"{AXIS_NAMES.get(o, o).split(' (')[0]} "
                                        f"{fmt_value(o, grp[o].iloc[0]).replace(' (uncapped)', '')}"
                                        for o in others),
                    "cell": str(a_rows["cell_id"].iloc[0]),
                    "baseline_cell": str(b_rows["cell_id"].iloc[0]),
                    "n": int(len(a_rows)), "n_baseline": int(len(b_rows)),
                    "flagged": bool(a_rows["_flag"].any() or b_rows["_flag"].any()),
                }
                for metric in RATIO_METRICS:
                    if metric in grp.columns:
                        row[metric] = ratio(a_rows[metric], b_rows[metric])
                rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class AxisSummary:
    """The pooled ratios of one axis value against the baseline."""

    axis: str
    value: str
    baseline: str
    value_text: str
    baseline_text: str
    k: int
    ratios: dict[str, Ratio]
    ranges: dict[str, tuple[float, float]]
    n_flagged: int

    def sentence(self) -> str:
        """``compiled uses 0.47× (0.45–0.49) the energy per token of reference over 4 matched
        cell pairs (pairs: 0.44–0.50), at 2.1× (…) its throughput.``, and a sentence more when
        the energy ratio's interval contains 1× or there is none."""
        j, t = self.ratios.get("j_per_token"), self.ratios.get("tokens_per_s")
        unclear = ""
        pair_word = "pair" if self.k == 1 else "pairs"
        if j is not None and math.isfinite(j.value):
            out = (f"{upper(self.value_text)} uses {j.text()} the energy per token of "
                   f"{self.baseline_text} over {self.k} matched cell {pair_word}")
            lo, hi = self.ranges["j_per_token"]
            if self.k > 1:
                out += f" (pair ratios {lo:.2f}–{hi:.2f})"
            if j.has_interval and j.low <= 1.0 <= j.high:
                unclear = " No clear difference in energy per token: its 95% interval contains 1×."
            elif not j.has_interval:
                unclear = (" No interval (a pair without the repeats to measure its spread): more repeats "
                           "tell whether it differs.")
            if t is not None and math.isfinite(t.value):
                out += f", at {t.text()} its throughput (tokens/s)"
        elif t is not None and math.isfinite(t.value):
            out = (f"{upper(self.value_text)} runs at {t.text()} the throughput (tokens/s) of "
                   f"{self.baseline_text} over {self.k} matched cell {pair_word} (no energy data)")
        else:
            return ""
        if self.n_flagged:
            verb = "includes" if self.n_flagged == 1 else "include"
            out += f"; {self.n_flagged} of the pairs {verb} a flagged repeat"
        return out + "." + unclear


def upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def summarise(pair_rows: pd.DataFrame) -> list[AxisSummary]:
    """Per axis and value: the pooled ratio of every metric and the range of the pair ratios."""
    out: list[AxisSummary] = []
    if len(pair_rows) == 0:
        return out
    for (axis, value), grp in pair_rows.groupby(["axis", "value"], sort=False):
        ratios, ranges = {}, {}
        for metric in RATIO_METRICS:
            if metric not in grp.columns:
                continue
            rs = [r for r in grp[metric] if isinstance(r, Ratio) and math.isfinite(r.value)]
            if rs:
                ratios[metric] = pooled(rs)
                ranges[metric] = (min(r.value for r in rs), max(r.value for r in rs))
        first = grp.iloc[0]
        out.append(AxisSummary(str(axis), str(value), str(first["baseline"]),
                               str(first["value_text"]), str(first["baseline_text"]), len(grp),
                               ratios, ranges, int(grp["flagged"].sum())))
    order = {a: i for i, a in enumerate(COMPARE_AXES)}
    return sorted(out, key=lambda s: order.get(s.axis, 99))


def pair_records(pair_rows: pd.DataFrame) -> list[dict[str, Any]]:
    """The pairs as template rows (ratios as text)."""
    out = []
    for rec in pair_rows.to_dict("records"):
        for metric in RATIO_METRICS:
            r = rec.get(metric)
            rec[metric] = r.text() if isinstance(r, Ratio) else "—"
        rec["axis_name"] = AXIS_NAMES.get(rec["axis"], rec["axis"])
        out.append(rec)
    return out


def summary_records(sums: list[AxisSummary]) -> list[dict[str, Any]]:
    out = []
    for s in sums:
        rec = asdict(s)
        rec["axis_name"] = AXIS_NAMES.get(s.axis, s.axis)
        for metric in RATIO_METRICS:
            r = s.ratios.get(metric)
            rec[metric] = r.text() if r is not None else "—"
            lo_hi = s.ranges.get(metric)
            rec[f"{metric}_range"] = f"{lo_hi[0]:.2f}–{lo_hi[1]:.2f}" if lo_hi else "—"
        rec["sentence"] = s.sentence()
        out.append(rec)
    return out
