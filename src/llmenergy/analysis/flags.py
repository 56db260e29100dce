"""Why a repeat's numbers deserve a second look: the flags the figures and tables show.

A repeat (one row of the summary) is *flagged* when any of these hold; each gives
a short reason:

- ``short_window``: the measured window is under 5 s (the counter ticks every ~100 ms);
- ``energy_discrepancy_pct`` beyond ±1 %: the energy counter and the integral of
  instant power disagree;
- ``power_out_of_range``: some event fell outside the power samples (its energy is null);
- ``energy_reason``: each of its clauses is a reason: ``<column> null: why``, one per withheld
  energy column (e.g. a prefill below the sensor's resolution), and the notes on numbers kept
  but flagged (``<column> interpolated across a gap ...``, ``<column> shared: ...``, a node's
  clock offset);
- ``energy_complete`` False: a GPU the ranks used was not metered over the whole window;
- null ``energy_j`` on a row whose power source is a sensor (not ``none``);
- any column named ``*_flag`` that is true or non-empty text, and a ``flags`` text
  column (``;``-separated reasons) when the summary has one.

Columns are read defensively: a summary without one of them simply has no such flag.
Figures draw a point hollow when any repeat behind it is flagged; a clause about a
phase column (``prefill_energy_j``, the balance's parts, ...) hollows only the figures
that draw that column (:func:`row_flags` with ``columns``). Tables mark the cell and
link to the flagged-repeats table; a headline number (J/token, tokens/s, a ratio of them)
is marked only for the reasons that concern it (:data:`HEADLINE_COLUMNS`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

DISCREPANCY_LIMIT_PCT = 1.0
#: Columns of ``energy_reason`` clauses that leave a repeat's total energy intact: a figure
#: that does not draw them is not affected (its points stay filled).
PHASE_COLUMNS = ("prefill_energy_j", "decode_energy_j", "idle_power_w", "active_energy_j",
                 "compile_j", "cpu_energy_j", "prefill_only_energy_j", "prefill_j_per_token_in")
#: What the report's headline numbers read (the short answer, best cells, ratios, J/token
#: columns): a phase clause alone does not mark them, as it does not hollow such a figure.
HEADLINE_COLUMNS = ("energy_j", "j_per_token", "tokens_per_s", "avg_power_w", "j_per_word",
                    "j_per_response")
#: A column computed from another: null because that one is, flagged when that one is.
DERIVED_FROM = {"active_energy_j": "idle_power_w", "prefill_j_per_token_in": "prefill_only_energy_j"}


#: A number or a range of them (``0.003-0.004``: one window's ``0.003`` is the same kind); not the 8 of int8.
_NUMBER = re.compile(r"(?<![A-Za-z_])[+-]?\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?")


def _truthy(series: pd.Series) -> pd.Series:
    """True for True / non-zero / non-empty text; False for null, False, 0 and ''."""
    if series.dtype == bool:
        return series
    if pd.api.types.is_numeric_dtype(series):
        return series.fillna(0).astype(float) != 0
    text = series.astype("string").fillna("").str.strip()
    return ~text.str.lower().isin(["", "false", "0", "none", "nan"])


#: A clause about one column: ``<column> null: why`` (withheld), ``<column> interpolated ...`` or
#: ``<column> shared: ...`` (kept, flagged).
_CLAUSE_HEAD = re.compile(r"^([A-Za-z0-9_]+) (?:null:|interpolated |shared:)")


#: What separates the clauses of ``energy_reason``; a clause never holds it.
CLAUSE_SEP = "; "


def join_clauses(clauses: Iterable[str]) -> str | None:
    """``energy_reason`` from its clauses (None when there are none). A clause holding
    :data:`CLAUSE_SEP` would be read back as two, the second about no column (flagging every
    figure): a bug in whoever wrote it, logged as an error; the separator in it becomes ``, ``
    rather than cost the cell its measured numbers."""
    out = []
    for clause in clauses:
        if CLAUSE_SEP in clause:
            log.error("an energy_reason clause holds %r (a bug: it is written with ', '): %s", CLAUSE_SEP, clause)
            clause = clause.replace(CLAUSE_SEP, ", ")
        out.append(clause)
    return CLAUSE_SEP.join(out) or None


#: How clauses written by earlier versions went on after a ``; `` inside them: such a piece is
#: the end of the clause before it, not a clause of its own.
_LEGACY_TAILS = ("its power timestamps were corrected)", "up to ~4 % off", "no energy counter)")


def reason_clauses(text: Any) -> list[tuple[str | None, str]]:
    """``energy_reason`` split into ``(column, clause)``; column is None when none is named."""
    if text is None or (isinstance(text, float) and pd.isna(text)) or not str(text).strip():
        return []
    out: list[tuple[str | None, str]] = []
    for clause in str(text).split(CLAUSE_SEP):
        clause = clause.strip()
        if clause and out and clause.startswith(_LEGACY_TAILS):
            column, before = out.pop()
            out.append((column, f"{before}, {clause}"))
        elif clause:
            head = _CLAUSE_HEAD.match(clause)
            out.append((head.group(1) if head else None, clause))
    return out


def clause_kind(clause: str) -> str:
    """A reason clause with its numbers masked (``#``): clauses that differ only in their
    numbers (each repeat's window lengths, discrepancy, ...) are one kind."""
    return _NUMBER.sub("#", clause)


def by_kind(said: Iterable[tuple[Any, str]]) -> dict[str, list[tuple[Any, str]]]:
    """``(who, clause)`` pairs grouped by :func:`clause_kind`, in the order first seen."""
    kinds: dict[str, list[tuple[Any, str]]] = {}
    for who, clause in said:
        kinds.setdefault(clause_kind(clause), []).append((who, clause))
    return kinds


def flag_kinds(flagged: pd.DataFrame) -> list[dict[str, Any]]:
    """The kinds of reason among :func:`flagged_rows` (``flag_reasons``), most repeats first:
    the first clause of each kind as written, and how many repeats and cells say it."""
    kinds = by_kind((cell, clause) for cell, text in zip(flagged["cell_id"], flagged["flag_reasons"], strict=True)
                    for clause in dict.fromkeys(str(text).split("; ")))
    out = [{"example": said[0][1], "repeats": len(said), "cells": len({c for c, _ in said})}
           for said in kinds.values()]
    return sorted(out, key=lambda k: -k["repeats"])


def _phase_only(column: str | None) -> bool:
    return column is not None and (column in PHASE_COLUMNS or column.startswith("balance_"))


def row_flags(df: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.Series:
    """Per row: the reasons it is flagged, joined by ``; `` (empty text when clean).

    ``columns``: the columns a figure draws; an ``energy_reason`` clause about a phase
    column (:data:`PHASE_COLUMNS`, ``balance_*``) then counts only if it is one of them or
    one they are computed from (:data:`DERIVED_FROM`).
    Without ``columns`` (the tables) every clause counts.
    """
    drawn = None if columns is None else set(columns)
    drawn = None if drawn is None else drawn | {DERIVED_FROM[c] for c in drawn if c in DERIVED_FROM}
    reasons: dict[Any, list[str]] = {i: [] for i in df.index}

    def add(mask: pd.Series, text: Any) -> None:
        for i in mask[mask].index:
            reasons[i].append(text(i) if callable(text) else text)

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
    said_energy: set[Any] = set()  # rows whose energy_reason already explains a null energy_j
    if "energy_reason" in df.columns:
        for i, text in df["energy_reason"].items():
            for column, clause in reason_clauses(text):
                if drawn is not None and _phase_only(column) and column not in drawn:
                    continue
                reasons[i].append(clause)
                said_energy |= {i} if column == "energy_j" and " null:" in clause else set()
    if "energy_complete" in df.columns:
        incomplete = df["energy_complete"].astype("boolean").eq(False).fillna(False).astype(bool)
        add(incomplete & ~df.index.isin(list(said_energy)),
            "energy incomplete: a GPU of the cell was not metered over the whole window")
        said_energy |= set(incomplete[incomplete].index)
    if "energy_j" in df.columns and "power_source" in df.columns:
        sensor = ~df["power_source"].fillna("none").astype(str).isin(["none", ""])
        ok = df["status"] == "ok" if "status" in df.columns else sensor
        add(sensor & ok & df["energy_j"].isna() & ~df.index.isin(list(said_energy)), "null energy")
    for col in df.columns:
        if col.endswith("_flag"):
            add(_truthy(df[col]), lambda i, c=col: f"{c[:-5].replace('_', ' ')}: {df.at[i, c]}"
                if not isinstance(df.at[i, c], (bool, int, float)) else c[:-5].replace("_", " "))
    if "flags" in df.columns:
        add(_truthy(df["flags"]), lambda i: str(df.at[i, "flags"]))
    return pd.Series(["; ".join(reasons[i]) for i in df.index], index=df.index, dtype=object)


def flagged_rows(summary: pd.DataFrame, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """The ``ok`` rows that carry a flag, with a ``flag_reasons`` column (``columns``: as
    :func:`row_flags`)."""
    ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    reasons = row_flags(ok, columns)
    out = ok[reasons != ""].assign(flag_reasons=reasons[reasons != ""])
    return out


def _repeat_label(reps: list[Any]) -> str:
    known = [int(r) for r in reps if pd.notna(r)]
    if not known:
        return "a repeat" if len(reps) == 1 else f"{len(reps)} repeats"
    return ("repeat " if len(known) == 1 else "repeats ") + ", ".join(map(str, known))


def cell_flags(summary: pd.DataFrame, columns: Iterable[str] | None = None) -> dict[str, str]:
    """cell_id → the distinct reasons of its flagged ok repeats, with the repeats named
    (repeats with the same reasons share one entry); ``columns``: only the reasons that
    concern them (:data:`HEADLINE_COLUMNS` for the numbers a report's headline reads)."""
    rows = flagged_rows(summary, columns)
    out: dict[str, str] = {}
    for cid, grp in rows.groupby("cell_id", sort=True):
        by_reason: dict[str, list[Any]] = {}
        for _, r in grp.iterrows():
            by_reason.setdefault(str(r["flag_reasons"]), []).append(r.get("repeat"))
        out[str(cid)] = " | ".join(f"{_repeat_label(reps)}: {text}"
                                   for text, reps in by_reason.items())
    return out
