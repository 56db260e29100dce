"""Matched comparisons: pairs differ in one axis only, ratios carry a 95 % interval that covers
the true ratio about 95 % of the time, and the sentences and the paper's checks follow the data."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from report_helpers import synthetic_summary

from llmenergy.analysis.compare import pairs, pooled, ratio, summarise
from llmenergy.analysis.findings import FAILS, HOLDS, NOT_MEASURED, UNDECIDED, paper_findings, short_answer

ACCEPTANCE = dict(datasets=("alpaca", "gsm8k"), batch=(16, 64), engines=("reference", "compiled"))


def test_ratio_of_means_interval_and_edge_cases() -> None:
    r = ratio([2.0, 2.2, 1.8], [4.0, 4.4, 3.6])
    assert r.value == pytest.approx(0.5)
    assert r.low < 0.5 < r.high and r.low > 0
    assert ratio([3.0, 3.0], [1.5, 1.5]).text() == "2.00× (2.00–2.00)"  # no spread
    one = ratio([2.0], [4.0, 4.1])
    assert one.value == pytest.approx(2.0 / 4.05) and math.isnan(one.low)
    assert one.text() == "0.49×"
    assert math.isnan(ratio([], [1.0]).value)
    # more repeats of the same spread: a narrower interval
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 1, 40), rng.normal(20, 2, 40)
    assert (ratio(a, b).high - ratio(a, b).low) < (ratio(a[:4], b[:4]).high - ratio(a[:4], b[:4]).low)


def test_interval_covers_the_true_ratio_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    hits = 0
    trials = 2000
    for _ in range(trials):
        a = rng.normal(0.5, 0.05, 3)  # true ratio 0.5 / 1.0
        b = rng.normal(1.0, 0.08, 3)
        r = ratio(a, b)
        hits += r.low <= 0.5 <= r.high
    assert 0.92 <= hits / trials <= 0.985, hits / trials
    # pooled over 4 independent pairs of the same true ratio: also ~95 %
    hits = 0
    for _ in range(trials // 4):
        rs = [ratio(rng.normal(0.5, 0.05, 3), rng.normal(1.0, 0.08, 3)) for _ in range(4)]
        p = pooled(rs)
        hits += p.low <= 0.5 <= p.high
    assert 0.9 <= hits / (trials // 4) <= 0.99


def test_pairs_differ_in_one_axis_only_and_pool_per_value() -> None:
    summary = synthetic_summary(**ACCEPTANCE)
    rows = pairs(summary)
    assert sorted(rows.groupby("axis").size().items()) == [
        ("batch_size", 4), ("dataset", 4), ("engine", 4)]
    cells = summary.drop_duplicates("cell_id").set_index("cell_id")
    axes = ["model", "dataset", "gpu", "shards", "batch_size", "max_gen_len", "engine"]
    for _, row in rows.iterrows():
        a, b = cells.loc[row["cell"]], cells.loc[row["baseline_cell"]]
        differ = [ax for ax in axes if a[ax] != b[ax]]
        assert differ == [row["axis"]]
    engine = rows[rows["axis"] == "engine"]
    assert set(engine["value"]) == {"compiled"} and set(engine["baseline"]) == {"reference"}
    # J/token: power ×1.1 over tokens/s ×2 → 0.55 in every pair, exactly (repeat noise cancels)
    for r in engine["j_per_token"]:
        assert r.value == pytest.approx(0.55)
    sums = {s.axis: s for s in summarise(rows)}
    assert sums["engine"].k == 4
    assert sums["engine"].ratios["j_per_token"].value == pytest.approx(0.55)
    assert sums["engine"].ratios["tokens_per_s"].value == pytest.approx(2.0)
    sentence = sums["engine"].sentence()
    assert sentence.startswith("Engine compiled uses 0.55× (")
    assert "the energy per token of engine reference over 4 matched cell pairs" in sentence
    assert "at 2.00× (" in sentence
    assert "flagged" not in sentence
    one, two = (dataclasses.replace(sums["engine"], n_flagged=n).sentence() for n in (1, 2))
    assert one.endswith("; 1 of the pairs includes a flagged repeat.")
    assert two.endswith("; 2 of the pairs include a flagged repeat.")
    assert "No clear difference" not in sentence and "No interval" not in sentence  # 0.55×, its interval far from 1
    j = sums["engine"].ratios["j_per_token"]
    wide = dataclasses.replace(sums["engine"], ratios={"j_per_token": dataclasses.replace(j, low=0.4, high=1.3)})
    assert wide.sentence().endswith(" over 4 matched cell pairs (pair ratios 0.55–0.55). "
                                    "No clear difference in energy per token: its 95% interval contains 1×.")
    single = dataclasses.replace(j, low=math.nan, high=math.nan)
    assert "No interval (a pair without the repeats" in dataclasses.replace(
        sums["engine"], ratios={"j_per_token": single}).sentence()


def test_power_cap_baseline_is_no_cap_and_shards_pairs() -> None:
    summary = synthetic_summary(caps=(None, 250.0, 175.0), shards=(1, 2))
    sums = {(s.axis, s.value): s for s in summarise(pairs(summary))}
    cap = sums[("power_cap_w", "175 W")]
    assert cap.baseline == "default (uncapped)" and cap.k == 2
    assert cap.ratios["j_per_token"].value == pytest.approx(0.8 / 0.9)
    assert sums[("shards", "2")].ratios["avg_power_w"].value == pytest.approx(2.0)


def test_paper_findings_marked_from_the_data() -> None:
    summary = synthetic_summary(caps=(None, 175.0), shards=(1, 2), batch=(16, 64))
    found = {f.key: f for f in paper_findings(summarise(pairs(summary)), summary)}
    assert found["j_per_token_batch"].status == HOLDS
    assert found["power_shards"].status == HOLDS and found["power_batch"].status == HOLDS
    assert found["cap_saves"].status == HOLDS
    assert found["a100_faster"].status == NOT_MEASURED
    assert found["utilisation"].status == HOLDS  # 95 % GPU, 25 % memory in the helper
    assert all(f.section.startswith("§") for f in found.values())
    # the opposite data: energy per token rising with batch does not hold
    summary.loc[summary["batch_size"] == 64, "j_per_token"] *= 10
    found = {f.key: f for f in paper_findings(summarise(pairs(summary)), summary)}
    assert found["j_per_token_batch"].status == FAILS
    # one repeat per cell: the ratios have no interval, so the data do not decide a finding,
    # however far the single values fall (J/token 0.1x here): undecided, not "does not hold"
    single = synthetic_summary(shards=(1, 2), batch=(16, 64), repeats=1)
    single.loc[single["batch_size"] == 64, "j_per_token"] *= 0.1
    found = {f.key: f for f in paper_findings(summarise(pairs(single)), single)}
    assert found["j_per_token_batch"].status == UNDECIDED
    assert "no interval: fewer than 2 repeats" in found["j_per_token_batch"].evidence
    assert found["j_per_token_batch"].evidence.endswith(
        "(single repeats give no interval: 2 or more a cell can decide it)")
    # an interval that contains 1 is undecided too
    wide = synthetic_summary(shards=(1, 2), batch=(16, 64))
    b64 = wide["batch_size"] == 64
    spread = wide.loc[b64, "repeat"].map({0: 1.0, 1: 10.0, 2: 0.5})  # means ~1.1x batch 16's
    wide.loc[b64, "j_per_token"] *= spread
    found = {f.key: f for f in paper_findings(summarise(pairs(wide)), wide)}
    assert found["j_per_token_batch"].status == UNDECIDED, found["j_per_token_batch"].evidence
    assert found["j_per_token_batch"].evidence.endswith("(an interval contains 1: more repeats narrow it)")
    one = synthetic_summary()
    found = {f.key: f for f in paper_findings(summarise(pairs(one)), one)}
    assert found["j_per_token_batch"].status == NOT_MEASURED


def test_short_answer_names_the_best_setting_and_the_saving_against_reference() -> None:
    summary = synthetic_summary(**ACCEPTANCE)
    (item,) = short_answer(summary)
    assert (item["model"], item["gpu"]) == ("7B", "H200")
    assert item["config"] == "engine compiled, batch 64, cap default, dataset gsm8k"
    assert item["cell_id"] == "7B_gsm8k_H200_s1_b64_g256_pdefault_compiled"
    assert item["versus"][0].startswith("0.55× (")
    assert "45 % less energy per token" in item["versus"][0]
    assert "best reference cell (engine reference, batch 64" in item["versus"][1]
    (only_ref,) = short_answer(synthetic_summary(batch=(16, 64)))
    assert only_ref["versus"] == ["it is the only engine measured"]
    (no_ref,) = short_answer(synthetic_summary(batch=(16, 64), engines=("compiled",)))
    assert no_ref["versus"] == ["no cell ran it, so there is nothing to compare with"]
    assert item["power_source"] == "nvml"


def test_short_answer_interval_never_goes_below_zero_energy() -> None:
    """Two repeats far apart: the t-interval's lower end is below 0 J/token, which no
    measurement can be; the short answer shows 0 there, and the upper end as computed."""
    summary = synthetic_summary(**ACCEPTANCE)
    (item,) = short_answer(summary)
    best = summary["cell_id"] == item["cell_id"]
    values = summary.loc[best, "j_per_token"].to_numpy()
    assert len(values) >= 2
    summary.loc[best, "j_per_token"] = np.linspace(0.001, 0.009, len(values))  # spread, still the best
    (item,) = short_answer(summary)
    low, high = item["interval"].split("–")
    assert low == "0" and float(high) > 0.009
