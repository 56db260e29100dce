"""Which repeats are flagged and why: each source of a flag gives its own reason; columns
the summary lacks are no flag; a generic ``flags`` text column and ``*_flag`` columns count."""
from __future__ import annotations

import math

import pandas as pd

from llmenergy.analysis.flags import cell_flags, flagged_rows, row_flags


def _rows() -> pd.DataFrame:
    return pd.DataFrame({
        "cell_id": ["a", "a", "b", "c", "d", "e", "f"],
        "repeat": [0, 1, 0, 0, 0, 0, 0],
        "status": ["ok"] * 6 + ["oom"],
        "duration_s": [1.2, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
        "short_window": [True, False, False, False, False, False, True],
        "energy_discrepancy_pct": [0.2, -3.4, 0.5, 0.0, math.nan, 0.1, 0.0],
        "power_out_of_range": [False, False, True, False, False, False, False],
        "energy_j": [10.0, 10.0, math.nan, 10.0, math.nan, 10.0, math.nan],
        "power_source": ["nvml", "nvml", "nvml", "nvml", "none", "nvml", "nvml"],
        "phase_flag": [None, None, None, "unresolved decode", None, None, None],
        "flags": ["", None, None, None, None, "collector restarted", None],
    })


def test_each_source_gives_its_reason() -> None:
    reasons = row_flags(_rows()).tolist()
    assert reasons[0] == "short window (1.2 s < 5 s)"
    assert reasons[1] == "counter vs instant power differ by -3.4 %"
    assert reasons[2] == "events outside the power samples; null energy"
    assert reasons[3] == "phase: unresolved decode"
    assert reasons[4] == ""  # no sensor: null energy is expected, not a flag
    assert reasons[5] == "collector restarted"


def test_only_ok_rows_and_per_cell_text() -> None:
    rows = flagged_rows(_rows())
    assert sorted(rows["cell_id"]) == ["a", "a", "b", "c", "e"]  # f is oom: not an ok number
    by_cell = cell_flags(_rows())
    assert by_cell["a"] == ("repeat 0: short window (1.2 s < 5 s) | "
                            "repeat 1: counter vs instant power differ by -3.4 %")
    assert set(by_cell) == {"a", "b", "c", "e"}


def test_missing_columns_are_no_flag() -> None:
    bare = pd.DataFrame({"cell_id": ["a"], "status": ["ok"], "energy_j": [1.0]})
    assert row_flags(bare).tolist() == [""]
    assert cell_flags(bare) == {}
