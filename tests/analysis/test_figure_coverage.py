"""No measured cell is left out of every figure: each ok cell is drawn in every metric family,
whatever the shape of the matrix; a flagged repeat's point is drawn hollow.

The cells a figure draws are read from the figure itself (``figure_data``, which the
drawing code fills from the rows it plots), not recomputed here.
"""
from __future__ import annotations

import pandas as pd
import pytest
from report_helpers import synthetic_summary

from llmenergy.analysis.figdata import FigureSkipped, figure_data
from llmenergy.analysis.plots import BUILDERS, FAMILIES

#: each family's figure against batch size, which keeps one-point panels
FAMILY_PRIMARY = {"throughput": "tokens_per_s_vs_batch", "J/token": "j_per_token_vs_batch",
                  "J/word": "j_per_word_vs_batch", "J/response": "j_per_response_vs_batch",
                  "power": "energy_per_second_vs_batch"}

MATRICES = {
    "engine only": dict(engines=("reference", "compiled")),
    "dataset x batch": dict(datasets=("alpaca", "gsm8k"), batch=(16, 64)),
    "cap x shards": dict(caps=(None, 250.0, 175.0), shards=(1, 2, 4)),
    "one cell": dict(),
    "7B acceptance": dict(datasets=("alpaca", "gsm8k"), batch=(16, 64),
                          engines=("reference", "compiled")),
}


def _drawn(summary: pd.DataFrame, names: list[str]) -> tuple[set[str], set[str]]:
    cells: set[str] = set()
    hollow: set[str] = set()
    for name in names:
        try:
            fig, _ = BUILDERS[name](summary)
        except FigureSkipped:
            continue
        data = figure_data(fig)
        cells |= set(data.cells)
        hollow |= set(data.flagged)
    return cells, hollow


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_every_ok_cell_is_drawn_in_every_metric_family(matrix: str) -> None:
    summary = synthetic_summary(repeats=2, **MATRICES[matrix])
    ok_cells = set(summary.loc[summary["status"] == "ok", "cell_id"])
    assert set(FAMILIES) == set(FAMILY_PRIMARY)
    for family, names in FAMILIES.items():
        assert FAMILY_PRIMARY[family] in names, family
        drawn, _ = _drawn(summary, names)
        assert drawn == ok_cells, (matrix, family, sorted(ok_cells - drawn))


def test_one_value_axes_named_in_caption_not_given_a_legend() -> None:
    summary = synthetic_summary(repeats=2, batch=(16, 64))
    fig, caption = BUILDERS["j_per_token_vs_batch"](summary)
    assert fig.legends == []  # nothing varies but the x axis
    for text in ("model = 7B", "dataset = alpaca", "GPU type = H200", "shards (GPUs) = 1",
                 "engine = reference", "power cap = default (uncapped)"):
        assert text in caption, text


def test_reference_engine_in_every_family_of_the_acceptance_matrix() -> None:
    summary = synthetic_summary(**MATRICES["7B acceptance"])
    reference = set(summary.loc[summary["engine"] == "reference", "cell_id"])
    assert len(reference) == 4
    for family, names in FAMILIES.items():
        drawn, _ = _drawn(summary, names)
        assert reference <= drawn, family


def test_flagged_repeat_is_drawn_hollow() -> None:
    flagged = "7B_alpaca_H200_s1_b64_g256_pdefault_reference"
    summary = synthetic_summary(batch=(16, 64), short_cells=(flagged,))
    fig, caption = BUILDERS["j_per_token_vs_batch"](summary)
    assert figure_data(fig).flagged == [flagged]
    ax = fig.axes[0]
    hollow = [ln for ln in ax.get_lines() if ln.get_label() == "_flagged"]
    assert len(hollow) == 1 and hollow[0].get_markerfacecolor() == "white"
    assert list(hollow[0].get_xdata()) == [64]
    assert "Hollow markers: 1 point(s) with a flagged repeat" in caption
    legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "flagged repeat" in legend_texts


def test_too_many_panels_hold_an_axis_fixed_and_say_so() -> None:
    # one line per shard count; 5 datasets × 3 gen lengths × 2 caps = 30 panels > 24:
    # gen length is held fixed first
    summary = synthetic_summary(repeats=2, batch=(16, 64), gen=(128, 256, 512), shards=(1, 2),
                                datasets=("a", "b", "c", "d", "e"), caps=(None, 200.0))
    fig, caption = BUILDERS["j_per_token_vs_batch"](summary)
    assert len(fig.axes) <= 24
    assert "Held fixed, to keep at most 24 panels: max generation length (tokens)" in caption
    assert "(measured: 128, 256, 512)" in caption


def test_one_cell_is_drawn_with_its_magnitude_and_named_panel() -> None:
    fig, caption = BUILDERS["j_per_token_vs_batch"](synthetic_summary(repeats=3))
    (ax,) = fig.axes
    assert ax.get_title() == "7B · H200"
    assert ax.get_ylim()[0] == 0  # a lone point on a zoomed axis would hide its size
    assert "n = 3 repeats per point" in caption


@pytest.mark.parametrize(("axis", "given", "shown"), [
    ("engine", ("hf", "compiled", "reference"), ["reference", "compiled", "hf"]),
    ("precision", ("int8", "fp8", "bf16", "fp16"), ["fp16", "bf16", "int8", "fp8"]),
])
def test_engines_and_precisions_keep_their_own_order_in_the_legend(axis: str, given: tuple,
                                                                   shown: list[str]) -> None:
    """The paper's engine first, precisions from the widest weights down; not alphabetical."""
    summary = synthetic_summary(batch=(1, 16), engines=given if axis == "engine" else ("compiled",),
                                precisions=given if axis == "precision" else ("fp16",))
    fig, _ = BUILDERS["j_per_token_vs_batch"](summary)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert [lab for lab in labels if lab in given] == shown
    # where the axis makes panels, they come in the same order
    if axis == "engine":  # and the engines' own figure keeps it
        fig, _ = BUILDERS["engine_comparison"](summary)
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert [lab for lab in labels if lab in given] == shown
    fig, _ = BUILDERS["active_vs_total_energy"](summary)
    titles = [ax.get_title() for ax in fig.axes if f"{axis} " in ax.get_title()]
    assert [t.rsplit(f"{axis} ", 1)[1].split()[0] for t in titles] == shown


def test_one_repeat_per_point_is_said_in_the_singular() -> None:
    fig, caption = BUILDERS["j_per_token_vs_batch"](synthetic_summary(batch=(1, 16), repeats=1))
    assert "n = 1 repeat per point" in caption


def test_long_panel_titles_wrap_to_fit_four_panels_a_row() -> None:
    """Every setting that tells panels apart stays in the title, on lines short enough that a
    row of four panels does not run their titles into each other."""
    summary = synthetic_summary(datasets=("alpaca", "gsm8k"), shards=(1, 2), gen=(16, 32),
                                batch=(2, 4), engines=("reference", "compiled"))
    fig, _ = BUILDERS["active_vs_total_energy"](summary)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles and all(len(line) <= 34 for t in titles for line in t.split("\n")[1:])
    assert any("engine reference" in t and "shards 2" in t for t in titles)

