"""What a precision costs and saves, side by side: each cell of a precision other than
fp16 beside its fp16 cell (every other axis equal, :func:`llmenergy.analysis.compare.pairs`).

Per cell: the energy-per-token and throughput ratios with their 95 % intervals, the
logits against the same load's fp16 weights (:mod:`llmenergy.inference.fidelity`:
relative L2 difference, KL divergence of the next-token distributions, top-1
agreement, or why they are missing), and, for a graded dataset (GSM8K), the accuracy
and the energy per correct answer of both cells. With synthetic weights the logit
and accuracy columns describe random matrices: the row says they are not meaningful.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from llmenergy.analysis.compare import Ratio

#: Per-cell means over the ok repeats (the fidelity columns repeat on every row of a cell).
_MEANS = ("j_per_token", "tokens_per_s", "logit_rel_diff", "logit_rel_diff_max", "token_kl_nats",
          "top1_agree", "accuracy", "j_per_correct")


def _cell_values(summary: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per ok cell: the means of :data:`_MEANS`, its axes, its fidelity reason, synthetic or not."""
    by = summary[summary["status"] == "ok"].groupby("cell_id", sort=False)
    cells = by[list(_MEANS)].mean().join(
        by[["model", "dataset", "engine", "batch_size", "precision", "fidelity_reason"]].first())
    cells["synthetic"] = by["weights_synthetic"].agg(lambda s: bool(s.fillna(False).any()))
    return {str(cid): {k: None if not isinstance(v, str) and pd.isna(v) else v for k, v in row.items()}
            for cid, row in cells.to_dict("index").items()}


def _text(r: Any) -> str:
    return r.text() if isinstance(r, Ratio) and math.isfinite(r.value) else "—"


def precision_costs(summary: pd.DataFrame, pair_rows: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per ok cell whose precision is not fp16: its values, its fp16 cell's, the ratios."""
    if not summary["precision"].ne("fp16").any():
        return []
    cells = _cell_values(summary)
    matched: dict[str, dict[str, Any]] = {}
    if len(pair_rows) and "axis" in pair_rows.columns:
        for rec in pair_rows[pair_rows["axis"] == "precision"].to_dict("records"):
            if rec["baseline"] == "fp16":
                matched[rec["cell"]] = rec
    rows = []
    for cid, vals in cells.items():
        if vals["precision"] in (None, "fp16"):
            continue
        pair = matched.get(cid)
        base = cells.get(pair["baseline_cell"], {}) if pair else {}
        rows.append({
            "cell_id": cid, **vals,
            "fp16_cell": pair["baseline_cell"] if pair else None,
            "j_per_token_ratio": _text(pair.get("j_per_token")) if pair else "—",
            "tokens_per_s_ratio": _text(pair.get("tokens_per_s")) if pair else "—",
            "fp16_accuracy": base.get("accuracy"), "fp16_j_per_correct": base.get("j_per_correct"),
        })
    return sorted(rows, key=lambda r: (str(r["model"]), str(r["dataset"]), str(r["engine"]),
                                       int(r["batch_size"] or 0), str(r["precision"])))
