"""Shared pytest fixtures.

``slurm_cluster`` (session): a Slurm cluster that answers ``sinfo``. It uses one
that already answers; otherwise, when root on Debian/Ubuntu and
``LLMENERGY_NO_CLUSTER`` is unset, it starts the project's test cluster with
``tests/slurm/cluster.sh up`` (and leaves it up: ``up`` is idempotent and the
next session reuses it; ``tests/slurm/cluster.sh down`` stops it). Else the
tests that need it skip and say why. Tests marked ``@pytest.mark.slurm`` get the
fixture automatically.

Every test is marked ``unit`` or ``system`` by the rule of ``tests/tiers.py``
(``system``: starts processes or needs the cluster); ``pytest -m unit`` is the
one-process tier, and a ``unit`` test that starts a process fails, saying so.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tiers

CLUSTER_SH = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
UP_TIMEOUT_S = 600  # includes apt-get on a fresh machine


@dataclass(frozen=True)
class SlurmClusterInfo:
    """What tests need to know about the cluster they run on."""

    partitions: dict[str, tuple[str, ...]]  # partition -> node names
    gres: dict[str, str] = field(default_factory=dict)  # node -> e.g. "gpu:4"
    cpus: dict[str, int] = field(default_factory=dict)  # node -> CPUs
    default_partition: str | None = None
    started_here: bool = False  # this session ran cluster.sh up
    project_cluster: bool = False  # it is tests/slurm/cluster.sh's cluster

    def gpus_per_node(self, partition: str) -> int:
        """GPUs on each node of ``partition`` (the smallest, if they differ)."""
        counts = []
        for node in self.partitions[partition]:
            gres = self.gres.get(node, "")
            parts = [g for g in gres.split(",") if g.startswith("gpu")]
            counts.append(int(parts[0].split(":")[-1].split("(")[0]) if parts else 0)
        return min(counts) if counts else 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the project's real Slurm test cluster")
    config.addinivalue_line("markers", "unit: runs in the test process, starts none (set by tests/tiers.py)")
    config.addinivalue_line("markers", "system: starts processes or needs the cluster (set by tests/tiers.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = tiers.system_reason(item)
        item.add_marker(pytest.mark.unit if reason is None else pytest.mark.system(reason))
        if item.get_closest_marker("slurm") is not None:
            if "slurm_cluster" not in item.fixturenames:  # type: ignore[attr-defined]
                item.fixturenames.append("slurm_cluster")  # type: ignore[attr-defined]
    # the modules on the Slurm cluster first: the longest share of `make test`, it starts at once
    items.sort(key=lambda item: not uses_cluster(item.nodeid.split("::", 1)[0]))


@functools.cache
def uses_cluster(module: str) -> bool:
    """Whether a test module (``tests/...py``) has tests on the Slurm cluster: under
    ``tests/integration`` or ``tests/slurm``, or naming the ``slurm_cluster`` fixture or
    the ``slurm`` mark. Read from the source, so the pytest-xdist controller, which
    collects nothing, decides the same as the workers."""
    if module.startswith(tuple(f"tests/{d}/" for d in tiers.SYSTEM_DIRS)):
        return True
    try:
        text = (CLUSTER_SH.parents[2] / module).read_text()
    except OSError:
        return False
    return "slurm_cluster" in text or "mark.slurm" in text


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` runs pytest-xdist workers (``-n N``): every module with tests on the
    Slurm cluster on one worker, one after the other, as they expect (each starts from, and
    leaves, an idle cluster); every other module whole on any worker, so its fixtures are
    built once. (pytest-xdist's own ``--dist loadgroup`` does not group under pytest 9.2:
    it renames ``item._nodeid``, which pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ClusterModulesOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm cluster" if uses_cluster(module) else module

    config.option.loadscopereorder = False  # collection order: the cluster's modules first
    return ClusterModulesOnOneWorker(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    yield from _guarded(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield from _guarded(item)


def _guarded(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("unit") is None:
        yield
        return
    # A unit test asks no Slurm: the partitions' limits of whatever cluster runs the suite
    # must not change a test config's plan (tests of the limits pass them in, or are system).
    from llmenergy.planning import jobs

    with pytest.MonkeyPatch.context() as mp, tiers.no_processes(item.nodeid):
        mp.setattr(jobs, "partition_limits", jobs.PartitionLimits)
        yield


def _project_cluster_stopped() -> bool:
    """True when /etc/slurm/slurm.conf is cluster.sh's and its slurmctld is not
    running: then sinfo would only spend its ~10 s message timeout failing."""
    conf = Path("/etc/slurm/slurm.conf")
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        return False
    match = re.search(r"^# state dir: (.+)$", text, re.MULTILINE)
    if "llmenergy test cluster" not in text or match is None:
        return False
    try:
        pid = int((Path(match.group(1).strip()) / "run" / "slurmctld.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return True
    return False


def _sinfo_rows() -> list[list[str]] | None:
    if shutil.which("sinfo") is None or _project_cluster_stopped():
        return None
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%G|%c"], capture_output=True,
                              text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 3]


def _cluster_info(rows: list[list[str]], started_here: bool) -> SlurmClusterInfo:
    partitions: dict[str, list[str]] = {}
    gres: dict[str, str] = {}
    cpus: dict[str, int] = {}
    default = None
    for part, node, node_gres, node_cpus in rows:
        if part.endswith("*"):
            part = part[:-1]
            default = part
        partitions.setdefault(part, [])
        if node not in partitions[part]:
            partitions[part].append(node)
        gres[node] = node_gres
        cpus[node] = int(node_cpus) if node_cpus.isdigit() else 0
    conf = Path("/etc/slurm/slurm.conf")
    ours = conf.is_file() and "llmenergy test cluster" in conf.read_text(errors="replace")
    return SlurmClusterInfo(
        partitions={k: tuple(v) for k, v in partitions.items()}, gres=gres, cpus=cpus,
        default_partition=default, started_here=started_here, project_cluster=ours)


def _why_not_start() -> str | None:
    if os.environ.get("LLMENERGY_NO_CLUSTER"):
        return "LLMENERGY_NO_CLUSTER is set"
    if os.geteuid() != 0:
        return "starting the test cluster needs root"
    os_release = Path("/etc/os-release")
    text = os_release.read_text() if os_release.is_file() else ""
    if not any(tag in text for tag in ("debian", "ubuntu")):
        return "starting the test cluster needs Debian or Ubuntu"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no apt-get to install Slurm"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmClusterInfo:
    rows = _sinfo_rows()
    if rows:
        return _cluster_info(rows, started_here=False)
    reason = _why_not_start()
    if reason is not None:
        pytest.skip(f"no Slurm cluster answers sinfo, and {reason}")
    # A log file, not a pipe: daemons started by cluster.sh may inherit it.
    with tempfile.NamedTemporaryFile("w+", prefix="llmenergy-cluster-up.", suffix=".log",
                                     delete=False) as log_file:
        try:
            proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], stdout=log_file,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=UP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tests/slurm/cluster.sh up took over {UP_TIMEOUT_S} s; log: {log_file.name}")
        log_file.seek(0)
        output = log_file.read()
    if proc.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh up failed (rc {proc.returncode}):\n{output[-3000:]}")
    rows = _sinfo_rows()
    if not rows:
        pytest.fail(f"cluster.sh up succeeded but sinfo does not answer:\n{output[-3000:]}")
    return _cluster_info(rows, started_here=True)


@pytest.fixture
def runs() -> Iterator[list[Any]]:
    """The `run-cell` processes a test starts (launch_helpers.CellRun); leftovers are killed after it, by pid."""
    started: list[Any] = []
    yield started
    for run in started:
        run.kill_leftovers()
