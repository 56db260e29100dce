"""DcgmBackend against fake DCGM bindings found through $DCGM_PYTHON_PATH."""
from __future__ import annotations

import sys

import pytest

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends import dcgm as dcgm_module
from llmenergy.power.backends.base import POWER_COLUMNS
from llmenergy.power.backends.dcgm import (
    BASE_FIELDS,
    PROFILING_FIELDS,
    DcgmBackend,
    load_bindings,
)


def gpu(gpu_id: int, uuid: str, **values: float) -> dict:
    base = {155: 70.5, 156: 9_000_000, 157: 72.25, 203: 88, 204: 35, 250: 81559, 251: 80000, 252: 1559,
            100: 1980, 101: 2619, 150: 44, 160: 700.0, 164: 450.0, 112: 0x4, 240: 2500,
            1002: 0.75, 1004: 0.5, 1005: 0.25}
    base.update({int(k[1:]): v for k, v in values.items()})
    return {"id": gpu_id, "uuid": uuid, "name": "NVIDIA H100 80GB HBM3", "values": base}


@pytest.fixture
def engine(fake_dcgm):
    fake_dcgm.reset([gpu(0, "GPU-a"), gpu(1, "GPU-b"), gpu(2, "GPU-c")])
    return fake_dcgm


def test_bindings_found_through_env_path(engine) -> None:
    assert "pydcgm" not in sys.modules
    mods = load_bindings()
    assert mods.pydcgm.__file__.endswith("fake_dcgm/pydcgm.py")
    assert hasattr(mods.DcgmReader, "DcgmReader")


def test_bindings_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("pydcgm", "dcgm_fields", "dcgm_structs", "DcgmReader"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("DCGM_PYTHON_PATH", str(tmp_path))
    monkeypatch.setattr(dcgm_module, "DCGM_BINDING_DIRS", (str(tmp_path / "nope"),))
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
    assert row["source"] == "dcgm" and row["node"] == "n0" and row["timestamp_ns"] == 42
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
    values = engine.gpus[0]["values"]
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
