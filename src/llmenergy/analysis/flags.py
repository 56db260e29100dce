"""Why a repeat's numbers deserve a second look: the flags the figures and tables show.

A repeat (one row of the summary) is *flagged* when any of these hold; each gives
a short reason:

- ``short_window``: the measured window is under 5 s (the counter ticks every ~100 ms);
- ``energy_discrepancy_pct`` beyond ±1 %: the energy counter and the integral of
  instant power disagree;
- ``power_out_of_range``: some event fell outside the power samples (its energy is null);
- null ``energy_j`` on a row whose power source is a sensor (not ``none``);
- any column named ``*_flag`` that is true or non-empty text, and a ``flags`` text
  column (``;``-separated reasons) when the summary has one.

Columns are read defensively: a summary without one of them simply has no such flag.
Figures draw a point hollow when any repeat behind it is flagged; tables mark the
cell and link to the flagged-repeats table.
"""
from __future__ import annotations

import logging
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

DISCREPANCY_LIMIT_PCT = 1.0


def _truthy(series: pd.Series) -> pd.Series:
    """True for True / non-zero / non-empty text; False for null, False, 0 and ''."""
    if series.dtype == bool:
        return series
    if pd.api.types.is_numeric_dtype(series):
        return series.fillna(0).astype(float) != 0
    text = series.astype("string").fillna("").str.strip()
    return ~text.str.lower().isin(["", "false", "0", "none", "nan"])


def row_flags(df: pd.DataFrame) -> pd.Series:
    """Per row: the reasons it is flagged, joined by ``; `` (empty text when clean)."""
    reasons = pd.Series([""] * len(df), index=df.index, dtype=object)

    def add(mask: pd.Series, text: Any) -> None:
        for i in mask[mask].index:
            part = text(i) if callable(text) else text
            reasons.at[i] = f"{reasons.at[i]}; {part}" if reasons.at[i] else part

    if "short_window" in df.columns:
        dur = df["duration_s"] if "duration_s" in df.columns else None
        add(_truthy(df["short_window"]),
            lambda i: "short window" + (f" ({dur.at[i]:.2g} s < 5 s)"
                                        if dur is not None and pd.notna(dur.at[i]) else ""))
    if "energy_discrepancy_pct" in df.columns:
        pct = pd.to_numeric(df["energy_discrepancy_pct"], errors="coerce")
        add(pct.abs() > DISCREPANCY_LIMIT_PCT,
            lambda i: f"counter vs instant power differ by {pct.at[i]:+.1f} %")
    if "power_out_of_range" in df.columns:
        add(_truthy(df["power_out_of_range"]), "events outside the power samples")
    if "energy_j" in df.columns and "power_source" in df.columns:
        sensor = ~df["power_source"].fillna("none").astype(str).isin(["none", ""])
        ok = df["status"] == "ok" if "status" in df.columns else sensor
        add(sensor & ok & df["energy_j"].isna(), "null energy")
    for col in df.columns:
        if col.endswith("_flag"):
            add(_truthy(df[col]), lambda i, c=col: f"{c[:-5].replace('_', ' ')}: {df.at[i, c]}"
                if not isinstance(df.at[i, c], (bool, int, float)) else c[:-5].replace("_", " "))
    if "flags" in df.columns:
        add(_truthy(df["flags"]), lambda i: str(df.at[i, "flags"]))
    return reasons


def flagged_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` rows that carry a flag, with a ``flag_reasons`` column."""
    ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    reasons = row_flags(ok)
    out = ok[reasons != ""].assign(flag_reasons=reasons[reasons != ""])
    return out


def cell_flags(summary: pd.DataFrame) -> dict[str, str]:
    """cell_id → the distinct reasons of its flagged ok repeats, with the repeats named."""
    rows = flagged_rows(summary)
    out: dict[str, str] = {}
    for cid, grp in rows.groupby("cell_id", sort=True):
        parts = []
        for _, r in grp.iterrows():
            rep = r.get("repeat")
            label = f"repeat {int(rep)}" if pd.notna(rep) else "a repeat"
            parts.append(f"{label}: {r['flag_reasons']}")
        out[str(cid)] = " | ".join(parts)
    return out
