"""What the report states in words: the short answer at the top and the paper's findings
checked on this campaign's data.

The short answer, per model × GPU type: the cell with the lowest mean J/token
(its engine, batch size and power cap, and any other axis that varies), and by
how much it beats the paper's setting (engine ``reference``, no power cap): the
ratio against the reference cell with every other axis the same, when measured,
and against the best reference cell. Ratios and intervals are those of
:mod:`llmenergy.analysis.compare`.

The paper's qualitative findings are listed, with their section of the paper, in
docs/paper-findings.md; each is marked *holds*, *does not hold*, *undecided* or
*not measured* here, with the numbers it rests on. A finding holds when the pooled
ratio's 95 % interval lies wholly on the side the paper reports for every value,
and does not hold when one lies wholly on the other side; otherwise (an interval
that contains 1, or a ratio of single repeats, which has none) the data do not
decide it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llmenergy.analysis.compare import AxisSummary, Ratio, ratio
from llmenergy.analysis.figdata import AXIS_NAMES, fmt_value, t_interval

log = logging.getLogger(__name__)

PAPER_ENGINE = "reference"
PAPER_PRECISION = "fp16"  # the paper ran fp16 weights
HOLDS, FAILS, UNDECIDED, NOT_MEASURED = "holds", "does not hold", "undecided", "not measured"


@dataclass
class PaperFinding:
    key: str
    text: str
    section: str
    status: str = NOT_MEASURED
    evidence: str = ""


def _side(r: Ratio, above: bool) -> bool | None:
    """True when the interval lies wholly above (or below) 1, False when it lies wholly on
    the other side; None when it contains 1 or there is none."""
    if not r.has_interval:
        return None
    if r.low > 1:
        return above
    if r.high < 1:
        return not above
    return None


def _ratio_check(sums: list[AxisSummary], axis: str, metric: str, above: bool,
                 what: str, select: Callable[[AxisSummary], bool] = lambda s: True
                 ) -> tuple[str, str]:
    found = [s for s in sums if s.axis == axis and metric in s.ratios and select(s)]
    if not found:
        return NOT_MEASURED, f"no matched pair of cells differing only in {AXIS_NAMES[axis]}"
    parts, verdicts, unbounded = [], [], 0
    for s in found:
        r = s.ratios[metric]
        side = _side(r, above)
        verdicts.append(side)
        unbounded += not r.has_interval
        note = "" if r.has_interval else " (no interval: fewer than 2 repeats)"
        parts.append(f"{s.value_text} vs {s.baseline_text}: {what} {r.text()} over {s.k} "
                     f"pair{'s' if s.k > 1 else ''}{note}")
    side_word = "above" if above else "below"
    if any(v is False for v in verdicts):
        status = FAILS
        parts.append(f"an interval lies wholly on the other side of 1 (the paper: {side_word})")
    elif all(v is True for v in verdicts):
        status = HOLDS
    else:
        status = UNDECIDED
        why = ("single repeats give no interval: 2 or more a cell can decide it" if unbounded
               else "an interval contains 1: more repeats narrow it")
        parts.append(f"not every interval lies wholly {side_word} 1 ({why})")
    return status, "; ".join(parts)


def paper_findings(sums: list[AxisSummary], summary: pd.DataFrame) -> list[PaperFinding]:
    """The findings of docs/paper-findings.md, each checked on ``summary``."""
    out = [
        PaperFinding("j_per_token_batch", "Energy per output token falls as the batch size grows.",
                     "§IV-B"),
        PaperFinding("power_shards", "Energy per second (power) rises with the number of shards, "
                     "even at the same batch size.", "§IV-B"),
        PaperFinding("power_batch", "Energy per second (power) rises with the batch size.", "§IV-B"),
        PaperFinding("a100_faster", "A100 is faster than V100 (about 1.25–2× for the smaller "
                     "models).", "§IV-A"),
        PaperFinding("cap_saves", "A lower power cap saves energy at a small cost in time "
                     "(250→175 W: −23.2 % energy, +6.7 % time).", "§IV-C"),
        PaperFinding("utilisation", "GPU utilisation is high (94–98 %) while memory utilisation "
                     "is low (23–27 %).", "§V"),
    ]
    by_key = {f.key: f for f in out}
    by_key["j_per_token_batch"].status, by_key["j_per_token_batch"].evidence = _ratio_check(
        sums, "batch_size", "j_per_token", False, "J/token")
    by_key["power_shards"].status, by_key["power_shards"].evidence = _ratio_check(
        sums, "shards", "avg_power_w", True, "power")
    by_key["power_batch"].status, by_key["power_batch"].evidence = _ratio_check(
        sums, "batch_size", "avg_power_w", True, "power")
    f = by_key["a100_faster"]
    gpus = {str(g) for g in summary.get("gpu", pd.Series(dtype=str)).dropna()}
    a100, v100 = [g for g in gpus if "A100" in g.upper()], [g for g in gpus if "V100" in g.upper()]
    if a100 and v100:
        f.status, f.evidence = _ratio_check(
            sums, "gpu", "tokens_per_s", True, "tokens/s",
            lambda s: "A100" in s.value.upper() and "V100" in s.baseline.upper())
        if f.status == NOT_MEASURED:  # the baseline is the first name: A100 against V100 reversed
            f.status, f.evidence = _ratio_check(
                sums, "gpu", "tokens_per_s", False, "tokens/s (V100 against A100)",
                lambda s: "V100" in s.value.upper() and "A100" in s.baseline.upper())
    else:
        f.evidence = "needs cells on both A100 and V100 (measured: " + (", ".join(sorted(gpus))
                                                                         or "none") + ")"
    f = by_key["cap_saves"]
    f.status, f.evidence = _ratio_check(
        sums, "power_cap_w", "j_per_token", False, "J/token",
        lambda s: s.value != "default (uncapped)")
    f = by_key["utilisation"]
    ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    if {"gpu_util_pct", "mem_util_pct"} <= set(ok.columns) and ok["gpu_util_pct"].notna().any() \
            and ok["mem_util_pct"].notna().any():
        gu, mu = float(ok["gpu_util_pct"].median()), float(ok["mem_util_pct"].median())
        f.status = HOLDS if gu >= 90 and mu <= 40 else FAILS
        f.evidence = (f"median over the ok repeats: GPU utilisation {gu:.0f} %, memory "
                      f"utilisation {mu:.0f} % (holds when ≥ 90 % and ≤ 40 %)")
    else:
        f.evidence = "no utilisation samples (the power source records none)"
    return out


def _config_text(row: pd.Series, axes: list[str]) -> str:
    names = {"engine": "engine", "batch_size": "batch", "power_cap_w": "cap",
             "dataset": "dataset", "shards": "shards", "max_gen_len": "max gen len",
             "precision": "precision"}
    return ", ".join(f"{names[a]} {fmt_value(a, row[a]).replace(' (uncapped)', '')}"
                     for a in axes if a in row.index)


def _interval_text(values: np.ndarray) -> str:
    """The 95 % Student-t interval of a J/token mean as ``low–high``. Energy is never
    negative: a lower end below 0 (few repeats, far apart) is shown as 0."""
    low, high = t_interval(values)
    return f"{max(low, 0.0):.3g}–{high:.3g}"


def short_answer(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model × GPU type: the lowest-J/token cell and its ratio to the paper's setting."""
    ok = summary[(summary["status"] == "ok")] if "status" in summary.columns else summary
    if "j_per_token" not in ok.columns:
        return []
    ok = ok[ok["j_per_token"].notna()]
    if len(ok) == 0:
        return []
    axes = [a for a in ("engine", "precision", "batch_size", "power_cap_w", "dataset", "shards",
                        "max_gen_len") if a in ok.columns]
    shown = [a for a in axes if a in ("engine", "batch_size", "power_cap_w")
             or ok[a].nunique(dropna=False) > 1]
    out = []
    for (model, gpu), grp in ok.groupby(["model", "gpu"], sort=True):
        means = grp.groupby("cell_id")["j_per_token"].mean()
        best_id = means.idxmin()
        best = grp[grp["cell_id"] == best_id]
        first = best.iloc[0]
        item: dict[str, Any] = {
            "model": model, "gpu": gpu, "cell_id": best_id, "config": _config_text(first, shown),
            "j_per_token": float(means[best_id]), "n": int(len(best)),
            "interval": _interval_text(best["j_per_token"].to_numpy()) if len(best) > 1 else "",
            "n_cells": int(means.size), "versus": [],
            "power_source": str(first.get("power_source") or "none")}
        if "engine" not in grp.columns or PAPER_ENGINE not in set(grp["engine"].astype(str)):
            item["versus"].append("no cell ran it, so there is nothing to compare with")
        elif set(grp["engine"].astype(str)) == {PAPER_ENGINE}:
            item["versus"].append("it is the only engine measured")
        elif str(first["engine"]) == PAPER_ENGINE:
            item["versus"].append(f"the best cell runs the paper's engine ({PAPER_ENGINE}) itself; "
                                  "no other engine measured here did better")
        else:
            ref = grp[grp["engine"].astype(str) == PAPER_ENGINE]
            if "precision" in ref.columns and (ref["precision"] == PAPER_PRECISION).any():
                ref = ref[ref["precision"] == PAPER_PRECISION]  # the paper's setting: fp16 weights
            same = ref
            for a in axes:
                if a not in ("engine", "precision"):
                    same = same[same[a].isna()] if pd.isna(first[a]) else same[same[a] == first[a]]
            if len(same):
                r = ratio(best["j_per_token"], same["j_per_token"])
                change = (f"{100 * (1 - r.value):.0f} % less" if r.value <= 1
                          else f"{100 * (r.value - 1):.0f} % more")
                paper = PAPER_ENGINE if "precision" not in shown else f"{PAPER_ENGINE} {PAPER_PRECISION}"
                item["versus"].append(f"{r.text()} the J/token of {paper} at the same "
                                      f"settings: {change} energy per token")
            ref_means = ref.groupby("cell_id")["j_per_token"].mean()
            ref_id = ref_means.idxmin()
            ref_best = ref[ref["cell_id"] == ref_id]
            r = ratio(best["j_per_token"], ref_best["j_per_token"])
            item["versus"].append(f"{r.text()} the J/token of the best {PAPER_ENGINE} cell "
                                  f"({_config_text(ref_best.iloc[0], shown)}, "
                                  f"{ref_means[ref_id]:.3g} J/token)")
        out.append(item)
    return out
