"""Faults on the real test cluster (issue 9): a cell's job cancelled, a node
crashed, the collector killed, SIGTERM as at the time limit, a corrupt
metrics file. Each checks that the other cell's outputs stay byte-identical and
that the rerun executes only the affected cell.

Every test runs a "bystander" cell (1 rank on partition v100) and a "victim"
(2 ranks on the two a100 nodes, slow enough to be caught mid-run). The fault is
injected once the bystander has finished and the victim's ranks are generating.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import slurm_helpers as h

from llmenergy import entrypoints
from llmenergy.slurm import parse_time_limit_min


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from h.private_workdir(request.node.name)

pytestmark = pytest.mark.slurm

SLURM_DIR = Path(os.environ.get("LLMENERGY_SLURM_DIR", "/tmp/llmenergy-slurm"))
CRASH_NODE = "node4"  # an a100 node: the bystander runs on v100


@dataclass
class Outcome:
    workdir: Path
    bystander: str
    victim: str
    victim_job: int
    first: h.Run
    before: dict[str, str]  # bystander's fingerprint just before the fault


def _run_with_fault(workdir: Path, inject: Callable[[Path, str, int], None], max_gen_len: int = 48) -> Outcome:
    h.write_config(workdir, h.tiny_config(
        {"V1": h.gpu_type("v100", 1), "A1": h.gpu_type("a100", 1)},
        [h.group("V1", 1), h.group("A1", 2, dataset="slow", max_gen_len=max_gen_len)]))
    bystander, victim = h.cell_id(workdir, gpu="V1"), h.cell_id(workdir, gpu="A1")
    proc, log_path, started = h.start_snakemake(workdir)
    try:
        h.wait_for(lambda: (h.cell_dir(workdir, bystander) / "cell.json").is_file(), 120, "the bystander")
        h.wait_for(lambda: h.rank_started(workdir, victim), 120, "the victim's ranks")
        before = h.fingerprint(workdir, [bystander])
        job = h.wait_for(lambda: h.job_ids(workdir, victim), 30, "the victim's job id")[-1]
        assert not (h.cell_dir(workdir, victim) / "cell.json").exists(), "victim finished before the fault"
        inject(workdir, victim, job)
    finally:
        first = h.finish_snakemake(proc, log_path, started)
    assert sorted(first.executed_cells) == sorted([bystander, victim])
    assert h.cell_json(workdir, bystander)["status"] == "ok"
    assert h.fingerprint(workdir, [bystander]) == before
    return Outcome(workdir, bystander, victim, job, first, before)


def _rerun(out: Outcome, expected: list[str]) -> h.Run:
    second = h.run_snakemake(out.workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_cells == expected
    assert h.fingerprint(out.workdir, [out.bystander]) == out.before
    if expected:
        assert h.cell_json(out.workdir, out.victim)["status"] == "ok"
    return second


def _assert_not_finished(out: Outcome) -> None:
    """The victim has no ``ok`` outputs: they are absent or marked unfinished.

    (Snakemake removes a failed job's outputs, but a cancelled job's launcher
    may still write its ``incomplete`` record after that; the next run moves
    such outputs aside.)"""
    path = h.cell_dir(out.workdir, out.victim) / "cell.json"
    if path.exists():
        assert json.loads(path.read_text())["status"] != "ok"


def _failed_record(out: Outcome) -> dict:
    return json.loads((out.workdir / "results" / "failed" / f"{out.victim}.json").read_text())


def test_scancel_of_a_running_cell(workdir: Path) -> None:
    out = _run_with_fault(workdir, lambda wd, cell, job: subprocess.run(["scancel", str(job)], check=True))
    assert out.first.returncode != 0
    assert h.sacct(out.victim_job)[0]["State"].startswith("CANCELLED")
    assert "CANCELLED" in out.first.output
    _assert_not_finished(out)
    _rerun(out, [out.victim])


def test_sigterm_as_at_the_time_limit(workdir: Path) -> None:
    """`scancel --signal=TERM` delivers what `--signal=TERM@120` (every cell's job
    asks for it) delivers before the time limit: the ranks finish the batch,
    record `incomplete` and exit non-zero, and the cell is rerun."""
    out = _run_with_fault(workdir, lambda wd, cell, job: subprocess.run(
        ["scancel", "--signal=TERM", str(job)], check=True))
    assert out.first.returncode != 0
    rec = _failed_record(out)
    assert rec["status"] == "incomplete" and "signal" in rec["reason"], rec["reason"]
    assert h.sacct(out.victim_job)[0]["State"] == "FAILED"
    _assert_not_finished(out)
    # what was measured before the signal was flushed
    assert (h.cell_dir(workdir, out.victim) / "events.parquet").is_file()
    # the partial report names the cell not measured
    assert out.victim in (workdir / "results" / "report.html").read_text()
    second = _rerun(out, [out.victim])
    # issue 15 (4): a cell stopped at its time limit asks for at least twice the time
    first_limit = parse_time_limit_min(h.sacct(out.victim_job, "JobID,Timelimit")[0]["Timelimit"])
    assert rec["provenance"]["slurm_time_limit_min"] == first_limit
    (rerun_job,) = second.job_ids(out.victim)
    rerun_limit = parse_time_limit_min(h.sacct(rerun_job, "JobID,Timelimit")[0]["Timelimit"])
    assert first_limit is not None and rerun_limit is not None and rerun_limit >= 2 * first_limit


def _slurmd_pid(node: str) -> int | None:
    try:
        pid = int((SLURM_DIR / "run" / f"slurmd.{node}.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _start_slurmd(node: str) -> None:
    """Start the node's slurmd the way tests/slurm/cluster.sh does."""
    subprocess.run(["unshare", "--uts", "/bin/sh", "-c", f"hostname {node} && exec /usr/sbin/slurmd -N {node}"],
                   env={**os.environ, "SLURM_CONF": str(SLURM_DIR / "etc" / "slurm.conf")}, check=True,
                   timeout=30)


def _node_state(node: str) -> str:
    proc = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True, timeout=30,
                          check=False)
    return proc.stdout.strip()


def _crash_node(node: str) -> None:
    """A node crash: SIGKILL its slurmd and every process in its UTS namespace
    (its slurmstepd's and the job's processes on it)."""
    pid = _slurmd_pid(node)
    assert pid is not None, f"slurmd of {node} is not running"
    uts = os.readlink(f"/proc/{pid}/ns/uts")
    pids = [pid]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != pid and os.readlink(entry / "ns" / "uts") == uts:
                pids.append(int(entry.name))
        except OSError:
            continue
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    # gone, not only signalled: a restart that finds the pid still there would skip the node
    h.wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, f"slurmd of {node} gone")


def test_node_crash_mid_cell(slurm_cluster, workdir: Path) -> None:
    if not slurm_cluster.project_cluster or not (SLURM_DIR / "run" / f"slurmd.{CRASH_NODE}.pid").exists():
        pytest.skip("crashing a node needs the project's own test cluster (tests/slurm/cluster.sh)")

    def inject(wd: Path, cell: str, job: int) -> None:
        _crash_node(CRASH_NODE)
        time.sleep(3)
        _start_slurmd(CRASH_NODE)

    try:
        out = _run_with_fault(workdir, inject)
        assert out.first.returncode != 0
        assert _failed_record(out)["status"] == "failed"
        _assert_not_finished(out)
        h.wait_for(lambda: _node_state(CRASH_NODE) in ("idle", "mix", "alloc"), 60, f"{CRASH_NODE} back")
        _rerun(out, [out.victim])
    finally:  # leave the cluster healthy for the other tests
        if _slurmd_pid(CRASH_NODE) is None:
            _start_slurmd(CRASH_NODE)
        h.wait_for(lambda: _node_state(CRASH_NODE) in ("idle", "mix", "alloc"), 60, f"{CRASH_NODE} back")


def test_collector_killed_mid_cell(workdir: Path) -> None:
    """Issue 22: a collector that dies leaves its node unmetered, so the cell fails at once with
    that error naming the node (it used to finish ``ok`` from the part files); the rerun runs it."""
    def inject(wd: Path, cell: str, job: int) -> None:
        h.wait_for(lambda: len(list((h.cell_dir(wd, cell) / ".run" / "power").glob("*.part-*"))) >= 2, 60,
                   "a part file from each collector")
        pids = h.pids_of(entrypoints.COLLECTOR, wd)
        pids = [p for p in pids if cell in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(pids) == 2, pids  # one per node
        for p in pids:
            os.kill(p, signal.SIGKILL)

    out = _run_with_fault(workdir, inject)
    assert out.first.returncode != 0, out.first.tail()
    record = _failed_record(out)
    assert record["status"] == "failed"
    assert "collector on node node" in record["reason"] and "killed by signal 9" in record["reason"]
    _assert_not_finished(out)
    _rerun(out, [out.victim])


def test_corrupt_metrics_file(workdir: Path) -> None:
    """`llmenergy aggregate` names the corrupt file and goes on; the next run
    moves the cell's outputs aside and reruns only that cell."""
    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1), "A1": h.gpu_type("a100", 1)},
                                           [h.group("V1", 1), h.group("A1", 1)]))
    bystander, victim = h.cell_id(workdir, gpu="V1"), h.cell_id(workdir, gpu="A1")
    first = h.run_snakemake(workdir)
    assert first.returncode == 0, first.tail()
    before = h.fingerprint(workdir, [bystander])
    metrics = h.cell_dir(workdir, victim) / "metrics.parquet"
    data = metrics.read_bytes()
    metrics.write_bytes(data[: len(data) // 2])  # truncated

    agg = subprocess.run([str(h.VENV_BIN / "llmenergy"), "aggregate", "--results", "results"], cwd=workdir,
                         env=h.env(), capture_output=True, text=True, check=False, timeout=120)
    assert agg.returncode == 0, agg.stderr[-3000:]
    assert f"{victim}/metrics.parquet" in agg.stdout + agg.stderr
    import pyarrow.parquet as pq

    summary = pq.read_table(workdir / "results" / "summary.parquet").to_pylist()
    assert [r["status"] for r in summary if r["cell_id"] == bystander] == ["ok"]

    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_cells == [victim]
    assert (metrics.parent / "metrics.parquet.rejected").is_file()
    assert "bad magic bytes" in second.output
    assert pq.read_table(metrics).num_rows == 1
    assert h.fingerprint(workdir, [bystander]) == before


def test_submit_job_gets_the_same_stop_signal_and_handling(workdir: Path) -> None:
    """Issue 14: `llmenergy submit` jobs used submitit's default signal (USR2 at 90 s),
    which the node agent and collector did not handle: they died without flushing
    and the power-cap safety net was skipped. Now the job asks for TERM@120 like the
    Snakemake route, and every process of a cell treats USR2 as it treats TERM."""
    h.write_config(workdir, h.tiny_config({"A1": h.gpu_type("a100", 1)},
                                          [h.group("A1", 2, dataset="slow", max_gen_len=48)]))
    cell = h.cell_id(workdir)
    proc = subprocess.Popen(
        ["timeout", "-s", "INT", "240", str(h.VENV_BIN / "llmenergy"), "submit", "--config", "config.yaml",
         "--executor", "slurm", "--wait"],
        cwd=workdir, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        h.wait_for(lambda: h.rank_started(workdir, cell), 180, "the ranks")
        scripts = h.wait_for(lambda: list((workdir / "results" / "submitit").rglob("*submission.sh")), 30,
                             "submitit's sbatch script")
        script = scripts[0].read_text()
        assert "#SBATCH --signal=TERM@120" in script and "USR2" not in script
        job = int(scripts[0].parent.name)
        subprocess.run(["scancel", "--signal=USR2", str(job)], check=True)  # what submitit's default sent
        output, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    assert proc.returncode != 0, output[-3000:]
    rec = json.loads((workdir / "results" / "failed" / f"{cell}.json").read_text())
    assert rec["status"] == "incomplete" and "signal" in rec["reason"], rec
    # the collectors flushed on the signal: the power file is whole, nothing recovered from parts
    assert rec["power_recovered_from_parts"] == []
    assert (h.cell_dir(workdir, cell) / "power.parquet").is_file()
    agent_logs = list((h.cell_dir(workdir, cell) / "logs").glob("agent.*.log"))
    assert agent_logs and all("stopped ({'collector': 0})" in p.read_text() for p in agent_logs)


def test_cold_start_cancels_jobs_recovered_from_saved_state(slurm_cluster, workdir: Path) -> None:
    """A machine image taken mid-run (CI's) holds a controller's saved state with running
    jobs and no process behind them: ``cluster.sh up`` from there must cancel them and give
    an idle cluster, not wait for SlurmdTimeout with the nodes in ``mix``."""
    if not slurm_cluster.project_cluster or not (SLURM_DIR / "run" / "slurmctld.pid").exists():
        pytest.skip("stopping the controller needs the project's own test cluster (tests/slurm/cluster.sh)")
    script = workdir / "sleep.sh"
    script.write_text("#!/bin/bash\nsleep 600\n")
    proc = subprocess.run(["sbatch", "--parsable", "-p", "a100", "-w", CRASH_NODE, "-t", "15",
                           f"--output={workdir / 'sleep.out'}", str(script)],
                          capture_output=True, text=True, timeout=30, check=True)
    job = proc.stdout.strip().split(";")[0]
    h.wait_for(lambda: h.job_state(int(job)) == "R", 60, f"job {job} running")
    # a controller that stops saves its state with the running job in it (its periodic saves
    # lag a change by seconds, or by none if it came before): stop it, then lose the node
    ctld = int((SLURM_DIR / "run" / "slurmctld.pid").read_text().strip())
    subprocess.run(["scontrol", "shutdown", "slurmctld"], capture_output=True, text=True, timeout=30, check=True)
    h.wait_for(lambda: not Path(f"/proc/{ctld}").exists(), 30, "slurmctld gone")
    _crash_node(CRASH_NODE)  # the job's processes go with its node's namespace
    up = subprocess.run(["bash", str(Path(__file__).parents[1] / "slurm" / "cluster.sh"), "up"],
                        capture_output=True, text=True, timeout=150, check=False)
    assert up.returncode == 0, up.stderr[-2000:]
    assert f"cancelling jobs recovered from saved state: {job}" in up.stderr, up.stderr
    assert h.job_state(int(job)) in ("CA", "CANCELLED"), h.job_state(int(job))
    assert _node_state(CRASH_NODE) == "idle"
