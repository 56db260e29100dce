from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmenergy.analysis.energy import attribute_events
from trace_helpers import device_samples as _device

S = 10**9


def _events(windows: list[tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame({
        "cell_id": "c", "repeat": np.int32(0), "phase": "decode",
        "batch_index": np.arange(len(windows), dtype=np.int32),
        "start_ns": [int(a * S) for a, _ in windows], "end_ns": [int(b * S) for _, b in windows],
        "n_seqs": np.int32(1), "tokens_in": 0, "tokens_out": 10,
    })


def test_counter_interpolated_between_samples() -> None:
    # counter sampled each 1 s, 250 W constant: E(t) = 250 000 mJ * t (+ offset)
    t = np.arange(0, 11, 1.0)
    dev = _device("GPU-a", t, 1e6 + 250_000.0 * t, None)
    att = attribute_events(_events([(1.25, 3.75)]), dev)
    # window of 2.5 s inside samples: 250 W * 2.5 s = 625 J, boundaries between samples
    assert att.loc[0, "energy_j"] == pytest.approx(625.0)
    assert att.loc[0, "duration_s"] == pytest.approx(2.5)
    assert att.loc[0, "avg_power_w"] == pytest.approx(250.0)
    assert bool(att.loc[0, "short_window"]) is True
    assert np.isnan(att.loc[0, "energy_instant_j"])
    assert att.loc[0, "n_devices"] == 1
    assert att.loc[0, "power_source"] == "nvml"


def test_instant_trapezoid_on_linear_ramp_and_two_devices_sum() -> None:
    t = np.arange(0, 21, 0.5)
    ramp = 100.0 + 10.0 * t  # W, linear: trapezoid is exact
    const = np.full(len(t), 200.0)
    power = pd.concat([_device("GPU-a", t, None, ramp), _device("GPU-b", t, None, const)])
    att = attribute_events(_events([(2.2, 12.2)]), power)
    # ∫ 100+10t dt from 2.2 to 12.2 = 100*10 + 5*(12.2² - 2.2²) = 1000 + 720 = 1720; plus 200*10
    assert att.loc[0, "energy_instant_j"] == pytest.approx(1720.0 + 2000.0)
    assert att.loc[0, "n_devices"] == 2
    assert bool(att.loc[0, "short_window"]) is False
    assert np.isnan(att.loc[0, "energy_j"])  # no counter on either device
    assert att.loc[0, "avg_power_w"] == pytest.approx(372.0)  # falls back to the integral
    assert att.loc[0, "max_sample_gap_s"] == pytest.approx(0.5)
    assert att.loc[0, "gpu_util_pct"] == pytest.approx(80.0)


def test_discrepancy_between_counter_and_instant() -> None:
    t = np.arange(0, 11, 0.1)
    p = np.full(len(t), 300.0)
    counter = 300_000.0 * t * 1.02  # counter reads 2 % high
    att = attribute_events(_events([(1.0, 9.0)]), _device("GPU-a", t, counter, p))
    assert att.loc[0, "energy_j"] == pytest.approx(300 * 8 * 1.02)
    assert att.loc[0, "energy_instant_j"] == pytest.approx(2400.0)
    assert att.loc[0, "energy_discrepancy_pct"] == pytest.approx(100 * (1 / 1.02 - 1))


def test_event_outside_sampled_range_is_null_and_flagged() -> None:
    t = np.arange(0, 11, 1.0)
    dev = _device("GPU-a", t, 250_000.0 * t, np.full(len(t), 250.0))
    att = attribute_events(_events([(-1.0, 2.0), (9.0, 12.0), (2.0, 8.0)]), dev)
    assert att["energy_j"].isna().tolist() == [True, True, False]
    assert att["energy_instant_j"].isna().tolist() == [True, True, False]
    assert att["power_out_of_range"].tolist() == [True, True, False]
    assert att.loc[2, "energy_j"] == pytest.approx(1500.0)


def test_one_device_not_covering_makes_sum_null() -> None:
    t = np.arange(0, 11, 1.0)
    late = np.arange(5, 11, 1.0)
    power = pd.concat([_device("GPU-a", t, 100_000.0 * t, None),
                       _device("GPU-b", late, 100_000.0 * late, None)])
    att = attribute_events(_events([(1.0, 4.0), (6.0, 9.0)]), power)
    assert np.isnan(att.loc[0, "energy_j"])  # no partial sum over only GPU-a
    assert att.loc[1, "energy_j"] == pytest.approx(600.0)
    assert att["n_devices"].tolist() == [1, 2]


def test_cpu_domains_kept_apart_from_gpu_energy() -> None:
    t = np.arange(0, 11, 1.0)
    power = pd.concat([
        _device("GPU-a", t, 200_000.0 * t, None),
        _device("cpu-package-0", t, 50_000.0 * t, None, domain="cpu_package", source="rapl"),
        _device("dram-0", t, 10_000.0 * t, None, domain="dram", source="rapl"),
    ])
    att = attribute_events(_events([(2.0, 6.0)]), power)
    assert att.loc[0, "energy_j"] == pytest.approx(800.0)
    assert att.loc[0, "cpu_energy_j"] == pytest.approx(240.0)
    assert att.loc[0, "n_devices"] == 1
    assert att.loc[0, "power_source"] == "nvml"


def test_cpu_energy_withheld_with_its_reason_at_a_gap_a_reset_or_a_device_short() -> None:
    # RAPL read every 40 ms at 50 W; the GPU's counter covers everything
    t = np.round(np.arange(0, 20.0001, 0.04), 3)
    gpu = _device("GPU-a", t, 200_000.0 * t, None)
    rapl = 50_000.0 * t
    gap = (t < 4.0) | (t > 7.0)  # missed polls from 3.96 to 7.04 s hold the edge at 5 s
    late = (t < 12.0) | (t > 12.7)  # 0.7 s late polls (a loaded host) inside a window
    drop = np.where(t >= 15.0, rapl - 800_000.0, rapl)  # a reset at 15 s
    keep = gap & late
    power = pd.concat([
        gpu,
        _device("cpu-package-0", t[keep], drop[keep], None, domain="cpu_package", source="rapl"),
        _device("cpu-dram-0", t[t < 18.0], 5_000.0 * t[t < 18.0], None, domain="dram", source="rapl"),
    ])
    att = attribute_events(_events([(1.0, 3.0), (5.0, 6.0), (11.0, 13.0), (14.0, 16.0), (17.0, 19.0)]), power)
    assert att["energy_j"].notna().all()  # the GPU's energy is untouched
    assert att.loc[0, "cpu_energy_j"] == pytest.approx(2 * 55.0)
    assert att.loc[2, "cpu_energy_j"] == pytest.approx(2 * 55.0)  # late polls are interpolated
    assert att["cpu_energy_j"].isna().tolist() == [False, True, False, True, True]
    assert att.loc[[0, 2], "cpu_energy_null"].isna().all()
    assert "gap of up to 3.08 s in the RAPL samples" in att.loc[1, "cpu_energy_null"]
    assert "went down" in att.loc[3, "cpu_energy_null"]
    assert "cpu-dram-0 do not cover" in att.loc[4, "cpu_energy_null"]


def test_no_power_gives_null_energy_and_source_none() -> None:
    att = attribute_events(_events([(0.0, 10.0)]), None)
    assert np.isnan(att.loc[0, "energy_j"]) and np.isnan(att.loc[0, "energy_instant_j"])
    assert att.loc[0, "power_source"] == "none"
    assert att.loc[0, "n_devices"] == 0


def test_counter_reset_inside_window_is_null() -> None:
    t = np.arange(0, 11, 1.0)
    counter = np.where(t < 5, 1e9 + 100_000.0 * t, 100_000.0 * t)
    att = attribute_events(_events([(3.0, 7.0), (6.0, 9.0)]), _device("GPU-a", t, counter, None))
    assert np.isnan(att.loc[0, "energy_j"])
    assert att.loc[1, "energy_j"] == pytest.approx(300.0)


def test_staircase_counter_is_interpolated_between_its_updates() -> None:
    """A counter updated every 100 ms, polled at 50 Hz, under a constant 300 W.

    Interpolating the raw staircase would put up to one 30 J step on the wrong
    side of an edge; interpolating between update instants recovers the energy.
    """
    import numpy as np
    import pandas as pd

    from llmenergy.analysis.energy import attribute_events

    t0 = 1_000_000_000_000
    poll_ns = np.arange(0, 10_000_000_000, 20_000_000)  # 50 Hz for 10 s
    update_ns = (poll_ns // 100_000_000) * 100_000_000  # last 100 ms update before each poll
    power = pd.DataFrame({
        "node": "n", "device": "GPU-x", "device_index": 0, "domain": "gpu",
        "timestamp_ns": t0 + poll_ns, "energy_mj": update_ns / 1e9 * 300.0 * 1000.0,
        "power_w": 300.0, "source": "nvml",
    })
    events = pd.DataFrame({"cell_id": "c", "repeat": 0, "phase": "decode", "batch_index": 0,
                           "start_ns": [t0 + 1_234_000_000], "end_ns": [t0 + 2_491_000_000],
                           "n_seqs": 1, "tokens_in": 0, "tokens_out": 10})
    out = attribute_events(events, power)
    expected_j = 300.0 * 1.257
    assert abs(out.energy_j.iloc[0] - expected_j) / expected_j < 0.01
    assert abs(out.energy_discrepancy_pct.iloc[0]) < 1.0


# --------------------------------------------------------------------------- #
# A synthetic NVML trace of known energy per phase (trace_helpers)
# --------------------------------------------------------------------------- #

def test_synthetic_trace_each_window_within_the_sensor_bound_and_long_ones_within_0_15_pct() -> None:
    # The counter's updates are restamped at the midpoint of the polls around them
    # (align_to_sensor): here 5 ms early (the trace polls 5 ms after each update), as the
    # poll time itself was 5 ms late. Interpolating a power step inside one update period
    # misplaces up to ΔP × period / 4 per edge on top: 0.11% of the 12 s decode after the
    # warm-up (a 450 → 180 W edge), under 0.1% for the others.
    from trace_helpers import edge_bound_j, events_of, nvml_trace, standard_segments, timeline

    tl = timeline(standard_segments())
    att = attribute_events(events_of(tl), nvml_trace(tl))
    truth = tl[tl["phase"].notna()]
    assert att["phase"].tolist() == truth["phase"].tolist()
    err = att["energy_j"].to_numpy() - truth["energy_j"].to_numpy()
    bounds = np.array([edge_bound_j(tl, i) for i in truth.index])
    assert np.all(np.abs(err) <= 1.05 * bounds + 1e-6), list(zip(att["phase"], err, bounds, strict=True))
    long = att["duration_s"].to_numpy() >= 10.0
    assert long.sum() == 5  # compile, warm-up and three decodes
    assert np.all(np.abs(err[long]) / truth["energy_j"].to_numpy()[long] < 0.0015)


def test_synthetic_trace_windows_under_ten_update_periods_are_flagged() -> None:
    from trace_helpers import events_of, nvml_trace, standard_segments, timeline

    tl = timeline(standard_segments())
    att = attribute_events(events_of(tl), nvml_trace(tl))
    assert att["update_period_s"].unique().tolist() == pytest.approx([0.1])
    # 0.08 and 0.06 s prefills (under one update period) and the 0.53 s decode
    flagged = att.loc[att["below_resolution"], ["phase", "duration_s"]]
    assert flagged["duration_s"].round(2).tolist() == [0.08, 0.06, 0.53]
    assert not att.loc[att["duration_s"] >= 1.0, "below_resolution"].any()


def test_samples_that_stop_early_null_the_windows_after_and_name_the_device() -> None:
    from trace_helpers import events_of, nvml_trace, standard_segments, timeline

    tl = timeline(standard_segments())
    power = pd.concat([nvml_trace(tl), nvml_trace(tl, device="GPU-0001", node="node1", stop_s=50.0)])
    att = attribute_events(events_of(tl), power)
    ends_s = (att["end_ns"] - 1_700_000_000 * 10**9) / 1e9
    late = ends_s > 50.0 - 0.02  # the last poll before 50 s: every window ending after it is uncovered
    assert late.any() and (~late).any()
    assert att.loc[late, "energy_j"].isna().all() and att.loc[late, "energy_instant_j"].isna().all()
    assert att.loc[late, "power_out_of_range"].all()
    assert set(att.loc[late, "uncovered_devices"]) == {"node1/GPU-0001"}
    assert att.loc[~late, "energy_j"].notna().all() and att.loc[~late, "uncovered_devices"].isna().all()
    assert (att.loc[~late, "n_devices"] == 2).all()


def test_update_period_measured_from_counter_else_source_default() -> None:
    from llmenergy.analysis.energy import update_period_s

    t = np.arange(0, 11, 1.0)
    assert update_period_s(_device("GPU-a", t, 1e6 + 250_000.0 * t, None)) == (pytest.approx(1.0), "measured")
    # instant power only, changing every 0.5 s, polled every 0.1 s
    tp = np.arange(0, 10, 0.1)
    stairs = 100.0 + np.floor(tp / 0.5) * 3.0
    assert update_period_s(_device("GPU-a", tp, None, stairs))[0] == pytest.approx(0.5)
    two = _device("pkg", np.array([0.0, 1.0]), np.array([0.0, 5.0]), None, source="dcgm")
    assert update_period_s(two) == (pytest.approx(0.1), "default for dcgm")
    # the coarsest device governs a sum over devices
    both = pd.concat([_device("GPU-a", t, 250_000.0 * t, None),
                      _device("GPU-b", tp, 100_000.0 * tp, None)])
    assert update_period_s(both)[0] == pytest.approx(1.0)
    assert update_period_s(None) == (None, "no samples")


def test_a_device_without_a_counter_makes_the_counter_sum_null_not_partial() -> None:
    t = np.arange(0, 11, 0.5)
    power = pd.concat([_device("GPU-a", t, 200_000.0 * t, np.full(len(t), 200.0)),
                       _device("GPU-b", t, None, np.full(len(t), 100.0))])
    att = attribute_events(_events([(2.0, 8.0)]), power)
    assert np.isnan(att.loc[0, "energy_j"])
    assert att.loc[0, "energy_instant_j"] == pytest.approx(6 * 300.0)
    assert att.loc[0, "avg_power_w"] == pytest.approx(300.0)


def test_a_device_with_a_single_sample_covers_nothing() -> None:
    t = np.arange(0, 11, 1.0)
    power = pd.concat([_device("GPU-a", t, 200_000.0 * t, None),
                       _device("GPU-b", np.array([5.0]), np.array([1.0]), None)])
    att = attribute_events(_events([(2.0, 8.0)]), power)
    assert np.isnan(att.loc[0, "energy_j"])
    assert att.loc[0, "uncovered_devices"] == "n0/GPU-b"


def test_a_window_edge_in_a_gap_of_the_samples_is_null_but_a_gap_inside_a_window_is_not() -> None:
    # DCGM-like samples every 0.1 s (stamped by the sensor), 100 W except 400 W over 15-25 s;
    # no sample at all over 10-30 s (a collector that missed its polls)
    t = np.round(np.arange(0, 40.05, 0.1), 6)
    t = t[(t <= 10) | (t >= 30)]
    energy_mj = 1000.0 * (100.0 * t + 300.0 * np.clip(np.minimum(t, 25) - 15, 0, None))
    power_w = np.where((t >= 15) & (t < 25), 400.0, 100.0)
    dev = _device("GPU-a", t, 1e6 + energy_mj, power_w, source="dcgm")
    att = attribute_events(_events([(15.0, 25.0), (5.0, 35.0), (1.0, 5.0)]), dev)
    # inside the gap the counter could only be interpolated: 2,500 J against the true 4,000
    assert np.isnan(att.loc[0, "energy_j"]) and np.isnan(att.loc[0, "energy_instant_j"])
    assert bool(att.loc[0, "sample_gap"]) and not bool(att.loc[0, "power_out_of_range"])
    # around the gap the counter's difference is exact (100 W x 20 s + 400 W x 10 s) ...
    assert att.loc[1, "energy_j"] == pytest.approx(6000.0)
    assert not bool(att.loc[1, "sample_gap"])
    # ... but the instant integral across it would not be
    assert np.isnan(att.loc[1, "energy_instant_j"])
    assert att.loc[2, "energy_j"] == pytest.approx(400.0) and att.loc[2, "energy_instant_j"] == pytest.approx(400.0)


def test_a_counter_that_drops_and_climbs_back_above_its_start_inside_a_window_is_null() -> None:
    t = np.arange(0, 41, 1.0)
    counter = 1e7 + 300_000.0 * t - np.where(t > 20, 5e6, 0.0)  # a 5,000 J reset at 20-21 s
    att = attribute_events(_events([(10.0, 30.0), (0.0, 9.0), (22.0, 40.0)]), _device("GPU-a", t, counter, None))
    # the difference across the window (1,000 J, positive) would pass for a measurement of 6,000
    assert np.isnan(att.loc[0, "energy_j"]) and bool(att.loc[0, "counter_drop"])
    assert att.loc[1, "energy_j"] == pytest.approx(2700.0) and not bool(att.loc[1, "counter_drop"])
    assert att.loc[2, "energy_j"] == pytest.approx(5400.0) and not bool(att.loc[2, "counter_drop"])
