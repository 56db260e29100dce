from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmenergy.analysis.sensor import align_to_sensor, power_source_of
from trace_helpers import device_samples as _device

S = 10**9


def test_power_source_names_the_gpu_rows_sources_and_none_without_them() -> None:
    t = np.arange(0, 3, 1.0)
    gpu = _device("GPU-a", t, 1000.0 * t, None)
    assert power_source_of(None) == "none" and power_source_of(pd.DataFrame()) == "none"
    assert power_source_of(pd.concat([gpu, gpu.assign(device="GPU-b", source="dcgm")])) == "dcgm+nvml"
    assert power_source_of(_device("pkg", t, 1000.0 * t, None, domain="cpu_package", source="rapl")) == "none"


def test_align_to_sensor_stamps_each_counter_update_within_half_a_poll() -> None:
    """A counter updated every 100 ms (phase 37 ms), polled every 40 ms: each new value is
    first seen 0–40 ms after its update; the restamped value is within 20 ms of it."""
    t0 = 1_800_000_000 * 10**9
    poll_ns = np.arange(0, 3_000_000_000, 40_000_000) + 3_000_000
    update_ns = np.arange(37_000_000, 3_100_000_000, 100_000_000)
    seen = np.searchsorted(update_ns, poll_ns, side="right")  # updates done by each poll
    nvml = pd.DataFrame({"node": "n0", "device": "GPU-a", "device_index": np.int32(0), "domain": "gpu",
                         "timestamp_ns": t0 + poll_ns, "energy_mj": 1000.0 * seen,
                         "power_w": 200.0 + seen, "source": "nvml"})
    dcgm = nvml.assign(device="GPU-b", source="dcgm")
    out = align_to_sensor(pd.concat([nvml, dcgm], ignore_index=True))

    counter = out[(out["device"] == "GPU-a") & out["energy_mj"].notna()].sort_values("timestamp_ns")
    first = counter.drop_duplicates("energy_mj", keep="first").iloc[1:]  # the first poll has no earlier one
    k = first["energy_mj"].to_numpy() / 1000.0
    true_ns = t0 + update_ns[k.astype(int) - 1]
    err_ns = first["timestamp_ns"].to_numpy() - true_ns
    raw = nvml.drop_duplicates("energy_mj", keep="first").iloc[1:]
    assert (raw["timestamp_ns"].to_numpy() - true_ns).max() > 20_000_000  # polled stamps: up to 40 ms late
    assert np.abs(err_ns).max() <= 20_000_000
    # the instant power keeps its poll times, every one of them; DCGM rows are untouched
    inst = out[(out["device"] == "GPU-a") & out["power_w"].notna()]
    assert sorted(inst["timestamp_ns"]) == sorted(nvml["timestamp_ns"])
    pd.testing.assert_frame_equal(out[out["device"] == "GPU-b"].reset_index(drop=True), dcgm)
    # a GPU on NVML's averaged power (source nvml-avg) has the same polled counter: restamped alike
    avg = align_to_sensor(nvml.assign(source="nvml-avg"))
    assert sorted(avg.loc[avg["energy_mj"].notna(), "timestamp_ns"]) == sorted(counter["timestamp_ns"])


def test_align_to_sensor_leaves_a_counter_that_changes_at_every_poll() -> None:
    t = np.arange(0, 11, 1.0)
    power = _device("GPU-a", t, 100_000.0 * t, None)
    out = align_to_sensor(power)
    assert out["timestamp_ns"].tolist() == power["timestamp_ns"].tolist()


def test_align_to_sensor_keeps_the_poll_time_of_a_value_first_seen_after_missed_polls() -> None:
    # polls every 40 ms of a counter that updates every 100 ms (1 J a step), none over 2-3 s
    polls = np.round(np.arange(0.0, 5.0, 0.04), 6)
    polls = polls[(polls < 2.0) | (polls > 3.0)]
    power = _device("GPU-a", polls, 1000.0 * np.floor(np.round(polls / 0.1, 6)), None)
    out = align_to_sensor(power)
    counter = out[out["energy_mj"].notna()].drop_duplicates("energy_mj", keep="first")
    stamp = dict(zip(counter["energy_mj"] / 1000.0, counter["timestamp_ns"] / S, strict=True))
    # the first value after the gap (updated somewhere in 2.0-3.0 s) stays at its poll ...
    after = polls[polls > 3.0][0]
    assert stamp[np.floor(round(after / 0.1, 6))] == pytest.approx(after)
    # ... while the others move half a poll back, toward their update
    assert stamp[15.0] == pytest.approx(1.52 - 0.02)
