"""The collectors' ready handshake as rank 0 and the launcher read it (issue 22, coverage):
one backend per cell, and a collector's error on any node fails the job at once, naming the node."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmenergy.errors import SensorError
from llmenergy.handshake import CollectorReady, collector_problem, read_ready
from llmenergy.inference.rank import wait_ready
from llmenergy.layout import CellFiles, node_file
from llmenergy.power.agent import report_collector_death


def _job(tmp_path: Path) -> CellFiles:
    job = CellFiles(tmp_path / "job")
    job.ready.mkdir(parents=True)
    return job


def _ready(job: CellFiles, node: str, backend: str | None, error: str | None = None) -> None:
    CollectorReady(node=node, backend=backend, devices=[{"uuid": f"GPU-{node}"}] if backend else [],
                   interval_ms=100, error=error).write(node_file(job.ready, node))


def test_auto_resolving_to_different_backends_is_refused_naming_the_node(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node1", "nvml")
    _ready(job, "node2", "rapl")
    start = time.monotonic()
    with pytest.raises(SensorError) as info:
        wait_ready(job, nodes=2, timeout_s=30.0)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "\n" not in message
    assert "node2" in message and "rapl" in message and "nvml" in message
    assert "collector.backend" in message  # what to set


def test_same_backend_on_every_node_is_ready(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node1", "nvml")
    _ready(job, "node2", "nvml")
    records = wait_ready(job, nodes=2, timeout_s=5.0)
    assert sorted(r.node for r in records) == ["node1", "node2"]
    assert collector_problem(records) is None


def test_a_collector_error_fails_at_once_without_waiting_for_the_other_nodes(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node2", None, error="NVML: driver not loaded")
    start = time.monotonic()
    with pytest.raises(SensorError, match=r"collector on node node2 failed: NVML: driver not loaded"):
        wait_ready(job, nodes=3, timeout_s=60.0)
    assert time.monotonic() - start < 5.0


def test_a_missing_collector_fails_at_the_timeout_instead_of_going_on(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node1", "nvml")
    with pytest.raises(SensorError, match=r"only 1 of 2 collector\(s\) ready after 0 s \(ready: node1\)"):
        wait_ready(job, nodes=2, timeout_s=0.2)


def test_an_error_after_ready_wins_over_a_matching_backend() -> None:
    records = [CollectorReady("node1", "nvml"), CollectorReady("node2", "nvml", error="gave up after 50 failed samples")]
    assert collector_problem(records) == "collector on node node2 failed: gave up after 50 failed samples"


def test_agent_reports_a_dead_collector_keeping_its_backend(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node2", "nvml")
    report_collector_death(job, "node2", 100, -9)
    (rec,) = read_ready(job.ready)
    assert rec.backend == "nvml" and rec.devices == [{"uuid": "GPU-node2"}]
    assert rec.error is not None and "killed by signal 9" in rec.error and "collector.node2.log" in rec.error
    assert collector_problem([rec]) is not None and "node node2" in collector_problem([rec])


def test_agent_keeps_the_collectors_own_error(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _ready(job, "node2", None, error="DCGM: host engine not reachable")
    report_collector_death(job, "node2", 100, 3)
    (rec,) = read_ready(job.ready)
    assert rec.error == "DCGM: host engine not reachable"


def test_agent_reports_a_collector_that_died_before_ready(tmp_path: Path) -> None:
    job = _job(tmp_path)
    report_collector_death(job, "node1", 100, 1)
    (rec,) = read_ready(job.ready)
    assert rec.backend is None and rec.error is not None and "exited with code 1" in rec.error


def test_every_rank_on_one_host_needs_that_hosts_collector_only(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The local launcher runs a 2-node layout's ranks on one host, beside one collector."""
    job = _job(tmp_path)
    job.rank_devices.mkdir(parents=True)
    for rank in (0, 1):
        (job.rank_devices / f"vm.{rank}.json").write_text('{"uuid": "cpu"}')
    _ready(job, "vm", "estimate")
    monkeypatch.setenv("WORLD_SIZE", "2")
    start = time.monotonic()
    assert [r.node for r in wait_ready(job, nodes=2, timeout_s=30.0)] == ["vm"]
    assert time.monotonic() - start < 5.0
