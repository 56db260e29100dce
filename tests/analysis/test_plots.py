"""Figures hold every axis they do not plot fixed, use the table's 95 % t-interval and
readable axes; the builders skip with a reason when there is nothing to draw."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmenergy.analysis.aggregate import cell_stats
from llmenergy.analysis.metrics import to_table
from llmenergy.analysis.plots import (
    BUILDERS,
    FigureSkipped,
    fig_pareto,
    fig_power_cap,
    figure_power_source,
    make_figures,
    pareto_front,
)
from llmenergy.analysis.figdata import figure_data

AXES = ("model", "gpu", "dataset", "shards", "batch_size", "max_gen_len", "power_cap_w")


def summary_of(*, models=("tiny",), gpus=("H100",), datasets=("alpaca",), shards=(1, 2),
               batch=(1, 4, 16), gen=(16,), caps=(None,), repeats=3, source="nvml",
               energy=True, engines=("reference",)) -> pd.DataFrame:
    """One row per repeat; tokens/s = 100·bs/shards, ÷4 at gen 32, ×0.5 on V100, ×0.9 capped,
    + 3·repeat; power 150 W per shard (×0.8 capped); J/token = power / tokens/s."""
    rows = []
    for model, gpu, ds, s, bs, g, cap, eng, rep in itertools.product(
            models, gpus, datasets, shards, batch, gen, caps, engines, range(repeats)):
        tps = (100.0 * bs / s * (0.25 if g == 32 else 1.0) * (0.5 if gpu == "V100" else 1.0)
               * (0.9 if cap else 1.0) * (1.2 if ds == "gsm8k" else 1.0)
               * (2.0 if eng == "compiled" else 1.0)) + 3 * rep
        duration = 1000.0 / tps
        power = 150.0 * s * (0.8 if cap else 1.0)
        e = power * duration if energy else None
        cid = f"{model}_{ds}_{gpu}_s{s}_b{bs}_g{g}_p{cap}_{eng}"
        rows.append(dict(
            cell_id=cid, model=model, dataset=ds, gpu=gpu, shards=s, batch_size=bs, max_gen_len=g,
            power_cap_w=cap, engine=eng, repeat=rep, status="ok", tokens_out=1000,
            words_out=750, responses=4 * bs, duration_s=duration, tokens_per_s=tps,
            words_per_s=750 / duration, responses_per_s=4 * bs / duration, energy_j=e,
            avg_power_w=power if energy else None, j_per_token=e / 1000 if energy else None,
            j_per_word=e / 750 if energy else None, j_per_response=e / (4 * bs) if energy else None,
            active_energy_j=0.6 * e if energy else None,
            prefill_energy_j=0.1 * e if energy else None,
            decode_energy_j=0.9 * e if energy else None, latency_p50_s=duration / 4,
            power_source=source if energy else "none"))
    rows.append(dict(cell_id="failed", model=models[0], gpu=gpus[0], shards=4, batch_size=64,
                     status="oom", repeat=0, power_source="none"))
    return to_table(rows).to_pandas()


def mean_lines(ax):  # type: ignore[no-untyped-def]
    """The plotted mean lines of an axes (not error bars, not hollow markers), by hue label."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def _lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:  # type: ignore[no-untyped-def]
    return {ln.get_label(): (list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())))
            for ln in mean_lines(ax)}


def test_no_pooling_over_an_axis_not_plotted() -> None:
    # Throughput at gen 16 is 4× that at gen 32: pooling would average the two; each gets a panel.
    summary = summary_of(gen=(16, 32))
    fig, caption = BUILDERS["tokens_per_s_vs_batch"](summary)
    panels = {ax.get_title(): _lines_by_label(ax) for ax in fig.axes}
    assert set(panels) == {"tiny · H100\nlen 16", "tiny · H100\nlen 32"}  # constant model · GPU first
    for title, scale in (("tiny · H100\nlen 16", 100.0), ("tiny · H100\nlen 32", 25.0)):
        assert set(panels[title]) == {"1", "2"}  # one line per shard count
        xs, ys = panels[title]["1"]
        assert xs == [1, 4, 16]
        # mean over repeats 0, 1, 2 of scale·bs + 3·repeat
        assert ys == pytest.approx([scale * b + 3.0 for b in (1, 4, 16)])
    assert "one panel per max generation length (tokens)" in caption
    assert "dataset = alpaca" in caption and "power cap = default (uncapped)" in caption
    assert "engine = reference" in caption  # one value: named, no legend


def test_error_bars_are_the_tables_t_interval() -> None:
    summary = summary_of(shards=(1, 2), batch=(1, 4))
    fig, caption = BUILDERS["j_per_token_vs_batch"](summary[summary["shards"] != 2])
    assert "95 % Student-t interval" in caption and "n = 3 repeats per point" in caption
    stats, _ = cell_stats(summary[(summary["status"] == "ok") & (summary["shards"] == 1)])
    ci = stats.set_index("batch_size")["j_per_token_ci95"]
    ax = fig.axes[0]
    assert len(mean_lines(ax)) == 1
    half = {float(seg[0][0]): float(seg[1][1] - seg[0][1]) / 2
            for c in ax.collections for seg in c.get_segments()}
    assert half == pytest.approx({1.0: ci[1], 4.0: ci[4]}, rel=1e-6)
    # the std is smaller by t/sqrt(n) = 4.303/1.732: the bars are not std
    std = stats.set_index("batch_size")["j_per_token_std"]
    assert half[1.0] > 2 * std[1]


def test_log2_axes_with_ticks_at_measured_values_and_log_energy_axis() -> None:
    summary = summary_of(shards=(1, 2, 4), batch=(16, 32))
    fig, _ = BUILDERS["tokens_per_s_vs_shards"](summary)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert ax.get_yscale() == "linear"  # tokens/s = 100·batch/shards: 400..3200, < a decade
    fig, _ = BUILDERS["j_per_token_vs_batch"](summary_of(batch=(1, 16, 128)))
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "16", "128"]
    assert ax.get_yscale() == "log"  # 1.5 .. 0.012 J/token: two decades
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all("e+" not in t and "$" not in t for t in labels), labels


def test_at_most_eight_lines_per_axes_and_caption_says_what_is_left_out() -> None:
    summary = summary_of(shards=tuple(range(1, 13)), batch=(1, 2))
    fig, caption = BUILDERS["tokens_per_s_vs_batch"](summary)
    assert all(len(mean_lines(ax)) <= 8 for ax in fig.axes)
    assert "Not shown, to keep lines apart:" in caption


def test_facets_by_model_gpu_and_every_other_varying_axis() -> None:
    summary = pd.concat([summary_of(models=("a",), gpus=("H100", "V100"), shards=(1, 2)),
                         summary_of(models=("b",), gpus=("H100", "V100"), shards=(4, 8))])
    fig, caption = BUILDERS["j_per_token_vs_max_gen_len"](
        pd.concat([summary, summary_of(models=("a",), gen=(32,))]))
    # Only model a on H100 has two generation lengths, at shards 1 and at shards 2
    assert sorted(ax.get_title() for ax in fig.axes) == ["a · H100\nshards 1", "a · H100\nshards 2"]
    assert "one panel per model × GPU type × shards (GPUs)" in caption
    fig, caption = BUILDERS["tokens_per_s_vs_batch"](summary)
    assert sorted(ax.get_title().split("\n")[0] for ax in fig.axes) == [
        "a · H100", "a · V100", "b · H100", "b · V100"]
    assert all(len(mean_lines(ax)) == 2 for ax in fig.axes)


def test_dataset_and_gpu_comparisons() -> None:
    summary = summary_of(datasets=("alpaca", "gsm8k"), gpus=("H100", "V100"))
    fig, caption = BUILDERS["j_per_token_by_dataset"](summary)
    assert [set(_lines_by_label(ax)) for ax in fig.axes] == [{"alpaca", "gsm8k"}] * 4
    assert sorted(ax.get_title() for ax in fig.axes) == [
        "tiny · H100\nshards 1", "tiny · H100\nshards 2", "tiny · V100\nshards 1",
        "tiny · V100\nshards 2"]
    fig, _ = BUILDERS["gpu_type_comparison"](summary)
    assert [set(_lines_by_label(ax)) for ax in fig.axes] == [{"H100", "V100"}] * 4
    with pytest.raises(FigureSkipped, match="only one dataset"):
        BUILDERS["j_per_token_by_dataset"](summary_of())


def test_engine_comparison_one_line_per_engine_both_metrics() -> None:
    summary = summary_of(engines=("reference", "compiled"), shards=(1,), batch=(16, 64))
    fig, caption = BUILDERS["engine_comparison"](summary)
    drawn = [ax for ax in fig.axes if ax.has_data()]
    assert len(drawn) == 2  # J/token above, tokens/s below
    tps = _lines_by_label(drawn[1])
    assert set(tps) == {"compiled", "reference"}
    # tokens/s = 100·bs (×2 compiled) + 3·repeat, mean over repeats 0..2
    assert tps["compiled"][1] == pytest.approx([3203.0, 12803.0])
    assert tps["reference"][1] == pytest.approx([1603.0, 6403.0])
    assert "one line per engine" in caption
    assert "Left out" not in caption  # every setting ran both engines
    with pytest.raises(FigureSkipped, match="only one engine"):
        BUILDERS["engine_comparison"](summary_of())


def test_comparison_figures_draw_only_settings_measured_both_ways() -> None:
    """As in the demo: the compiled engine runs on gsm8k at shards 1 only, so the engine
    figure has one panel, not one per setting the reference ran alone."""
    both = summary_of(engines=("reference", "compiled"), datasets=("gsm8k",), shards=(1,), batch=(4,))
    alone = summary_of(datasets=("alpaca",), shards=(1, 2), batch=(2, 4))
    summary = pd.concat([both, alone, summary_of(datasets=("gsm8k",), shards=(2,), batch=(4,))])
    fig, caption = BUILDERS["engine_comparison"](summary)
    drawn = [ax for ax in fig.axes if ax.has_data()]
    assert len(drawn) == 2  # one panel: J/token above, tokens/s below
    lines = _lines_by_label(drawn[1])
    assert set(lines) == {"compiled", "reference"}
    # both engines at batch 4, their points set apart (so are their bars), the tick at 4
    (x_ref,), (x_comp,) = lines["reference"][0], lines["compiled"][0]
    assert 3.5 < x_ref < 4 < x_comp < 4.5  # in the legend's order: the paper's engine first
    assert list(drawn[1].get_xticks()) == [4.0]
    assert "set a little apart along the x axis" in caption
    assert "one line per engine. Same in every cell:" in caption  # one panel: none named
    assert set(figure_data(fig).cells) == set(both.loc[both["status"] == "ok", "cell_id"])
    assert "Left out: 5 cell(s) whose setting was measured with one engine only" in caption
    # the dataset figure pairs alpaca and gsm8k where both ran: shards 1 and 2, batch 4, reference
    fig, caption = BUILDERS["j_per_token_by_dataset"](summary)
    data = figure_data(fig)
    assert {c for c in data.cells if "compiled" in c or "_b2_" in c} == set()
    assert len(data.cells) == 4
    assert "Left out: 3 cell(s) whose setting was measured with one dataset only" in caption
    # reference at batch 2, compiled at batch 4 only: no setting ran both
    apart = pd.concat([summary_of(batch=(2,), shards=(1,)),
                       summary_of(batch=(4,), shards=(1,), engines=("compiled",))])
    with pytest.raises(FigureSkipped, match="no setting was measured with two values of engine"):
        BUILDERS["engine_comparison"](apart)


def test_power_cap_relative_to_uncapped_and_to_highest_cap() -> None:
    fig, caption = fig_power_cap(summary_of(caps=(None, 200.0), shards=(1,), batch=(4,)))
    ax = fig.axes[0]
    lines = _lines_by_label(ax)
    energy, time = lines["batch 4 / energy"][1], lines["batch 4 / time"][1]
    assert energy[0] == pytest.approx(1.0) and time[0] == pytest.approx(1.0)
    # capped: 0.8 × power, duration × 1/0.9 (plus repeat noise): energy < 1 < time
    assert energy[1] == pytest.approx(0.8 / 0.9, rel=0.03) and time[1] > 1.05
    assert [t.get_text() for t in ax.get_xticklabels()] == ["default", "200 W"]
    assert "baseline: uncapped" in caption and "95 % Student-t" in caption
    _, caption = fig_power_cap(summary_of(caps=(250.0, 200.0, 175.0), shards=(1,), batch=(4,)))
    assert "baseline: 250 W" in caption
    with pytest.raises(FigureSkipped, match="two or more power caps"):
        fig_power_cap(summary_of())


def test_power_cap_compares_per_token_when_a_capped_repeat_ran_fewer_cycles() -> None:
    # uncapped: 4 cycles of 6 s at 300 W; capped at 200 W: 3 cycles of 7 s at 220 W (a repeat
    # runs whole cycles until min_window_s): per token 0.86x the energy in 1.17x the time
    summary = summary_of(caps=(None, 200.0), shards=(1,), batch=(4,), repeats=2)
    capped = summary["power_cap_w"].notna()
    cycles = np.where(capped, 3, 4)
    summary["tokens_out"] = 250 * cycles
    summary["duration_s"] = np.where(capped, 7.0, 6.0) * cycles
    summary["energy_j"] = np.where(capped, 220.0, 300.0) * summary["duration_s"]
    lines = _lines_by_label(fig_power_cap(summary)[0].axes[0])
    assert lines["batch 4 / energy"][1][1] == pytest.approx(220 * 7 / (300 * 6))
    assert lines["batch 4 / time"][1][1] == pytest.approx(7 / 6)  # slower, not 0.875x as per repeat


def test_prefill_decode_and_active_energy() -> None:
    summary = summary_of(shards=(1,))
    fig, _ = BUILDERS["prefill_vs_decode_energy"](summary)
    lines = _lines_by_label(fig.axes[0])
    assert np.allclose(np.array(lines["decode"][1]) / np.array(lines["prefill"][1]), 9.0)
    fig, _ = BUILDERS["active_vs_total_energy"](summary)
    lines = _lines_by_label(fig.axes[0])
    assert np.allclose(np.array(lines["active (idle subtracted)"][1]) / np.array(lines["total"][1]),
                       0.6)


UNRESOLVED = ("prefill_energy_j null: 2 of 2 window(s) last 0.025-0.141 s, under 10 sensor "
              "update periods (1.00 s)")


def test_decode_is_drawn_when_no_prefill_is_resolved() -> None:
    summary = summary_of(shards=(1,))
    ok = summary["status"] == "ok"
    summary.loc[ok, "prefill_energy_j"] = None  # as on a GPU: every prefill below 1 s
    summary["energy_reason"] = np.where(ok, UNRESOLVED, None)
    fig, caption = BUILDERS["prefill_vs_decode_energy"](summary)
    lines = _lines_by_label(fig.axes[0])
    assert list(lines) == ["decode"]
    assert lines["decode"][0] == [1.0, 4.0, 16.0]  # every batch size's decode is kept
    assert caption.startswith("Prefill is not drawn: prefill windows shorter than 10 sensor "
                              "update periods: not resolved; see docs/measurement.md.")
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "_flagged"]
    # the J/token figure is not hollowed by a prefill it does not draw
    fig, _ = BUILDERS["j_per_token_vs_batch"](summary)
    assert figure_data(fig).flagged == []


def test_prefill_left_out_only_where_null() -> None:
    summary = summary_of(shards=(1,))
    one = summary.index[(summary["batch_size"] == 4) & (summary["repeat"] == 0)]
    summary.loc[one, "prefill_energy_j"] = None
    summary["energy_reason"] = None
    summary.loc[one, "energy_reason"] = UNRESOLVED
    fig, caption = BUILDERS["prefill_vs_decode_energy"](summary)
    assert set(_lines_by_label(fig.axes[0])) == {"prefill", "decode"}
    assert caption.startswith("Prefill is left out for 1 of 9 repeat(s): prefill windows shorter")


def test_a_figure_skipped_for_null_energy_says_why_not_no_sensor() -> None:
    summary = summary_of(shards=(1,))
    ok = summary["status"] == "ok"
    summary.loc[ok, "decode_energy_j"] = None
    summary["energy_reason"] = np.where(ok, "decode_energy_j null: 1 of 2 window(s) last 0.5 s", None)
    with pytest.raises(FigureSkipped, match=r"power source: nvml.*decode_energy_j null: 1 of 2") as exc:
        BUILDERS["prefill_vs_decode_energy"](summary)
    assert "no power sensor" not in str(exc.value)
    # the same words with each repeat's own numbers: said once, with how many repeats say it
    n_ok = int(ok.sum())
    summary.loc[ok, "energy_reason"] = [f"decode_energy_j null: 1 of 2 window(s) last 0.{i + 1} s"
                                        for i in range(n_ok)]
    summary.loc[summary.index[ok][:2], "energy_reason"] = "decode_energy_j null: int8 fell over 3 s"
    with pytest.raises(FigureSkipped) as exc:
        BUILDERS["prefill_vs_decode_energy"](summary)
    assert str(exc.value).endswith(
        f"decode_energy_j null: int8 fell over 3 s (2 repeats); decode_energy_j null: 1 of 2 "
        f"window(s) last 0.3 s ({n_ok - 2} repeats; the numbers are the first's)")
    summary.loc[ok, ["active_energy_j", "idle_power_w"]] = None  # null because idle power is
    summary["energy_reason"] = np.where(ok, "idle_power_w null: 1 of 1 window(s) last 0.3 s", None)
    with pytest.raises(FigureSkipped, match=r"active_energy_j null where idle_power_w null: 1 of 1"):
        BUILDERS["active_vs_total_energy"](summary)


def test_pareto_front_by_hand_and_front_points_numbered_with_a_key() -> None:
    x = np.array([1.0, 2.0, 3.0, 1.5, 4.0])
    y = np.array([5.0, 3.0, 4.0, 6.0, 1.0])
    assert pareto_front(x, y).tolist() == [0, 1, 4]
    fig, caption = fig_pareto(summary_of(gpus=("H100", "V100")))
    texts = [t.get_text() for t in fig.axes[0].texts]
    key = figure_data(fig).table
    assert texts == [str(r["#"]) for r in key]
    assert "H100 s1 b16 g16 alpaca reference" in [r["configuration"] for r in key]
    assert f"{len(texts)} of 12 are on the front" in caption


def test_pareto_numbers_never_overlap_even_when_points_crowd() -> None:
    # 40 configurations on a near-straight front with tiny gaps: every point is on the front
    summary = summary_of(batch=tuple(range(1, 41)), shards=(1,), repeats=1)
    summary["latency_p50_s"] = 1.0 + summary["batch_size"] * 1e-3
    summary["j_per_token"] = 1.0 - summary["batch_size"] * 1e-3
    fig, _ = fig_pareto(summary)
    texts = fig.axes[0].texts
    assert len(texts) == 40
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    clashes = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert clashes == []


def test_skips_with_reasons() -> None:
    summary = summary_of(energy=False)
    with pytest.raises(FigureSkipped, match="energy columns are empty"):
        BUILDERS["j_per_token_vs_batch"](summary)
    with pytest.raises(FigureSkipped, match="one max generation length .* measured"):
        BUILDERS["j_per_token_vs_max_gen_len"](summary_of())
    with pytest.raises(FigureSkipped, match="only one GPU type"):
        BUILDERS["gpu_type_comparison"](summary_of())


def test_make_figures_writes_png_svg_manifest_and_skips(tmp_path: Path) -> None:
    summary = summary_of(source="estimate", shards=(1, 2), batch=(1, 4))
    infos = {i.name: i for i in make_figures(summary, tmp_path)}
    assert list(infos) == list(BUILDERS)
    drawn = [i for i in infos.values() if not i.skipped]
    assert "tokens_per_s_vs_batch" in infos and not infos["tokens_per_s_vs_batch"].skipped
    for info in drawn:
        assert info.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in info.svg.read_bytes()[:1000]
        assert info.power_source == "estimate (ESTIMATE)"
        assert "95 % Student-t" in info.caption or "no bars" in info.caption
    for name in ("gpu_type_comparison", "j_per_token_by_dataset", "power_cap_tradeoff",
                 "j_per_token_vs_max_gen_len", "engine_comparison"):
        assert infos[name].skipped and infos[name].reason and infos[name].png is None, name
        assert not (tmp_path / f"{name}.png").exists()
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert [m["name"] for m in manifest] == list(BUILDERS)


def test_figures_drawn_by_two_processes_are_the_serial_ones(tmp_path: Path) -> None:
    summary = summary_of(source="estimate", shards=(1, 2), batch=(1, 4), repeats=2)
    serial = make_figures(summary, tmp_path / "serial")
    forked = make_figures(summary, tmp_path / "forked", workers=2)
    assert [i.name for i in forked] == list(BUILDERS)  # the manifest keeps BUILDERS' order
    assert sum(not i.skipped for i in forked) >= 10
    for a, b in zip(serial, forked, strict=True):
        assert (a.name, a.caption, a.skipped, a.reason, a.cells, a.table) == \
            (b.name, b.caption, b.skipped, b.reason, b.cells, b.table)
        if not a.skipped:
            assert a.png.read_bytes() == b.png.read_bytes(), a.name
    manifest = json.loads((tmp_path / "forked" / "index.json").read_text())
    assert [m["name"] for m in manifest] == list(BUILDERS)


def test_every_builder_draws_and_names_the_power_source() -> None:
    summary = summary_of(gpus=("H100", "V100"), datasets=("alpaca", "gsm8k"), gen=(16, 32),
                         caps=(None, 200.0), batch=(1, 4), repeats=2, shards=(1, 2),
                         engines=("reference", "compiled"))
    for name, build in BUILDERS.items():
        fig, caption = build(summary)
        assert any(mean_lines(ax) or ax.collections for ax in fig.axes), name
        assert figure_power_source(fig) == "nvml", name
        assert name == "pareto_j_per_token_latency" or "model = tiny" in caption, name
