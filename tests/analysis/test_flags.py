"""Which repeats are flagged and why: each source of a flag gives its own reason; columns
the summary lacks are no flag; a generic ``flags`` text column and ``*_flag`` columns count."""
from __future__ import annotations

import math

import pandas as pd

from llmenergy.analysis.flags import HEADLINE_COLUMNS, cell_flags, flagged_rows, row_flags


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


def _energy_rows() -> pd.DataFrame:
    prefill = ("prefill_energy_j null: 4 of 4 window(s) last 0.025-0.141 s, under 10 sensor "
               "update periods (1.00 s)")
    return pd.DataFrame({
        "cell_id": ["p", "m", "m", "k"],
        "repeat": [0, 0, 1, 0],
        "status": ["ok"] * 4,
        "energy_j": [10.0, math.nan, 9.0, 10.0],
        "power_source": ["nvml"] * 4,
        "energy_complete": [True, False, False, True],
        "energy_reason": [prefill, "energy_j null: no power samples of node2/GPU-7 (rank 1)",
                          None, None],
    })


def test_energy_reason_and_incomplete_energy_are_flags() -> None:
    reasons = row_flags(_energy_rows()).tolist()
    assert reasons[0].startswith("prefill_energy_j null: 4 of 4 window(s) last 0.025-0.141 s")
    # the reason names the device; no second, vaguer "null energy" beside it
    assert reasons[1] == "energy_j null: no power samples of node2/GPU-7 (rank 1)"
    assert reasons[2].startswith("energy incomplete")  # energy published, a GPU not metered
    assert reasons[3] == ""
    assert "repeat 0: prefill_energy_j null" in cell_flags(_energy_rows())["p"]


def test_a_phase_clause_flags_only_the_figures_that_draw_that_phase() -> None:
    rows = _energy_rows()
    assert row_flags(rows, ["j_per_token", "batch_size"]).tolist()[0] == ""
    assert row_flags(rows, ["prefill_energy_j"]).tolist()[0].startswith("prefill_energy_j null")
    # a clause about the repeat's energy counts in every figure
    assert row_flags(rows, ["tokens_per_s"]).tolist()[1].startswith("energy_j null")


def test_headline_flags_leave_out_phase_clauses_only() -> None:
    rows = _energy_rows()
    headline = cell_flags(rows, HEADLINE_COLUMNS)
    assert "p" not in headline  # its one clause is about the prefill alone
    assert "prefill_energy_j null" in cell_flags(rows)["p"]  # still flagged where phases show
    # the repeat's own energy, withheld or not metered throughout, concerns every headline
    assert "repeat 0: energy_j null: no power samples" in headline["m"]
    assert "repeat 1: energy incomplete" in headline["m"]


def test_repeats_with_the_same_reason_share_one_entry() -> None:
    rows = pd.DataFrame({"cell_id": ["a"] * 3, "repeat": [0, 1, 2], "status": ["ok"] * 3,
                         "energy_reason": ["balance_load_j null: short"] * 2 + [None]})
    assert cell_flags(rows) == {"a": "repeats 0, 1: balance_load_j null: short"}


def test_a_reason_with_one_window_is_the_same_kind_as_one_with_a_range() -> None:
    """The report counts reasons by kind: "last 0.003 s" (one window) and "last 0.003-0.004 s"
    are one kind, as are "4 of 4" and "2 of 2"; the precision in a name is not a number."""
    from llmenergy.analysis.flags import clause_kind

    one = "prefill_energy_j null: 2 of 2 window(s) last 0.003 s, under 10 sensor update periods (1.00 s)"
    span = "prefill_energy_j null: 4 of 4 window(s) last 0.003-0.004 s, under 10 sensor update periods (1.00 s)"
    assert clause_kind(one) == clause_kind(span)
    assert clause_kind("counter vs instant power differ by -22.7 %") == clause_kind(
        "counter vs instant power differ by +1.4 %")
    assert clause_kind("int8 cell") != clause_kind("fp8 cell")


def test_each_note_the_metrics_write_reads_back_as_one_clause_about_its_column(caplog) -> None:
    import numpy as np

    from llmenergy.analysis.flags import join_clauses, reason_clauses
    from llmenergy.analysis.reasons import cpu_edge_note, shared_note, wide_edge_note

    ev = pd.DataFrame({"update_period_s": [0.1, 0.1], "edge_gap_s": [1.5, 0.0],
                       "cpu_update_period_s": [0.1, 0.1], "cpu_edge_gap_s": [1.2, np.nan],
                       "shared_devices": ["node0/GPU-a (2)", None]})
    notes = {"idle_power_w": wide_edge_note(ev, "idle_power_w"), "cpu_energy_j": cpu_edge_note(ev),
             "prefill_only_energy_j": shared_note(ev, "prefill_only_energy_j")}
    text = join_clauses(notes.values())
    assert [column for column, _ in reason_clauses(text)] == list(notes)
    # read back whole, a phase note leaves the figures of the total energy filled
    row = pd.DataFrame({"status": ["ok"], "energy_reason": [text]})
    assert row_flags(row, ["energy_j", "j_per_token"]).iloc[0] == ""
    # a clause written with the separator in it (a bug) stays one clause, and the bug is logged
    with caplog.at_level("ERROR", logger="llmenergy.analysis.flags"):
        assert reason_clauses(join_clauses(["energy_j null: a; b", "x"])) == [("energy_j", "energy_j null: a, b"),
                                                                           (None, "x")]
    assert "an energy_reason clause holds '; '" in caplog.text


def test_a_clause_an_earlier_version_wrote_with_a_separator_in_it_is_read_back_whole() -> None:
    from llmenergy.analysis.flags import reason_clauses

    text = ("idle_power_w interpolated across a gap in the power samples: 1 of 1 window(s) begin or end in a "
            "gap of up to 1.50 s (over 10 sensor update periods; up to ~4 % off, docs/measurement.md); "
            "clock of node n1 off rank 0's by +7.0 ms (> 5 ms; its power timestamps were corrected)")
    assert [column for column, _ in reason_clauses(text)] == ["idle_power_w", None]
    row = pd.DataFrame({"status": ["ok"], "energy_reason": [text.split("; clock")[0]]})
    assert row_flags(row, HEADLINE_COLUMNS).iloc[0] == ""  # an idle note marks no headline number
