from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_helpers import make_cell

from llmenergy.analysis.metrics import (
    compute_cell_metrics,
)
from llmenergy.cellfiles import METRICS_SCHEMA, SCHEMA_VERSION_KEY, Cell, CellRecord
from llmenergy.errors import UserError

SUMMARY_COLUMNS = (
    "cell_id model dataset gpu shards nodes batch_size max_gen_len power_cap_w engine repeat "
    "status n_prompts responses tokens_in tokens_out words_out duration_s tokens_per_s "
    "words_per_s responses_per_s energy_j avg_power_w j_per_token j_per_word j_per_response "
    "power_source avg_power_per_gpu_w active_energy_j idle_power_w prefill_energy_j "
    "decode_energy_j prefill_duration_s decode_duration_s latency_p50_s latency_p95_s "
    "gpu_util_pct mem_util_pct energy_instant_j energy_discrepancy_pct short_window accuracy "
    "j_per_correct gco2e reason schema_version"
).split()


def _rows(cdir: Path, **kw: object) -> list[dict]:
    return compute_cell_metrics(cdir, **kw).to_pylist()  # type: ignore[arg-type]


def test_all_summary_columns_present_with_version(tmp_path: Path) -> None:
    table = compute_cell_metrics(make_cell(tmp_path, "c1", write_metrics=False))
    missing = [c for c in SUMMARY_COLUMNS if c not in table.column_names]
    assert missing == []
    assert table.schema.equals(METRICS_SCHEMA)
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == b"1"


def test_hand_computed_energy_and_rates(tmp_path: Path) -> None:
    # 2 batches x (0.5 s prefill + 3 s decode) at 100 W on 1 GPU, 4 seqs x 16 tokens, 5 words
    cdir = make_cell(tmp_path, "c1", write_metrics=False)
    rows = _rows(cdir, grid_gco2_per_kwh=400.0)
    assert [r["repeat"] for r in rows] == [0, 1]
    r = rows[0]
    duration = 2 * 3.5
    energy = 100.0 * duration
    tokens_out = 4 * 2 * 16
    assert r["status"] == "ok" and r["reason"] is None
    assert r["duration_s"] == pytest.approx(duration)
    assert (r["responses"], r["n_prompts"], r["tokens_out"], r["words_out"]) == (8, 8, tokens_out, 40)
    assert r["tokens_in"] == 8 * 8
    assert r["tokens_per_s"] == pytest.approx(tokens_out / duration)
    assert r["words_per_s"] == pytest.approx(40 / duration)
    assert r["responses_per_s"] == pytest.approx(8 / duration)
    assert r["energy_j"] == pytest.approx(energy)
    assert r["energy_instant_j"] == pytest.approx(energy)
    assert abs(r["energy_discrepancy_pct"]) < 1e-6
    assert r["energy_method"] == "counter"
    assert r["avg_power_w"] == pytest.approx(100.0)
    assert r["j_per_token"] == pytest.approx(energy / tokens_out)
    assert r["j_per_word"] == pytest.approx(energy / 40)
    assert r["j_per_response"] == pytest.approx(energy / 8)
    assert r["idle_power_w"] == pytest.approx(50.0)
    assert r["active_energy_j"] == pytest.approx(energy - 50.0 * duration)
    # the 0.5 s prefill windows are under 10 update periods of a 100 ms sensor: null, said why
    assert r["update_period_s"] == pytest.approx(0.1)
    assert r["prefill_energy_j"] is None
    assert "prefill_energy_j null: 2 of 2 window(s)" in r["energy_reason"]
    assert r["decode_energy_j"] == pytest.approx(100.0 * 2 * 3.0)
    assert r["energy_complete"] is True
    assert (r["prefill_duration_s"], r["decode_duration_s"]) == pytest.approx((1.0, 6.0))
    assert r["latency_p50_s"] == pytest.approx(3.5)
    assert r["latency_p95_s"] == pytest.approx(3.5)
    assert r["gpu_util_pct"] == pytest.approx(90.0)
    assert r["short_window"] is False
    assert r["gco2e"] == pytest.approx(energy / 3.6e6 * 400.0)
    assert r["power_source"] == "nvml"
    assert r["weights_synthetic"] is True
    assert r["accuracy"] is None and r["j_per_correct"] is None


def test_multi_gpu_sum_per_gpu_average_and_short_window(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c2", shards=2, n_batches=1, decode_s=2.0, power_w=150.0,
                     repeats=1, write_metrics=False)
    (r,) = _rows(cdir)
    assert r["n_devices"] == 2
    assert r["energy_j"] == pytest.approx(2 * 150.0 * 2.5)
    assert r["avg_power_w"] == pytest.approx(300.0)
    assert r["avg_power_per_gpu_w"] == pytest.approx(150.0)
    assert r["short_window"] is True  # 2.5 s < 5 s


def test_latency_percentiles_over_batches(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c3", n_batches=4, repeats=1, write_metrics=False)
    (r,) = _rows(cdir)
    assert r["latency_p50_s"] == pytest.approx(3.5)
    assert r["duration_s"] == pytest.approx(14.0)


def test_accuracy_and_j_per_correct(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c4", dataset="gsm8k", correct=True, repeats=1, write_metrics=False)
    (r,) = _rows(cdir)
    assert r["accuracy"] == pytest.approx(1.0)
    assert r["j_per_correct"] == pytest.approx(700.0 / 8)


def test_no_power_data_gives_null_energy_and_source_none(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c5", power="none", write_metrics=False)
    rows = _rows(cdir)
    assert all(r["power_source"] == "none" for r in rows)
    assert all(r["energy_j"] is None and r["j_per_token"] is None for r in rows)
    assert rows[0]["tokens_per_s"] == pytest.approx(128 / 7)


def test_estimate_uses_instant_integral(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c6", power="estimate", repeats=1, write_metrics=False)
    (r,) = _rows(cdir)
    assert r["power_source"] == "estimate"
    assert r["energy_method"] == "instant_integral"
    assert r["energy_j"] == pytest.approx(700.0)
    assert r["energy_discrepancy_pct"] is None


def test_failed_cell_without_files_gives_status_rows(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c7", status="oom", reason="CUDA out of memory",
                     write_events=False, write_metrics=False)
    rows = _rows(cdir)
    assert [r["repeat"] for r in rows] == [0, 1]
    assert {r["status"] for r in rows} == {"oom"}
    assert rows[0]["reason"] == "CUDA out of memory"
    assert rows[0]["energy_j"] is None and rows[0]["duration_s"] is None
    assert rows[0]["model"] == "tiny" and rows[0]["batch_size"] == 4


def test_status_derived_when_no_cell_json(tmp_path: Path) -> None:
    cdir = tmp_path / "cells" / "bare"
    cdir.mkdir(parents=True)
    (r,) = _rows(cdir)
    assert r["status"] == "incomplete" and r["cell_id"] == "bare"
    assert "no events" in r["reason"]
    with pytest.raises(UserError, match="does not exist"):
        compute_cell_metrics(tmp_path / "nope")


def test_missing_repeat_becomes_incomplete(tmp_path: Path) -> None:
    cdir = make_cell(tmp_path, "c8", repeats=1, write_metrics=False)
    spec = (cdir / "spec.json").read_text().replace('"repeats": 1', '"repeats": 3')
    (cdir / "spec.json").write_text(spec)
    (cdir / "cell.json").unlink()
    rows = _rows(cdir)
    assert [r["status"] for r in rows] == ["ok", "incomplete", "incomplete"]
    assert "repeat 1" in rows[1]["reason"]


def test_status_document_and_grid_from_spec(tmp_path: Path) -> None:
    # launch passes the cell.json document it is about to write, before writing it
    cdir = make_cell(tmp_path, "c9", repeats=1, write_metrics=False)
    (cdir / "cell.json").unlink()
    spec = json.loads((cdir / "spec.json").read_text())
    (cdir / "spec.json").write_text(json.dumps({**spec, "grid_gco2_per_kwh": 200}))
    cell = Cell.from_identity({**spec["cell"], "model": "other"})
    doc = CellRecord(cell=cell, status="oom", reason="CUDA OOM", repeats=1, launcher="local")
    (r,) = _rows(cdir, record=doc)
    assert (r["status"], r["reason"], r["model"]) == ("oom", "CUDA OOM", "other")
    assert r["gco2e"] == pytest.approx(700.0 / 3.6e6 * 200)


def test_words_out_from_text_when_column_absent(tmp_path: Path) -> None:
    import pandas as pd

    cdir = make_cell(tmp_path, "c10", repeats=1, write_metrics=False)
    resp = pd.read_parquet(cdir / "responses.parquet").drop(columns=["words_out"])
    resp["text"] = [" two  words\n"] * (len(resp) - 1) + ["three words here"]
    resp.to_parquet(cdir / "responses.parquet")
    (r,) = _rows(cdir)
    assert r["words_out"] == 2 * (len(resp) - 1) + 3



# --------------------------------------------------------------------------- #
# Over a synthetic NVML trace (trace_helpers): resolution, coverage, EOS
# --------------------------------------------------------------------------- #

def _phase_truth(tl, repeat: int, phase: str) -> float:  # type: ignore[no-untyped-def]
    return float(tl.loc[(tl["repeat"] == repeat) & (tl["phase"] == phase), "energy_j"].sum())


def test_phases_below_the_sensor_resolution_are_null_with_a_reason(tmp_path: Path) -> None:
    from trace_helpers import edge_bound_j, write_trace_cell

    cdir, tl = write_trace_cell(tmp_path)
    r0, r1 = _rows(cdir)
    assert r0["update_period_s"] == pytest.approx(0.1) == r1["update_period_s"]
    # repeat 0: prefills of 0.08 and 0.06 s, a 0.53 s decode: both phase energies null, said why
    assert r0["prefill_energy_j"] is None and r0["decode_energy_j"] is None
    assert "prefill_energy_j null: 2 of 2 window(s) last 0.060-0.080 s" in r0["energy_reason"]
    assert "decode_energy_j null: 1 of 2 window(s) last 0.530 s" in r0["energy_reason"]
    # each says what in the config lengthens its windows
    clauses = dict(c.split(" null: ", 1) for c in r0["energy_reason"].split("; "))
    assert clauses["decode_energy_j"].endswith("a longer max_gen_len lengthens each decode window")
    assert "collector.prefill_window_s" in clauses["prefill_energy_j"]
    # ... while the repeat's total, contiguous batch windows of 12.1 and 0.6 s, is published
    batches = tl[(tl["repeat"] == 0) & tl["phase"].notna()]
    assert r0["energy_j"] == pytest.approx(batches["energy_j"].sum(), rel=0.005)
    assert r0["short_window"] is False and r0["energy_complete"] is True
    # repeat 1 is resolved: decode within 0.1 %, prefill (1.2-1.5 s windows) within its edge bound
    assert r1["decode_energy_j"] == pytest.approx(_phase_truth(tl, 1, "decode"), rel=0.001)
    prefill_idx = tl.index[(tl["repeat"] == 1) & (tl["phase"] == "prefill")]
    assert abs(r1["prefill_energy_j"] - _phase_truth(tl, 1, "prefill")) <= sum(
        edge_bound_j(tl, i) for i in prefill_idx)
    # only the cell's balance is left with a reason: repeat 0's 0.59 s batch blurs measured vs gaps
    assert r1["energy_reason"] == r0["energy_reason"].split("; ")[-1]
    assert r1["energy_reason"].startswith("balance_measured_j null: 1 of 4 window(s) last 0.590 s")
    # idle: 5.04 s at 120 W
    assert r1["idle_power_w"] == pytest.approx(120.0, rel=0.001)


def test_short_idle_window_gives_null_idle_power_and_active_energy(tmp_path: Path) -> None:
    from trace_helpers import Segment, standard_segments, write_trace_cell

    segs = [Segment("idle", 0.7, 120) if s.phase == "idle" else s for s in standard_segments()]
    cdir, _ = write_trace_cell(tmp_path, segments=segs)
    for r in _rows(cdir):
        assert r["idle_power_w"] is None and r["active_energy_j"] is None
        assert "idle_power_w null: 1 of 1 window(s) last 0.700 s" in r["energy_reason"]
        assert "idle_power_w null: 1 of 1 window(s) last 0.700 s, under 10 sensor update periods (1.00 s), " \
            "a longer collector.idle_baseline_s resolves it" in r["energy_reason"]
        assert "balance_idle_j null" in r["energy_reason"]
        assert r["energy_j"] is not None and r["energy_complete"] is True


def test_a_gpu_of_the_ranks_without_samples_nulls_the_energy_and_names_it(tmp_path: Path) -> None:
    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import write_trace_cell

    gpus = [{"node": "node0", "rank": 0, "uuid": "GPU-0000", "name": "H200", "index": 0},
            {"node": "node1", "rank": 1, "uuid": "GPU-0001", "name": "H200", "index": 0}]
    cdir, _ = write_trace_cell(tmp_path, gpus=gpus)
    table = compute_cell_metrics(cdir)
    for r in table.to_pylist():
        assert r["energy_j"] is None and r["j_per_token"] is None and r["energy_instant_j"] is None
        assert r["prefill_energy_j"] is None and r["decode_energy_j"] is None
        assert "energy_j null: no power samples of node1/GPU-0001 (rank 1)" in r["energy_reason"]
        assert r["energy_complete"] is False
        assert r["tokens_per_s"] is not None  # the rest of the row stands
    why = energy_incomplete_reason(table)
    assert why is not None and "2 repeat(s)" in why and "node1/GPU-0001" in why


def test_a_device_whose_samples_stop_early_nulls_the_later_repeat_and_names_it(tmp_path: Path) -> None:
    import pandas as pd

    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    gpus = [{"node": "node0", "rank": 0, "uuid": "GPU-0000", "name": "H200", "index": 0},
            {"node": "node1", "rank": 1, "uuid": "GPU-0001", "name": "H200", "index": 0}]
    power = pd.concat([nvml_trace(tl), nvml_trace(tl, device="GPU-0001", node="node1", stop_s=60.0)])
    cdir, _ = write_trace_cell(tmp_path, gpus=gpus, power=power)
    r0, r1 = _rows(cdir)
    assert r0["energy_j"] is not None and r0["energy_complete"] is True and r0["n_devices"] == 2
    assert r1["energy_j"] is None and r1["energy_complete"] is False
    assert "energy_j null: the samples of node1/GPU-0001 do not cover 3 of 4 window(s)" in r1["energy_reason"]
    assert r1["balance_total_j"] is None
    why = energy_incomplete_reason(compute_cell_metrics(cdir))
    assert why is not None and "repeat 1" in why and "node1/GPU-0001" in why


def test_a_cell_run_without_a_collector_is_not_energy_incomplete(tmp_path: Path) -> None:
    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import write_trace_cell

    cdir, _ = write_trace_cell(tmp_path, collector="none")
    table = compute_cell_metrics(cdir)
    assert all(r["energy_j"] is None and r["energy_complete"] is None for r in table.to_pylist())
    assert energy_incomplete_reason(table) is None


def test_metered_cell_without_any_power_file_is_energy_incomplete(tmp_path: Path) -> None:
    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import write_trace_cell

    cdir, _ = write_trace_cell(tmp_path)
    (cdir / "power.parquet").unlink()
    table = compute_cell_metrics(cdir)
    r = table.to_pylist()[0]
    assert r["energy_complete"] is False and "no power samples of node0/GPU-0000" in r["energy_reason"]
    assert energy_incomplete_reason(table) is not None


def test_tokens_after_eos_summed_from_responses(tmp_path: Path) -> None:
    from trace_helpers import write_trace_cell

    after = [0, 3, 16, 0] * 4  # per prompt: no EOS, EOS at the 14th token, EOS first, no EOS
    cdir, _ = write_trace_cell(tmp_path, tokens_after_eos=after)
    r0, r1 = _rows(cdir)
    assert (r0["tokens_after_eos"], r1["tokens_after_eos"]) == (2 * 19, 2 * 19)
    assert r0["tokens_out"] == 8 * 16  # every generated token, EOS or not
    # not recorded (older worker): unknown under stop_at_eos false, 0 under true
    cdir2, _ = write_trace_cell(tmp_path, "old")
    assert {r["tokens_after_eos"] for r in _rows(cdir2)} == {None}
    cdir3, _ = write_trace_cell(tmp_path, "eos", stop_at_eos=True)
    assert {r["tokens_after_eos"] for r in _rows(cdir3)} == {0}


def test_cpu_ranks_with_only_rapl_samples_are_not_energy_incomplete(tmp_path: Path) -> None:
    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import nvml_trace, standard_segments, timeline, write_trace_cell

    rapl = nvml_trace(timeline(standard_segments()), device="cpu-package-0").assign(
        domain="cpu_package", source="rapl")
    cpu = [{"node": "node0", "rank": 0, "uuid": "cpu", "name": "cpu", "index": -1}]
    cdir, tl = write_trace_cell(tmp_path, gpus=cpu, power=rapl, collector="auto")
    table = compute_cell_metrics(cdir)
    for r in table.to_pylist():
        assert r["energy_j"] is None and r["cpu_energy_j"] is not None
        assert r["energy_complete"] is None and r["balance_total_j"] is None
    assert energy_incomplete_reason(table) is None
    # the same cell on a GPU rank whose collector wrote only RAPL rows is incomplete
    gpu = [{"node": "node0", "rank": 0, "uuid": "GPU-0000", "name": "H200", "index": 0}]
    cdir2, _ = write_trace_cell(tmp_path, "gpu", gpus=gpu, power=rapl, collector="auto")
    assert "node0/GPU-0000" in (energy_incomplete_reason(compute_cell_metrics(cdir2)) or "")


def test_a_rapl_trace_that_stops_early_nulls_cpu_energy_with_a_reason_not_the_cell(tmp_path: Path) -> None:
    from trace_helpers import nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    stop = float(tl.loc[tl["phase"] == "decode", "end_s"].iloc[2]) - 1.0  # inside repeat 1's first decode
    rapl = nvml_trace(tl, device="cpu-package-0", period_s=0.001, stop_s=stop).assign(
        domain="cpu_package", source="rapl", power_w=np.nan)
    cdir, _ = write_trace_cell(tmp_path, power=pd.concat([nvml_trace(tl), rapl], ignore_index=True))
    r0, r1 = _rows(cdir)
    assert r0["cpu_energy_j"] is not None and "cpu_energy_j" not in (r0["energy_reason"] or "")
    assert r1["cpu_energy_j"] is None and r1["energy_j"] is not None and r1["status"] == "ok"
    assert "cpu_energy_j null: 3 of 4 window(s), e.g. the samples of node0/cpu-package-0 do not cover it" \
        in r1["energy_reason"]


def test_a_clock_offset_above_5_ms_is_flagged_not_nulled(tmp_path: Path) -> None:
    from trace_helpers import write_trace_cell

    from llmenergy.analysis.metrics import compute_cell_metrics

    cdir, _ = write_trace_cell(tmp_path)
    ok = compute_cell_metrics(cdir).to_pandas()
    assert ok["clock_offset_max_ms"].isna().all()  # not measured: no value, no flag
    doc = json.loads((cdir / "cell.json").read_text())
    doc["provenance"]["clock_offsets_ns"] = {"node0": 0, "node1": -7_250_000}
    (cdir / "cell.json").write_text(json.dumps(doc))
    flagged = compute_cell_metrics(cdir).to_pandas()
    assert flagged["clock_offset_max_ms"].tolist() == pytest.approx([7.25, 7.25])
    assert flagged["energy_j"].notna().all() and flagged["energy_j"].tolist() == ok["energy_j"].tolist()
    assert all("clock of node node1 off rank 0's by -7.2 ms" in r for r in flagged["energy_reason"])
    doc["provenance"]["clock_offsets_ns"] = {"node0": 0, "node1": 4_900_000}
    (cdir / "cell.json").write_text(json.dumps(doc))
    small = compute_cell_metrics(cdir).to_pandas()
    assert small["clock_offset_max_ms"].tolist() == pytest.approx([4.9, 4.9])
    assert not any("clock" in (r or "") for r in small["energy_reason"])


def test_the_measured_prefill_is_published_when_its_loop_is_resolved(tmp_path: Path) -> None:
    """Each repeat's prefill-only loop: its energy and J per prompt token, outside energy_j;
    a loop under ten update periods is null with a reason."""
    import pandas as pd
    from trace_helpers import Segment, edge_bound_j, standard_segments, write_trace_cell

    from llmenergy.atomic import write_parquet

    segs = standard_segments()
    segs.insert(12, Segment("prefill_only", 6.02, 600, 0))  # after repeat 0's last decode
    segs.insert(19, Segment("prefill_only", 0.52, 610, 1))  # after repeat 1's: too short
    cdir, tl = write_trace_cell(tmp_path, segments=segs)
    events = pd.read_parquet(cdir / "events.parquet")
    loops = events["phase"] == "prefill_only"
    assert list(events.loc[loops, "repeat"]) == [0, 1]
    events.loc[loops, "tokens_in"] = [4000, 320]
    write_parquet(cdir / "events.parquet", events)
    r0, r1 = _rows(cdir)
    loop0 = tl.index[(tl["phase"] == "prefill_only") & (tl["repeat"] == 0)][0]
    assert r0["prefill_only_duration_s"] == pytest.approx(6.02)
    assert r0["prefill_only_tokens_in"] == 4000
    assert abs(r0["prefill_only_energy_j"] - 600 * 6.02) <= edge_bound_j(tl, loop0)
    assert r0["prefill_j_per_token_in"] == pytest.approx(600 * 6.02 / 4000, rel=0.005)
    # the loop is not part of the repeat's energy: that is still its batches' alone
    batches = tl[(tl["repeat"] == 0) & tl["phase"].isin(["prefill", "decode"])]
    assert r0["energy_j"] == pytest.approx(batches["energy_j"].sum(), rel=0.005)
    assert "prefill_only_energy_j" not in r0["energy_reason"]
    assert r1["prefill_only_duration_s"] == pytest.approx(0.52) and r1["prefill_only_tokens_in"] == 320
    assert r1["prefill_only_energy_j"] is None and r1["prefill_j_per_token_in"] is None
    assert "prefill_only_energy_j null: 1 of 1 window(s) last 0.520 s" in r1["energy_reason"]
    assert "balance_prefill_only_j null: 1 of 2 window(s)" in r1["energy_reason"]


def _trace_without(tl, lo_s: float, hi_s: float):
    """The synthetic NVML trace of ``tl`` with no sample from ``lo_s`` to ``hi_s`` (missed polls)."""
    from trace_helpers import T0_NS, nvml_trace

    power = nvml_trace(tl)
    t_s = (power["timestamp_ns"] - T0_NS) / 1e9
    return power[(t_s < lo_s) | (t_s > hi_s)].reset_index(drop=True)


def test_a_repeat_whose_window_ends_in_a_gap_of_the_samples_is_withheld_with_the_gap_named(tmp_path: Path) -> None:
    from llmenergy.analysis.metrics import energy_incomplete_reason

    from trace_helpers import standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    # 2.5 s without samples around the end of repeat 1's first decode (69.68 s) and the next prefill
    cdir, _ = write_trace_cell(tmp_path, power=_trace_without(tl, 68.0, 70.5))
    table = compute_cell_metrics(cdir)
    r0, r1 = table.to_pylist()
    assert r0["energy_j"] is not None and r0["energy_complete"] is True
    assert r1["energy_j"] is None and r1["j_per_token"] is None and r1["energy_complete"] is False
    assert r1["energy_reason"].startswith("energy_j null: 2 of 4 window(s) begin or end in a gap of up to 2.5")
    assert "over 20 sensor update periods" in r1["energy_reason"]
    assert "energy_j null" in (energy_incomplete_reason(table) or "")


@pytest.mark.parametrize(("lo_s", "hi_s", "flagged"), [(69.0, 70.4, True), (69.4, 69.9, False)])
def test_an_edge_in_a_gap_between_10_and_20_update_periods_keeps_its_energy_flagged(
        tmp_path: Path, lo_s: float, hi_s: float, flagged: bool) -> None:
    from llmenergy.analysis.flags import HEADLINE_COLUMNS, row_flags

    from trace_helpers import standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    # around the end of repeat 1's first decode (69.68 s): 1.4 s of missed polls (flagged), 0.5 s (not)
    cdir, _ = write_trace_cell(tmp_path, power=_trace_without(tl, lo_s, hi_s))
    r1 = _rows(cdir)[1]
    truth = tl[(tl["repeat"] == 1) & tl["phase"].notna()]["energy_j"].sum()
    assert r1["energy_j"] == pytest.approx(truth, rel=0.01) and r1["energy_complete"] is True
    note = "energy_j interpolated across a gap in the power samples: 2 of 4 window(s) begin or end in a gap"
    assert (note in (r1["energy_reason"] or "")) is flagged
    assert ("interpolated across a gap" in row_flags(pd.DataFrame([r1]), HEADLINE_COLUMNS).iloc[0]) is flagged


def test_a_gap_of_the_samples_inside_a_window_leaves_its_counter_energy(tmp_path: Path) -> None:
    from trace_helpers import standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    cdir, _ = write_trace_cell(tmp_path, power=_trace_without(tl, 60.0, 65.0))  # inside a 12 s decode
    r1 = _rows(cdir)[1]
    truth = tl[(tl["repeat"] == 1) & tl["phase"].notna()]["energy_j"].sum()
    assert r1["energy_j"] == pytest.approx(truth, rel=0.005) and r1["energy_complete"] is True
    assert r1["energy_instant_j"] is None  # the instant integral would interpolate across it


def test_a_counter_reset_in_a_repeat_withholds_its_energy_and_the_balance_says_why(tmp_path: Path) -> None:
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl)
    power.loc[power["timestamp_ns"] > T0_NS + 63 * 10**9, "energy_mj"] -= 5e6  # inside repeat 1's decode
    cdir, _ = write_trace_cell(tmp_path, power=power)
    r0, r1 = _rows(cdir)
    assert r0["energy_j"] is not None
    assert r1["energy_j"] is None and r1["energy_complete"] is False
    assert r1["energy_reason"].startswith("energy_j null: the energy counter went down in 1 of 4 window(s)")
    assert r1["balance_total_j"] is None
    assert "balance_total_j null: the energy counter went down in the cell's span" in r1["energy_reason"]


def test_an_idle_window_the_samples_do_not_cover_says_so(tmp_path: Path) -> None:
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl)
    cdir, _ = write_trace_cell(tmp_path, power=power[power["timestamp_ns"] > T0_NS + 7 * 10**9])
    for r in _rows(cdir):
        assert r["idle_power_w"] is None and r["active_energy_j"] is None
        assert "idle_power_w null: the samples of node0/GPU-0000 do not cover 1 of 1 window(s)" in r["energy_reason"]


def test_a_run_that_ended_ok_with_a_repeat_missing_is_incomplete(tmp_path: Path) -> None:
    import pandas as pd

    from llmenergy.analysis.metrics import energy_incomplete_reason
    from llmenergy.atomic import write_parquet

    from trace_helpers import write_trace_cell

    cdir, _ = write_trace_cell(tmp_path)
    events = pd.read_parquet(cdir / "events.parquet")
    write_parquet(cdir / "events.parquet", events[events["repeat"] != 1].reset_index(drop=True))
    table = compute_cell_metrics(cdir)
    assert [r["status"] for r in table.to_pylist()] == ["ok", "incomplete"]
    # the launcher records the cell incomplete with this line, so it is rerun, not ranked
    assert energy_incomplete_reason(table) == ("1 of 2 repeat(s) not measured "
                                               "(repeat 1: no prefill/decode events for repeat 1)")


def test_energy_integrated_from_nvml_averaged_power_is_flagged(tmp_path: Path) -> None:
    from trace_helpers import nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl).assign(source="nvml-avg")
    cdir, _ = write_trace_cell(tmp_path, "avg", power=power)
    assert not any("averaged power" in (r["energy_reason"] or "") for r in _rows(cdir))  # the counter
    cdir2, _ = write_trace_cell(tmp_path, "avg-nocounter", power=power.assign(energy_mj=np.nan))
    for r in _rows(cdir2):
        assert r["energy_method"] == "instant_integral" and r["power_source"] == "nvml-avg"
        assert "energy_j from NVML's averaged power" in r["energy_reason"]


def test_a_gpu_counting_another_process_during_a_repeat_is_flagged(tmp_path: Path) -> None:
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl).assign(other_processes=0)
    t_s = (power["timestamp_ns"] - T0_NS) / 1e9
    power.loc[(t_s > 60.0) & (t_s < 61.0), "other_processes"] = 1  # inside repeat 1's first decode
    cdir, _ = write_trace_cell(tmp_path, power=power)
    r0, r1 = _rows(cdir)
    assert "shared" not in (r0["energy_reason"] or "")
    assert r1["energy_j"] is not None and r1["energy_complete"] is True
    assert ("energy_j shared: 1 of 4 window(s) ran while node0/GPU-0000 (1) counted other processes holding"
            in r1["energy_reason"])


def test_a_gpu_counting_another_process_during_the_idle_window_flags_idle_power(tmp_path: Path) -> None:
    from llmenergy.analysis.flags import row_flags
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl).assign(other_processes=0)
    t_s = (power["timestamp_ns"] - T0_NS) / 1e9
    power.loc[(t_s > 2.0) & (t_s < 3.0), "other_processes"] = 2  # inside the idle window (1.03-6.07 s)
    cdir, _ = write_trace_cell(tmp_path, power=power)
    rows = _rows(cdir)
    for r in rows:
        assert r["idle_power_w"] is not None  # kept, flagged
        assert ("idle_power_w shared: 1 of 1 window(s) ran while node0/GPU-0000 (2) counted other "
                "processes" in r["energy_reason"])
        assert "energy_j shared" not in r["energy_reason"]  # no repeat's window was shared
    df = pd.DataFrame(rows)
    # a figure of active energy (idle subtracted) is hollowed; one of total energy is not
    assert all("idle_power_w shared" in f for f in row_flags(df, ["idle_power_w"]))
    assert not any("shared" in f for f in row_flags(df, ["energy_j"]))
    # active_energy_j subtracts the idle power: its figure is hollowed too
    assert all("idle_power_w shared" in f for f in row_flags(df, ["energy_j", "active_energy_j"]))


def test_an_idle_window_both_shared_and_in_a_wide_gap_keeps_both_notes(tmp_path: Path, caplog) -> None:
    from llmenergy.analysis.flags import reason_clauses
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    power = nvml_trace(tl).assign(other_processes=0)
    t_s = (power["timestamp_ns"] - T0_NS) / 1e9
    power.loc[(t_s > 2.0) & (t_s < 3.0), "other_processes"] = 1
    power = power[(t_s < 0.3) | (t_s > 1.8)]  # polls missed over 1.5 s around the idle window's start (1.03 s)
    cdir, _ = write_trace_cell(tmp_path, power=power)
    for r in _rows(cdir):
        assert r["idle_power_w"] is not None
        idle = [c for column, c in reason_clauses(r["energy_reason"]) if column == "idle_power_w"]
        assert [c.split(" ")[1] for c in idle] == ["interpolated", "shared:"], idle
    assert "energy_reason clause holds" not in caplog.text  # each written as one clause


def test_a_rapl_edge_in_a_gap_of_one_to_two_seconds_keeps_cpu_energy_flagged(tmp_path: Path) -> None:
    from llmenergy.analysis.flags import row_flags
    from trace_helpers import T0_NS, nvml_trace, standard_segments, timeline, write_trace_cell

    tl = timeline(standard_segments())
    start = float(tl.loc[tl["phase"] == "decode", "start_s"].iloc[2])  # repeat 1's first decode
    rapl = nvml_trace(tl, device="cpu-package-0", period_s=0.001).assign(
        domain="cpu_package", source="rapl", power_w=np.nan)
    t_s = (rapl["timestamp_ns"] - T0_NS) / 1e9
    # polls missed over 1.5 s around the window's start: over 10 x 100 ms, under the 2 s limit
    rapl = rapl[(t_s < start - 0.75) | (t_s > start + 0.75)]
    cdir, _ = write_trace_cell(tmp_path, power=pd.concat([nvml_trace(tl), rapl], ignore_index=True))
    r0, r1 = _rows(cdir)
    assert "cpu_energy_j" not in (r0["energy_reason"] or "")
    assert r1["cpu_energy_j"] is not None and r1["status"] == "ok"
    # the prefill before that decode ends in the same gap: two of the repeat's four windows
    assert ("cpu_energy_j interpolated across a gap in the RAPL samples: 2 of 4 window(s) begin or end "
            "in a gap of up to 1.52 s (over 10 RAPL poll periods" in r1["energy_reason"])
    # a flag on the CPU's energy: figures of the GPU's energy keep their points filled
    assert row_flags(pd.DataFrame([r1]), ["energy_j", "j_per_token"]).iloc[0] == ""
    assert "RAPL samples" in row_flags(pd.DataFrame([r1]), ["cpu_energy_j"]).iloc[0]
