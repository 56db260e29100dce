"""RaplBackend over a fake powercap tree."""
from __future__ import annotations

import pytest
from fake_powercap import make_powercap, set_energy

from llmenergy.errors import SensorError, SensorUnavailable
from llmenergy.power.backends import rapl as rapl_module
from llmenergy.power.backends.base import POWER_COLUMNS
from llmenergy.power.backends.rapl import RaplBackend


def test_discovers_packages_and_dram_only(tmp_path) -> None:
    root = make_powercap(tmp_path / "powercap", packages=2)
    with RaplBackend(root=root, node="cpu1") as backend:
        devices = backend.devices()
    assert [(d.index, d.uuid, d.domain) for d in devices] == [
        (0, "cpu-package-0", "cpu_package"),
        (1, "cpu-dram-0", "dram"),
        (2, "cpu-package-1", "cpu_package"),
        (3, "cpu-dram-1", "dram"),
    ]


def test_energy_accumulates_in_mj(tmp_path) -> None:
    root = make_powercap(tmp_path, packages=1, dram=False, energy_uj=5_000_000)
    backend = RaplBackend(root=root)
    assert backend.read_energy_mj(0) == pytest.approx(5_000.0)
    set_energy(root / "intel-rapl:0", 7_500_000)
    assert backend.read_energy_mj(0) == pytest.approx(7_500.0)
    assert backend.read_power_w(0) is None


def test_wraparound_adds_max_range(tmp_path) -> None:
    max_range = 10_000_000
    root = make_powercap(tmp_path, packages=1, dram=False, energy_uj=9_000_000, max_range_uj=max_range)
    zone = root / "intel-rapl:0"
    backend = RaplBackend(root=root)
    readings = []
    for raw in (9_500_000, 500_000, 2_000_000, 1_000_000):  # wraps twice
        set_energy(zone, raw)
        readings.append(backend.read_energy_mj(0))
    expected_uj = [9_500_000, 10_500_000, 12_000_000, 21_000_000]
    assert readings == pytest.approx([e / 1000 for e in expected_uj])
    assert all(b > a for a, b in zip(readings, readings[1:]))


def test_sample_rows(tmp_path) -> None:
    root = make_powercap(tmp_path, packages=1, dram=True)
    with RaplBackend(root=root, node="n9") as backend:
        rows = backend.sample(77)
    assert [r["device"] for r in rows] == ["cpu-package-0", "cpu-dram-0"]
    for row in rows:
        assert tuple(row) == POWER_COLUMNS
        assert row["source"] == "rapl" and row["node"] == "n9" and row["timestamp_ns"] == 77
        assert row["energy_mj"] == pytest.approx(1_000.0)
        assert row["power_w"] is None and row["gpu_util_pct"] is None


def test_no_tree_is_unavailable(tmp_path) -> None:
    with pytest.raises(SensorUnavailable, match="does not exist"):
        RaplBackend(root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SensorUnavailable, match="no intel-rapl"):
        RaplBackend(root=tmp_path / "empty")


def test_unreadable_counter_is_unavailable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, where chmod 0 does not stop reads: fake the kernel's refusal.
    root = make_powercap(tmp_path, packages=1, dram=False)
    real_read_int = rapl_module._read_int

    def refuse(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_int(path)

    monkeypatch.setattr(rapl_module, "_read_int", refuse)
    with pytest.raises(SensorUnavailable, match="not readable"):
        RaplBackend(root=root)


def test_counter_vanishing_mid_run_is_a_sensor_error(tmp_path) -> None:
    root = make_powercap(tmp_path, packages=1, dram=False)
    backend = RaplBackend(root=root)
    (root / "intel-rapl:0" / "energy_uj").write_text("garbage\n")
    with pytest.raises(SensorError, match="rapl"):
        backend.read_energy_mj(0)
