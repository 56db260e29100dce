"""One wrapper per vendor (power/backends/nvml_lib.py, dcgm_lib.py), shared by collectors, caps and provenance."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from launch_helpers import load_fake

import llmenergy
from llmenergy.errors import PowerCapDenied, PowerCapError, SensorError, SensorUnavailable
from llmenergy.orchestrate import provenance
from llmenergy.power.backends import nvml_lib
from llmenergy.power.backends.dcgm import DcgmBackend
from llmenergy.power.backends.nvml import NvmlBackend
from llmenergy.power.caps import DcgmCapBackend, NvmlCapBackend

fake_nvml = load_fake("fake_nvml")
PKG = Path(llmenergy.__file__).resolve().parent


def _calls_and_imports(path: Path) -> set[str]:
    """Names a module imports, and the names of the attributes and functions it calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


@pytest.mark.parametrize(("vendor_names", "home"), [
    ({"pynvml", "nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByUUID"}, "power/backends/nvml_lib.py"),
    ({"pydcgm", "DcgmHandle", "load_bindings", "_import_bindings"}, "power/backends/dcgm_lib.py"),
])
def test_vendor_setup_lives_in_one_module(vendor_names: set[str], home: str) -> None:
    users = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                   if _calls_and_imports(p) & vendor_names and str(p.relative_to(PKG)) != home)
    # dcgm.py builds its DcgmReader and re-exports load_bindings; it opens no connection of its own
    assert [u for u in users if u != "power/backends/dcgm.py"] == []
    assert "DcgmHandle" not in _calls_and_imports(PKG / "power/backends/dcgm.py")


# -- NVML ------------------------------------------------------------------------------------
def test_nvml_is_initialised_once_for_collector_and_caps(make_nvml) -> None:
    fake = make_nvml([fake_nvml.make_gpu("GPU-a", limit_w=650)])
    backend = NvmlBackend(["GPU-a"])
    caps = NvmlCapBackend()
    assert fake.calls["nvmlInit"] == 1 and fake.initialised == 1
    backend.close()
    assert fake.initialised == 1 and caps.get_setting_w("GPU-a") == 650  # still usable
    caps.close()
    caps.close()
    assert fake.calls["nvmlShutdown"] == 1 and fake.initialised == 0


def test_driver_version_for_provenance(make_nvml) -> None:
    fake = make_nvml([fake_nvml.make_gpu("GPU-a")], driver="580.159.04")
    assert provenance._driver() == "580.159.04"
    assert fake.initialised == 0  # shut down again
    make_nvml([], init_error=fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert provenance._driver() is None


@pytest.mark.parametrize(("code", "expected"), [
    ("NVML_ERROR_NO_PERMISSION", PowerCapDenied), ("NVML_ERROR_UNKNOWN", PowerCapError)])
def test_cap_errors_name_the_gpu(make_nvml, code: str, expected: type[Exception]) -> None:
    make_nvml([])
    with pytest.raises(expected, match="^nvml: GPU-a: set power limit") as info, \
            nvml_lib.cap_errors("set power limit", "GPU-a"):
        raise fake_nvml.NVMLError(getattr(fake_nvml, code))
    assert (type(info.value) is PowerCapDenied) == (expected is PowerCapDenied)


@pytest.mark.parametrize(("code", "expected"), [
    ("NVML_ERROR_DRIVER_NOT_LOADED", SensorUnavailable), ("NVML_ERROR_UNKNOWN", SensorError)])
def test_sensor_errors(make_nvml, code: str, expected: type[Exception]) -> None:
    make_nvml([])
    with pytest.raises(expected, match="^nvml: read failed") as info, nvml_lib.sensor_errors("read"):
        raise fake_nvml.NVMLError(getattr(fake_nvml, code))
    assert isinstance(info.value, SensorUnavailable) == (expected is SensorUnavailable)


def test_cap_backend_finds_gpus_by_uuid(make_nvml) -> None:
    make_nvml([fake_nvml.make_gpu("GPU-a"), fake_nvml.make_gpu("GPU-b", min_w=150, max_w=400, default_w=350)])
    with NvmlCapBackend() as caps:
        assert caps.limits_w("GPU-b") == (150.0, 400.0, 350.0)  # mW -> W
        with pytest.raises(PowerCapError, match="nvml: GPU-zz: find GPU"):
            caps.limits_w("GPU-zz")


# -- DCGM ------------------------------------------------------------------------------------
def test_dcgm_connection_is_shared_by_collector_and_caps(fake_dcgm) -> None:
    engine = fake_dcgm.reset(fake_nvml.FakeNvml({"gpus": [fake_nvml.make_gpu("GPU-a"),
                                                           fake_nvml.make_gpu("GPU-b", limit_w=500)]}))
    backend = DcgmBackend(["GPU-b"], profiling=False)
    caps = DcgmCapBackend(None)
    assert len(engine.handles) == 1  # one connection to the host engine per process
    assert caps.get_setting_w("GPU-b") == 500 and [d.index for d in backend.devices()] == [1]
    backend.close()
    assert [h["open"] for h in engine.handles.values()] == [True]
    caps.close()
    assert [h["open"] for h in engine.handles.values()] == [False]


def test_dcgm_caps_without_bindings_is_a_power_cap_error(fake_dcgm, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from llmenergy.power.backends import dcgm_lib

    monkeypatch.setenv("DCGM_PYTHON_PATH", str(tmp_path))
    monkeypatch.setattr(dcgm_lib, "DCGM_BINDING_DIRS", ())
    with pytest.raises(PowerCapError, match="bindings not found"):
        DcgmCapBackend(None)


def test_dcgm_connect_refused_is_unavailable_for_the_collector(fake_dcgm) -> None:
    fake_dcgm.reset(fake_nvml.FakeNvml({"gpus": [fake_nvml.make_gpu("GPU-a")],
                                        "dcgm_connect_error": fake_dcgm.DCGM_ST_CONNECTION_NOT_VALID}))
    with pytest.raises(SensorUnavailable, match="dcgm"):
        DcgmBackend(["GPU-a"])
    with pytest.raises(PowerCapError, match="dcgm: connect to DCGM"):
        DcgmCapBackend(None)
