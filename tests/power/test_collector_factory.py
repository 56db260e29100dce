"""select_backend: names, the auto chain, CPU-only nodes, UUID filtering."""
from __future__ import annotations

import pandas as pd
import pytest
from fake_powercap import make_powercap
from launch_helpers import load_fake

from llmenergy.errors import ConfigError, SensorError, SensorUnavailable
from llmenergy.power.backends import factory
from llmenergy.power.backends.factory import select_backend

fake_nvml = load_fake("fake_nvml")


@pytest.fixture
def no_dcgm(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """DCGM bindings absent: nothing on sys.path, env or default folders."""
    import llmenergy.power.backends.dcgm as dcgm_module

    def missing():
        raise SensorUnavailable("dcgm: bindings not found (test)")

    monkeypatch.setattr(dcgm_module, "load_bindings", missing)


@pytest.fixture
def two_gpus(make_nvml):
    return make_nvml([fake_nvml.make_gpu("GPU-0"), fake_nvml.make_gpu("GPU-1")])


def test_unknown_name_names_the_key() -> None:
    with pytest.raises(ConfigError, match="collector.backend: 'nvidia'"):
        select_backend("nvidia", uuid_list=None, interval_ms=100, options={})


def test_bad_interval_names_the_key() -> None:
    with pytest.raises(ConfigError, match="collector.interval_ms"):
        select_backend("none", uuid_list=None, interval_ms=0, options={})


def test_auto_prefers_dcgm(fake_dcgm, two_gpus) -> None:
    fake_dcgm.reset(two_gpus)  # DCGM sees the GPUs NVML sees
    backend = select_backend("auto", uuid_list=["GPU-1"], interval_ms=100, options={"node": "n"})
    assert backend.name == "dcgm"
    assert [d.uuid for d in backend.devices()] == ["GPU-1"]
    backend.close()


def test_auto_falls_back_to_nvml_and_filters_uuids(no_dcgm, two_gpus, caplog) -> None:
    caplog.set_level("INFO", logger="llmenergy.power.backends.factory")
    backend = select_backend("auto", uuid_list=["GPU-1"], interval_ms=100, options={"node": "n"})
    assert backend.name == "nvml"
    assert [d.uuid for d in backend.devices()] == ["GPU-1"]  # never the other GPU of the node
    assert "collector backend: nvml (auto" in caplog.text and "dcgm" in caplog.text
    backend.close()


def test_auto_chain_ends_at_rapl_then_none(no_dcgm, make_nvml, tmp_path) -> None:
    make_nvml([], init_error=fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    root = make_powercap(tmp_path / "pc")
    backend = select_backend("auto", uuid_list=["GPU-0"], interval_ms=100, options={"rapl_root": root})
    assert backend.name == "rapl"
    backend = select_backend("auto", uuid_list=["GPU-0"], interval_ms=100,
                             options={"rapl_root": tmp_path / "absent"})
    assert backend.name == "none"


def test_cpu_only_node_uses_cpu_chain_never_estimate(tmp_path) -> None:
    def no_gpu_backend(*args, **kwargs):
        raise AssertionError("GPU backends must not be tried for CPU ranks")

    root = make_powercap(tmp_path / "pc")
    calls = []

    def spy(name, uuid_list, interval_ms, options):
        calls.append(name)
        if name in ("dcgm", "nvml"):
            no_gpu_backend()
        return factory._build(name, uuid_list, interval_ms, options)

    backend = select_backend("auto", uuid_list=["cpu", "cpu"], interval_ms=100,
                             options={"rapl_root": root}, builder=spy)
    assert backend.name == "rapl" and calls == ["rapl"]
    backend = select_backend("nvml", uuid_list=["cpu"], interval_ms=100,
                             options={"rapl_root": tmp_path / "absent"}, builder=spy)
    assert backend.name == "none" and "estimate" not in calls


def test_explicit_backend_unavailable_raises(no_dcgm) -> None:
    with pytest.raises(SensorUnavailable):
        select_backend("dcgm", uuid_list=["GPU-0"], interval_ms=100, options={})


def test_explicit_estimate_and_replay(tmp_path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 0 1 10 0 0 0 0 0 0\n")
    backend = select_backend("estimate", uuid_list=["cpu"], interval_ms=100,
                             options={"tdp_w": 42, "proc_stat": stat})
    assert backend.name == "estimate" and backend.tdp_w == 42.0
    frame = pd.DataFrame([{"device": "GPU-0", "device_index": 0, "timestamp_ns": 1, "energy_mj": 1.0}])
    backend = select_backend("replay", uuid_list=["GPU-0"], interval_ms=100, options={"replay_path": frame})
    assert backend.name == "replay" and [d.uuid for d in backend.devices()] == ["GPU-0"]
    with pytest.raises(ConfigError, match="collector.replay_path"):
        select_backend("replay", uuid_list=None, interval_ms=100, options={})


def test_auto_skips_a_backend_that_fails_to_set_up(two_gpus, monkeypatch) -> None:
    import llmenergy.power.backends.dcgm as dcgm_module

    def broken():
        raise SensorError("dcgm: watch failed (test)")

    monkeypatch.setattr(dcgm_module, "load_bindings", broken)
    backend = select_backend("auto", uuid_list=["GPU-0"], interval_ms=100, options={})
    assert backend.name == "nvml"
    backend.close()
