"""The report's power-cap figure: time against energy, one point per cap, from the summary.

The cells' power comes from a recorded series replayed as a sensor (source
"replay"), and the figure and report must say so.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from report_helpers import make_cell

from llmenergy.analysis.aggregate import aggregate
from llmenergy.analysis.plots import make_figures
from llmenergy.analysis.report import render_report


def test_power_cap_figure_from_replayed_sensor_is_labelled(tmp_path: Path) -> None:
    # Lower caps: less power, longer decode (the paper's 250 W -> 175 W trade-off, in shape).
    for cap, power_w, decode_s in ((250.0, 240.0, 3.0), (200.0, 195.0, 3.1), (175.0, 170.0, 3.25)):
        make_cell(tmp_path, f"m65_alpaca_V100_s8_b64_g256_p{cap:g}W_reference", model="m65", gpu="V100",
                  shards=8, batch_size=64, max_gen_len=256, power_cap_w=cap, power_w=power_w,
                  decode_s=decode_s, source="replay")
    aggregate(tmp_path)
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    assert set(summary.power_source) == {"replay"}
    by_cap = summary.groupby("power_cap_w").agg(energy_j=("energy_j", "mean"), duration_s=("duration_s", "mean"))
    assert by_cap.energy_j.is_monotonic_increasing and by_cap.duration_s.is_monotonic_decreasing

    figs = {f.name: f for f in make_figures(summary, tmp_path / "figures")}
    cap_fig = figs["power_cap_tradeoff"]
    assert not cap_fig.skipped
    assert cap_fig.power_source == "replay"
    assert Path(cap_fig.png).stat().st_size > 0
    assert "replay" in Path(cap_fig.svg).read_text()  # the title names the power source

    html = render_report(tmp_path).read_text()
    assert "power_cap_tradeoff" in html
    assert "replay" in html
