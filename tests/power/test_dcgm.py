"""DcgmBackend against the fake DCGM bindings (tests/fakes/dcgm) found through $DCGM_PYTHON_PATH."""
from __future__ import annotations

import sys
from typing import Any

import pytest
from launch_helpers import load_fake

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends import dcgm_lib
from llmenergy.power.backends.base import POWER_COLUMNS
from llmenergy.power.backends.dcgm import (
    BASE_FIELDS,
    PROFILING_FIELDS,
    DcgmBackend,
    load_bindings,
)

fake_nvml = load_fake("fake_nvml")
T0_US = 1_700_000_000_000_000  # a DCGM sample time, µs since the epoch


def gpu(uuid: str, **values: float) -> dict[str, Any]:
    base = {155: 70.5, 156: 9_000_000, 157: 72.25, 203: 88, 204: 35, 250: 81559, 251: 80000, 252: 1559,
            100: 1980, 101: 2619, 150: 44, 160: 700.0, 164: 450.0, 112: 0x4, 240: 2500,
            1002: 0.75, 1004: 0.5, 1005: 0.25}
    base.update({int(k[1:]): v for k, v in values.items()})
    return fake_nvml.make_gpu(uuid, name="NVIDIA H100 80GB HBM3", dcgm=[[T0_US, base]])


@pytest.fixture
def engine(fake_dcgm):
    return fake_dcgm.reset(fake_nvml.FakeNvml({"gpus": [gpu("GPU-a"), gpu("GPU-b"), gpu("GPU-c")]}))


def test_bindings_found_through_env_path(engine) -> None:
    assert "pydcgm" not in sys.modules
    mods = load_bindings()
    assert mods.pydcgm.__file__.endswith("fakes/dcgm/pydcgm.py")
    assert hasattr(mods.DcgmReader, "DcgmReader")


def test_bindings_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("pydcgm", "dcgm_fields", "dcgm_structs", "DcgmReader"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("DCGM_PYTHON_PATH", str(tmp_path))
    monkeypatch.setattr(dcgm_lib, "DCGM_BINDING_DIRS", (str(tmp_path / "nope"),))
    with pytest.raises(SensorUnavailable, match="bindings not found"):
        load_bindings()


def test_field_group_watch_read_and_teardown(engine) -> None:
    backend = DcgmBackend(["GPU-c", "GPU-a"], interval_ms=100, node="n0")
    assert [(d.index, d.uuid) for d in backend.devices()] == [(2, "GPU-c"), (0, "GPU-a")]
    # one GPU group with exactly our GPUs; field groups with integer ids incl. profiling
    [group] = [g for g in engine.groups.values() if g["alive"]]
    assert sorted(group["gpu_ids"]) == [0, 2]
    watched = {fid for fg in engine.field_groups.values() if fg["alive"] for fid in fg["field_ids"]}
    assert watched == set(BASE_FIELDS) | set(PROFILING_FIELDS)
    [watch] = engine.live_watches()
    assert watch["update_us"] == 100_000
    assert backend.fields == BASE_FIELDS + PROFILING_FIELDS

    rows = backend.sample(42)
    assert [r["device"] for r in rows] == ["GPU-c", "GPU-a"]
    row = rows[0]
    assert tuple(row) == POWER_COLUMNS
    assert row["source"] == "dcgm" and row["node"] == "n0"
    assert row["timestamp_ns"] == T0_US * 1000  # DCGM's sample time, not the 42 asked at
    assert row["energy_mj"] == 9_000_000.0
    assert row["power_w"] == 72.25               # 157 (instant) preferred over 155
    assert row["gpu_util_pct"] == 88 and row["mem_util_pct"] == 35
    assert row["mem_used_mb"] == 1559
    assert (row["sm_clock_mhz"], row["mem_clock_mhz"], row["temperature_c"]) == (1980, 2619, 44)
    assert row["power_limit_w"] == 450.0         # 164 enforced preferred over 160
    assert row["clock_event_reasons"] == 0x4
    assert row["power_cap_throttle_ns"] == 2_500_000  # µs -> ns
    assert backend.read_profiling(2) == {"sm_active": 0.75, "tensor_active": 0.5, "dram_active": 0.25}

    handle_id = next(iter(engine.handles))
    backend.close()
    assert not any(g["alive"] for g in engine.groups.values())
    assert not any(fg["alive"] for fg in engine.field_groups.values())
    assert engine.handles[handle_id]["open"] is False
    assert engine.handles[handle_id]["address"] is None  # embedded host engine
    backend.close()  # idempotent


def test_profiling_refused_falls_back_to_base_fields(engine) -> None:
    engine.profiling_allowed = False
    with DcgmBackend(["GPU-b"], interval_ms=50) as backend:
        assert backend.fields == BASE_FIELDS
        [watch] = engine.live_watches()
        assert set(engine.field_groups[watch["field_group"]]["field_ids"]) == set(BASE_FIELDS)
        assert watch["update_us"] == 50_000
        assert backend.read_profiling(1) == {"sm_active": None, "tensor_active": None, "dram_active": None}
        assert backend.read_energy_mj(1) == 9_000_000.0
    # the failed first attempt left nothing behind either
    assert not any(g["alive"] for g in engine.groups.values())


def test_missing_fields_and_blank_sentinels_are_null(engine) -> None:
    values = engine.nvml.gpus()[0]["dcgm"][0][1]
    del values[157], values[164], values[240]
    values[150] = 140737488355328.0  # DCGM_FP64_BLANK
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        [row] = backend.sample(0)
        assert row["power_w"] == 70.5        # falls back to 155
        assert row["power_limit_w"] == 700.0  # falls back to 160
        assert row["power_cap_throttle_ns"] is None
        assert row["temperature_c"] is None


def test_standalone_hostengine(engine) -> None:
    engine.hostengine_addresses.add("gpu-node-3:5555")
    with DcgmBackend(["GPU-a"], host="gpu-node-3:5555") as backend:
        assert backend.read_power_w(0) == 72.25
    [state] = engine.handles.values()
    assert state["address"] == "gpu-node-3:5555"


def test_unreachable_hostengine_is_unavailable(engine) -> None:
    with pytest.raises(SensorUnavailable, match="dcgm"):
        DcgmBackend(["GPU-a"], host="nowhere")


def test_missing_library_is_unavailable(engine) -> None:
    engine.library_present = False
    with pytest.raises(SensorUnavailable):
        DcgmBackend(None)


def test_uuid_not_seen_by_dcgm(engine) -> None:
    with pytest.raises(SensorUnavailable, match="GPU-x"):
        DcgmBackend(["GPU-a", "GPU-x"])
    assert all(not h["open"] for h in engine.handles.values())


def test_lost_connection_while_reading_is_a_sensor_error(engine) -> None:
    backend = DcgmBackend(["GPU-a"])
    for state in engine.handles.values():
        state["open"] = False
    with pytest.raises(SensorError, match="dcgm"):
        backend.sample(0)
    backend.close()  # teardown copes with the dead connection


# -- sample times: DCGM's own, per sample ------------------------------------------------------
def _append(engine, gpu_index: int, ts_us: int, **values: float) -> None:
    engine.nvml.gpus()[gpu_index]["dcgm"].append([ts_us, {int(k[1:]): v for k, v in values.items()}])


def test_each_dcgm_sample_becomes_a_row_stamped_with_its_own_time(engine) -> None:
    _append(engine, 0, T0_US + 100_000, f156=9_020_000, f157=210.0, f155=205.0)
    _append(engine, 0, T0_US + 200_000, f156=9_041_000, f157=220.0, f155=215.0)
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        rows = backend.sample(999)  # the collector's clock; DCGM's times are used instead
        assert [(r["timestamp_ns"], r["energy_mj"], r["power_w"]) for r in rows] == [
            (T0_US * 1000, 9_000_000, 72.25),
            ((T0_US + 100_000) * 1000, 9_020_000, 210.0),
            ((T0_US + 200_000) * 1000, 9_041_000, 220.0),
        ]
        assert backend.sample(1_000) == []  # nothing new sampled: no row repeats an old value
        _append(engine, 0, T0_US + 300_000, f156=9_063_000, f157=230.0)
        [row] = backend.sample(1_001)
        assert (row["timestamp_ns"], row["energy_mj"], row["power_w"]) == ((T0_US + 300_000) * 1000, 9_063_000, 230.0)
        assert row["gpu_util_pct"] == 88  # a field not sampled again keeps its latest value


def test_a_row_carries_only_values_sampled_at_or_before_its_time(engine) -> None:
    _append(engine, 0, T0_US + 100_000, f156=9_020_000, f157=210.0)
    _append(engine, 0, T0_US + 150_000, f150=61)  # temperature read later: makes no row of its own
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        rows = backend.sample(0)
        assert [r["timestamp_ns"] for r in rows] == [T0_US * 1000, (T0_US + 100_000) * 1000]
        assert [r["temperature_c"] for r in rows] == [44, 44]  # 61 was not yet measured at either instant
        _append(engine, 0, T0_US + 200_000, f156=9_041_000)
        [row] = backend.sample(0)
        assert row["temperature_c"] == 61 and row["power_w"] == 210.0


def test_reading_the_latest_value_keeps_the_samples_for_the_next_rows(engine) -> None:
    with DcgmBackend(["GPU-a", "GPU-b"], profiling=False) as backend:
        _append(engine, 1, T0_US + 100_000, f156=9_500_000)
        assert backend.read_energy_mj(1) == 9_500_000  # reads everything new, for both GPUs
        rows = backend.sample(0)
    assert [(r["device"], r["timestamp_ns"]) for r in rows] == [
        ("GPU-a", T0_US * 1000), ("GPU-b", T0_US * 1000), ("GPU-b", (T0_US + 100_000) * 1000)]


def test_blank_samples_are_null_in_their_row(engine) -> None:
    _append(engine, 0, T0_US + 100_000, f156=9_020_000, f157=dcgm_lib.FP64_BLANK, f155=dcgm_lib.FP64_BLANK)
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        rows = backend.sample(0)
    assert [(r["energy_mj"], r["power_w"]) for r in rows] == [(9_000_000, 72.25), (9_020_000, None)]


def test_a_field_sampled_twice_between_rows_gives_each_row_its_value_then(engine) -> None:
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        assert [r["temperature_c"] for r in backend.sample(0)] == [44]
        _append(engine, 0, T0_US + 50_000, f150=50)
        _append(engine, 0, T0_US + 80_000, f150=52)
        _append(engine, 0, T0_US + 60_000 + 1, f156=9_010_000)  # read by the next tick
        assert [r["temperature_c"] for r in backend.sample(0)] == [50]
        _append(engine, 0, T0_US + 100_000, f156=9_020_000)
        assert [r["temperature_c"] for r in backend.sample(0)] == [52]


def test_other_processes_come_from_nvml_on_each_calls_last_row(engine, monkeypatch, caplog) -> None:
    """DCGM lists no processes: NVML's listing of the same GPUs gives the count of those that are
    not the job's own, on the last row of each GPU a sample call returns; a GPU whose listing NVML
    refuses is asked once and null."""
    import os

    from llmenergy.power.backends import nvml_lib

    monkeypatch.setattr(nvml_lib, "pynvml", engine.nvml.module())
    gpus = engine.nvml.gpus()
    gpus[0]["processes"] = [os.getpid(), os.getppid()]  # a rank and a process outside the job
    gpus[1]["unsupported"] = ["nvmlDeviceGetComputeRunningProcesses"]
    _append(engine, 0, T0_US + 100_000, f156=9_020_000)
    with DcgmBackend(["GPU-a", "GPU-b"], profiling=False) as backend:
        backend.own_pids = frozenset({os.getpid()})
        rows = backend.sample(0)
        assert [(r["device"], r["other_processes"]) for r in rows] == [
            ("GPU-a", None), ("GPU-a", 1), ("GPU-b", None)]
        gpus[0]["processes"] = [os.getpid()]
        _append(engine, 0, T0_US + 200_000, f156=9_040_000)
        _append(engine, 1, T0_US + 200_000, f156=9_040_000)
        assert [r["other_processes"] for r in backend.sample(1)] == [0, None]
    assert engine.nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 2 + 1  # GPU-b's asked once
    assert caplog.text.count("GPU GPU-b: NVML lists no processes") == 1
    assert engine.nvml.calls["nvmlShutdown"] == 1  # NVML's session closed with the backend


def test_without_nvml_beside_dcgm_other_processes_is_null_and_said(engine, monkeypatch, caplog) -> None:
    from llmenergy.power.backends import nvml_lib

    gpus = engine.nvml.gpus()
    gpus[0]["processes"] = [1, 2, 3]  # listed, were NVML usable: would count 2
    monkeypatch.setattr(nvml_lib, "pynvml", fake_nvml.FakeNvml(
        {"gpus": gpus, "init_error": fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED}).module())
    with DcgmBackend(["GPU-a"], profiling=False) as backend:
        rows = backend.sample(0)
    assert rows and all(r["other_processes"] is None for r in rows) and rows[0]["energy_mj"] == 9_000_000
    assert "NVML not usable beside DCGM" in caplog.text and "not flagged" in caplog.text
