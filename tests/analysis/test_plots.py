from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmenergy.analysis.metrics import to_table
from llmenergy.analysis.plots import (
    BUILDERS,
    FigureSkipped,
    fig_j_per_token,
    fig_pareto,
    fig_power_cap,
    fig_throughput,
    figure_power_source,
    make_figures,
    pareto_front,
)


def synthetic_summary(*, gpus=("H100", "V100"), caps=(None, 200.0), source="nvml",
                      energy=True) -> pd.DataFrame:
    rows = []
    for model, gpu, shards, bs, cap, rep in itertools.product(
            ("tiny", "small"), gpus, (1, 2), (1, 4, 16), caps, (0, 1)):
        tps = 100.0 * bs / shards * (0.5 if gpu == "V100" else 1.0) * (0.9 if cap else 1.0)
        tps += rep  # repeat-to-repeat noise
        duration = 1000.0 / tps
        power = 150.0 * shards * (0.8 if cap else 1.0)
        e = power * duration if energy else None
        rows.append(dict(cell_id=f"{model}-{gpu}-{shards}-{bs}-{cap}", model=model,
                         dataset="alpaca", gpu=gpu, shards=shards, batch_size=bs, max_gen_len=16,
                         power_cap_w=cap, engine="reference", repeat=rep, status="ok",
                         tokens_out=1000, duration_s=duration, tokens_per_s=tps,
                         energy_j=e, avg_power_w=e / duration if energy else None,
                         j_per_token=e / 1000 if energy else None,
                         latency_p50_s=duration / 4, power_source=source if energy else "none"))
    rows.append(dict(cell_id="failed", model="tiny", gpu="H100", shards=4, batch_size=64,
                     status="oom", repeat=0, power_source="none"))
    return to_table(rows).to_pandas()


def _plotted_points(fig) -> int:  # type: ignore[no-untyped-def]
    n = 0
    for ax in fig.axes:
        n += sum(len(line.get_xdata()) for line in ax.get_lines())
        n += sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
        n += len(ax.patches)
    return n


def test_every_builder_draws_data() -> None:
    summary = synthetic_summary()
    for name, build in BUILDERS.items():
        fig, caption = build(summary)
        assert _plotted_points(fig) > 0, name
        assert caption
        assert figure_power_source(fig) == "nvml", name
        for ax in fig.axes:
            assert "(" in ax.get_ylabel() and "(" in ax.get_xlabel() or ax.get_xlabel() == "Model"


def test_throughput_line_values_are_means_over_repeats() -> None:
    summary = synthetic_summary()
    fig, _ = fig_throughput(summary)
    ax = fig.axes[0]
    labels = [c.get_label() for c in ax.containers]
    assert "small / V100 / 2 shards" in labels
    line = ax.containers[labels.index("tiny / H100 / 1 shards")].lines[0]
    # uncapped rows only: tps = 100*bs + repeat, mean over repeats 0,1 → 100*bs + 0.5
    assert list(line.get_xdata()) == [1, 4, 16]
    assert list(line.get_ydata()) == pytest.approx([100.5, 400.5, 1600.5])
    assert ax.get_xscale() == "log"


def test_j_per_token_two_panels_and_failed_rows_ignored() -> None:
    fig, _ = fig_j_per_token(synthetic_summary())
    assert len(fig.axes) == 2
    xs = {x for ax in fig.axes for ln in ax.get_lines() for x in ln.get_xdata()}
    assert 64 not in xs and 4 in xs  # the oom cell (shards 4, bs 64) is not plotted as bs 64


def test_power_cap_one_point_per_cap() -> None:
    fig, _ = fig_power_cap(synthetic_summary(caps=(None, 200.0, 300.0)))
    ax = fig.axes[0]
    assert all(len(ln.get_xdata()) == 3 for ln in ax.get_lines())
    labels = {t.get_text() for t in ax.texts}
    assert labels == {"default", "200 W", "300 W"}


def test_pareto_front_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 1.5, 4.0])
    y = np.array([5.0, 3.0, 4.0, 6.0, 1.0])
    assert pareto_front(x, y).tolist() == [0, 1, 4]
    fig, caption = fig_pareto(synthetic_summary())
    assert "on the front" in caption and _plotted_points(fig) > 0


def test_skips_with_reasons_and_no_empty_plots(tmp_path: Path) -> None:
    summary = synthetic_summary(gpus=("H100",), caps=(None,), energy=False)
    infos = {i.name: i for i in make_figures(summary, tmp_path)}
    assert not infos["throughput_vs_batch"].skipped
    for name in ("energy_per_second_vs_shards", "j_per_token_vs_shards_batch",
                 "pareto_j_per_token_latency", "power_cap_tradeoff", "gpu_type_comparison"):
        assert infos[name].skipped and infos[name].png is None, name
        assert not (tmp_path / f"{name}.png").exists()
    assert "energy columns are empty" in infos["j_per_token_vs_shards_batch"].reason
    assert infos["throughput_vs_batch"].power_source == "none"
    with pytest.raises(FigureSkipped, match="two or more power caps"):
        fig_power_cap(synthetic_summary(caps=(None,)))


def test_make_figures_writes_png_svg_and_manifest(tmp_path: Path) -> None:
    infos = make_figures(synthetic_summary(source="estimate"), tmp_path)
    drawn = [i for i in infos if not i.skipped]
    assert len(drawn) == len(BUILDERS)
    for info in drawn:
        assert info.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in info.svg.read_bytes()[:1000]
        assert info.power_source == "estimate (ESTIMATE)"
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert [m["name"] for m in manifest] == list(BUILDERS)
