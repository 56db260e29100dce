"""EstimateBackend: CPU utilisation from a fake /proc/stat x TDP, integrated to energy."""
from __future__ import annotations

import pytest

from llmenergy.errors import ConfigError, SensorUnavailable
from llmenergy.power.backends import estimate as estimate_module
from llmenergy.power.backends.estimate import EstimateBackend, read_cpu_times


def write_stat(path, user: int, system: int, idle: int, iowait: int = 0) -> None:
    path.write_text(f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\n"
                    f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 0 0 0\nintr 1 2 3\n")


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def monotonic_ns(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(estimate_module.time, "monotonic_ns", fake.monotonic_ns)
    return fake


def test_read_cpu_times_counts_iowait_as_idle(tmp_path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=100, system=50, idle=800, iowait=50)
    assert read_cpu_times(stat) == (150, 1000)


def test_power_is_utilisation_times_tdp_and_integrates(tmp_path, clock) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=0)
    backend = EstimateBackend(tdp_w=200.0, proc_stat=stat, node="c1")
    # 1 s at 25 % busy
    write_stat(stat, user=20, system=5, idle=75)
    clock.ns += 1_000_000_000
    [row] = backend.sample(5)
    assert row["power_w"] == pytest.approx(50.0)
    assert row["energy_mj"] == pytest.approx(50_000.0)
    assert row["domain"] == "estimate" and row["source"] == "estimate" and row["device"] == "cpu-estimate"
    # 0.5 s at 100 % busy
    write_stat(stat, user=120, system=5, idle=75)
    clock.ns += 500_000_000
    assert backend.read_energy_mj(0) == pytest.approx(50_000.0 + 100_000.0)
    assert backend.read_power_w(0) == pytest.approx(200.0)


def test_no_cpu_progress_keeps_last_power(tmp_path, clock) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=0)
    backend = EstimateBackend(tdp_w=100.0, proc_stat=stat)
    write_stat(stat, user=50, system=0, idle=50)
    clock.ns += 1_000_000_000
    backend.sample(0)
    clock.ns += 1_000_000_000  # /proc/stat unchanged
    [row] = backend.sample(1)
    assert row["power_w"] == pytest.approx(50.0)
    assert row["energy_mj"] == pytest.approx(100_000.0)


@pytest.mark.parametrize("tdp", [0, -5, "lots", True])
def test_bad_tdp_names_the_key(tmp_path, tdp) -> None:
    with pytest.raises(ConfigError, match="collector.tdp_w"):
        EstimateBackend(tdp_w=tdp, proc_stat=tmp_path / "stat")


def test_missing_proc_stat_is_unavailable(tmp_path) -> None:
    with pytest.raises(SensorUnavailable, match="estimate"):
        EstimateBackend(tdp_w=10.0, proc_stat=tmp_path / "nope")
