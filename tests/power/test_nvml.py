"""NvmlBackend against the fake NVML (tests/fakes/fake_nvml.py) patched where llmenergy imports pynvml."""
from __future__ import annotations

from typing import Any

import pytest
from launch_helpers import load_fake

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends.base import POWER_COLUMNS
from llmenergy.power.backends.nvml import NvmlBackend

fake_nvml = load_fake("fake_nvml")
UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]


@pytest.fixture
def gpus() -> list[dict[str, Any]]:
    return [fake_nvml.make_gpu(u, energy_mj=1_000_000 * (i + 1), power_mw=70_000 + 1000 * i)
            for i, u in enumerate(UUIDS)]


@pytest.fixture
def fake(make_nvml, gpus: list[dict[str, Any]]):
    return make_nvml(gpus)


def test_watches_exactly_the_given_uuids_in_their_order(fake) -> None:
    backend = NvmlBackend(["GPU-cccc", "GPU-aaaa"], node="n1")
    assert [(d.index, d.uuid) for d in backend.devices()] == [(2, "GPU-cccc"), (0, "GPU-aaaa")]
    rows = backend.sample(123)
    assert {r["device"] for r in rows} == {"GPU-cccc", "GPU-aaaa"}
    backend.close()


def test_all_gpus_when_uuids_is_none(fake, gpus) -> None:
    with NvmlBackend(None) as backend:
        assert [d.uuid for d in backend.devices()] == [g["uuid"] for g in gpus]


def test_unknown_uuid_is_unavailable_and_nvml_is_shut_down(fake) -> None:
    with pytest.raises(SensorUnavailable, match="GPU-zzzz"):
        NvmlBackend(["GPU-aaaa", "GPU-zzzz"])
    assert fake.initialised == 0


def test_energy_counter_and_instant_power_units(fake, gpus) -> None:
    backend = NvmlBackend(["GPU-bbbb"])
    gpus[1]["energy_mj"] = 5_432_100
    gpus[1]["power_mw"] = 312_500
    assert backend.read_energy_mj(1) == pytest.approx(5_432_100.0)
    assert backend.read_power_w(1) == pytest.approx(312.5)  # field 186, mW -> W
    assert fake.calls.get("nvmlDeviceGetPowerUsage", 0) == 0
    backend.close()


def test_sample_row_has_every_column_and_converted_units(fake, gpus) -> None:
    g = gpus[0]
    g.update(gpu_util=97, mem_util=41, mem_used_bytes=3 * 1024 * 1024 * 1024, sm_clock_mhz=1980,
             mem_clock_mhz=2619, temperature_c=55, other_limit_mw=350_000, event_reasons=0x4,
             violation_ns=12_345_678)
    backend = NvmlBackend(["GPU-aaaa"], node="node7")
    [row] = backend.sample(1_700_000_000_000_000_000)
    assert tuple(row) == POWER_COLUMNS
    assert row["node"] == "node7" and row["device"] == "GPU-aaaa" and row["device_index"] == 0
    assert row["domain"] == "gpu" and row["source"] == "nvml"
    assert row["timestamp_ns"] == 1_700_000_000_000_000_000
    assert row["energy_mj"] == pytest.approx(1_000_000)
    assert row["power_w"] == pytest.approx(70.0)  # mW -> W
    assert row["gpu_util_pct"] == 97 and row["mem_util_pct"] == 41
    assert row["mem_used_mb"] == pytest.approx(3 * 1024)
    assert (row["sm_clock_mhz"], row["mem_clock_mhz"], row["temperature_c"]) == (1980, 2619, 55)
    assert row["power_limit_w"] == pytest.approx(350.0)
    assert row["clock_event_reasons"] == 0x4
    assert row["power_cap_throttle_ns"] == 12_345_678
    backend.close()


def test_unsupported_metric_is_null_and_not_asked_again(fake, gpus) -> None:
    gpus[0]["unsupported"] = ["nvmlDeviceGetViolationStatus", "nvmlDeviceGetTotalEnergyConsumption"]
    gpus[0]["energy_field_unsupported"] = True
    backend = NvmlBackend(["GPU-aaaa"])
    for t in range(3):
        [row] = backend.sample(t)
        assert row["power_cap_throttle_ns"] is None
        assert row["energy_mj"] is None
        assert row["temperature_c"] == gpus[0]["temperature_c"]
    assert fake.calls["nvmlDeviceGetViolationStatus"] == 1
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    backend.close()


def test_older_pynvml_uses_throttle_reasons(fake, gpus) -> None:
    del fake.module().nvmlDeviceGetCurrentClocksEventReasons  # an older pynvml
    gpus[0]["event_reasons"] = 0x8
    with NvmlBackend(["GPU-aaaa"]) as backend:
        [row] = backend.sample(0)
    assert row["clock_event_reasons"] == 0x8
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


def test_missing_field_186_falls_back_to_power_usage(fake, gpus) -> None:
    gpus[0]["field_unsupported"] = True
    gpus[0]["average_power_mw"] = 150_000
    with NvmlBackend(["GPU-aaaa"]) as backend:
        assert backend.read_power_w(0) == pytest.approx(150.0)
        assert backend.read_power_w(0) == pytest.approx(150.0)
    assert fake.calls["nvmlDeviceGetFieldValues"] == 1  # not retried once known unsupported


def test_rows_of_a_gpu_on_averaged_power_say_so(fake, gpus) -> None:
    gpus[1]["field_unsupported"] = True
    gpus[1]["average_power_mw"] = 150_000
    with NvmlBackend(["GPU-aaaa", "GPU-bbbb"]) as backend:
        full = backend.sample(1)
        light = backend.sample_power(2)
    for rows in (full, light):
        assert [(r["device"], r["source"]) for r in rows] == [("GPU-aaaa", "nvml"), ("GPU-bbbb", "nvml-avg")]
        assert rows[1]["power_w"] == pytest.approx(150.0)


def test_fast_sample_reads_energy_and_power_in_one_call_per_gpu(fake, gpus) -> None:
    with NvmlBackend(["GPU-aaaa", "GPU-bbbb"]) as backend:
        assert backend.fast_power
        fake.calls.clear()
        rows = backend.sample_power(99)
        calls = dict(fake.calls)
    assert [r["power_w"] for r in rows] == [pytest.approx(70.0), pytest.approx(71.0)]
    assert [r["energy_mj"] for r in rows] == [pytest.approx(1_000_000), pytest.approx(2_000_000)]
    assert all(r["temperature_c"] is None and r["timestamp_ns"] == 99 for r in rows)
    assert calls == {"nvmlDeviceGetFieldValues": 2}


def test_full_sample_reads_energy_and_power_first(fake, gpus) -> None:
    with NvmlBackend(["GPU-aaaa"]) as backend:
        fake.order.clear()
        backend.sample(5)
    assert fake.order[0] == "nvmlDeviceGetFieldValues"
    assert "nvmlDeviceGetTotalEnergyConsumption" not in fake.order


def test_missing_energy_field_falls_back_to_the_counter_function(fake, gpus) -> None:
    gpus[0].update(energy_field_unsupported=True, energy_mj=7_654_321, power_mw=250_000)
    with NvmlBackend(["GPU-aaaa"]) as backend:
        for _ in range(3):
            assert backend.read_energy_and_power(0) == (pytest.approx(7_654_321), pytest.approx(250.0))
    # the pair is asked once; afterwards the counter function and field 186 alone
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 3
    assert fake.calls["nvmlDeviceGetFieldValues"] == 3


def test_lost_gpu_raises_sensor_error(fake, gpus) -> None:
    backend = NvmlBackend(["GPU-aaaa"])
    gpus[0]["lost"] = True
    with pytest.raises(SensorError, match="nvml"):
        backend.sample(0)
    backend.close()


def test_driver_not_loaded_is_unavailable(make_nvml, gpus) -> None:
    make_nvml(gpus, init_error=fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(SensorUnavailable):
        NvmlBackend(None)


def test_other_init_failure_is_a_sensor_error_not_unavailable(make_nvml, gpus) -> None:
    make_nvml(gpus, init_error=fake_nvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(SensorError) as info:
        NvmlBackend(None)
    assert not isinstance(info.value, SensorUnavailable)
    assert isinstance(info.value.__cause__, fake_nvml.NVMLError)


def test_close_is_idempotent_and_shuts_nvml_down_once(fake) -> None:
    backend = NvmlBackend(["GPU-aaaa"])
    backend.close()
    backend.close()
    assert fake.calls["nvmlShutdown"] == 1
    assert fake.initialised == 0


def test_unwatched_index_is_rejected(fake) -> None:
    with NvmlBackend(["GPU-aaaa"]) as backend, pytest.raises(SensorError, match="index 3"):
        backend.read_energy_mj(3)


def test_full_rows_count_the_processes_holding_a_context_on_each_gpu(fake, gpus) -> None:
    """Without the ranks' PIDs (or where none of the listed can be traced to one) the rank is
    taken to be one of the GPU's processes: the others are counted."""
    gpus[0]["processes"] = [101, 202]
    gpus[1]["unsupported"] = ["nvmlDeviceGetComputeRunningProcesses"]
    with NvmlBackend(["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]) as backend:
        for t in range(2):
            rows = backend.sample(t)
            assert [r["other_processes"] for r in rows] == [1, None, None]  # none listed: nothing to tell
        assert all(r["other_processes"] is None for r in backend.sample_power(3))  # light rows: not read
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 2 + 2 + 1  # GPU-bbbb's asked once


def test_the_ranks_and_their_children_are_not_counted_as_other_processes(fake, gpus) -> None:
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a compile worker
    try:
        gpus[0]["processes"] = [os.getpid(), child.pid]
        gpus[1]["processes"] = [os.getpid(), child.pid, os.getppid()]  # and another job's process
        with NvmlBackend(["GPU-aaaa", "GPU-bbbb"]) as backend:
            backend.own_pids = frozenset({os.getpid()})
            assert [r["other_processes"] for r in backend.sample(0)] == [0, 1]
    finally:
        child.kill()
        child.wait()


def test_a_process_list_that_cannot_be_counted_gives_null_not_a_dead_collector(fake, gpus, caplog) -> None:
    gpus[0]["processes"] = [None]  # a driver answering a PID that is not one
    with NvmlBackend(["GPU-aaaa"]) as backend:
        for t in range(3):
            [row] = backend.sample(t)
            assert row["other_processes"] is None and row["energy_mj"] is not None
    assert caplog.text.count("counting other processes failed") == 1
