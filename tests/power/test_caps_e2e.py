"""Power caps end to end: the real ``llmenergy run-cell`` (local launcher) with FAKE NVML.

Every process the tests start has ``tests/fakes`` first on PYTHONPATH, so the
per-node guard's ``pynvml`` is the fake: it caps the simulated GPU that the rank
(computing on the CPU) announces through ``tests/fakes/rank/fake_rank_gpu.py``,
and logs every call with the caller's pid. No real GPU setting can be touched. Real signals go to real processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from launch_helpers import (
    FAKE_GPU_UUID,
    LONG_CELL,
    CellRun,
    FakeGpuNode,
    ProcInfo,
    batch_spans_ns,
    cell_id_of,
    make_env,
    start_run_cell,
    wait_for,
    wait_generation_started,
    write_config,
)

from llmenergy import entrypoints
from llmenergy.errors import ConfigError

CAP_W = 250.0
DEFAULT_W = 700.0
CAP_THEN_RESTORE = [(FAKE_GPU_UUID, CAP_W, True), (FAKE_GPU_UUID, DEFAULT_W, True)]


def _start(root: Path, node: FakeGpuNode, runs: list[CellRun], **cfg: object) -> CellRun:
    cell_id = cell_id_of(write_config(root, power_cap_w=CAP_W, **cfg))
    run = start_run_cell(root, cell_id, make_env(node))
    runs.append(run)
    return run


def _generating_under_cap(root: Path, runs: list[CellRun], settle_s: float) -> tuple[FakeGpuNode, CellRun, ProcInfo]:
    """A long capped cell, once its cap is applied and its rank generates: (node, run, guard process)."""
    node = FakeGpuNode(root)
    run = _start(root, node, runs, **LONG_CELL)
    guard = run.descendant(entrypoints.POWERCAP_GUARD)
    wait_for(lambda: node.limit_w() == CAP_W, "the cap to be applied", 60.0, run)
    wait_generation_started(run, settle_s=settle_s)
    return node, run, guard


def _assert_nothing_left(run: CellRun) -> None:
    left = run.session_processes()
    assert left == [], f"processes left running after run-cell exited: {left}"


def test_cap_set_then_restored_on_normal_exit(tmp_path: Path, runs: list[CellRun]) -> None:
    node = FakeGpuNode(tmp_path)
    run = _start(tmp_path, node, runs)
    code = run.wait()
    doc = run.cell_json()
    assert code == 0, run.logs()
    assert doc["status"] == "ok" and doc["reason"] is None
    assert node.sets() == CAP_THEN_RESTORE  # exactly one set and one restore, from the guard
    assert len(set(node.set_pids())) == 1
    assert node.limit_w() == DEFAULT_W
    cap = doc["provenance"]["power_cap"]
    assert cap["requested_w"] == CAP_W and cap["status"] == "applied" and cap["restored"] is True
    (gpu,) = cap["gpus"]
    assert gpu["uuid"] == FAKE_GPU_UUID
    assert (gpu["previous_w"], gpu["requested_w"], gpu["enforced_w"], gpu["restored_w"]) == (
        DEFAULT_W, CAP_W, CAP_W, DEFAULT_W)
    (state_node,) = cap["nodes"]
    assert state_node["applied_at_ns"] < state_node["restored_at_ns"]
    # The cap was in force while the rank generated: applied before warm-up, restored after the last batch.
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    gen = events[events["phase"].isin(["warmup", "prefill", "decode"])]
    assert state_node["applied_at_ns"] <= gen["start_ns"].min()
    assert gen["end_ns"].max() <= state_node["restored_at_ns"]
    _assert_nothing_left(run)


def test_sigterm_mid_decode_marks_incomplete_and_restores(tmp_path: Path, runs: list[CellRun]) -> None:
    node, run, guard = _generating_under_cap(tmp_path, runs, settle_s=1.0)
    sent_ns = time.time_ns()
    os.kill(run.proc.pid, signal.SIGTERM)  # to run-cell itself, as Slurm's time-limit signal would
    code = run.wait()
    doc = run.cell_json()
    assert code != 0, run.logs()
    assert doc["status"] == "incomplete", run.logs()
    assert doc["reason"] == f"interrupted by signal {int(signal.SIGTERM)}"
    assert doc["rank_exit_codes"] == [76]
    assert (run.root / "results" / "failed" / f"{run.cell_id}.json").exists()
    # The rank finished the batch it was decoding when the signal came, then stopped.
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    spans = batch_spans_ns(events)
    assert 0 < len(spans) < LONG_CELL["n_prompts"] // LONG_CELL["batch_size"], spans
    last_start, last_end = spans[max(spans)]
    assert last_start <= sent_ns <= last_end, "the signal should land while the last recorded batch ran"
    metrics = pd.read_parquet(run.cell_dir / "metrics.parquet")
    assert len(metrics) >= 1 and set(metrics["status"]) == {"incomplete"}
    # The guard restored the cap on the agent's stop; the launcher's safety net found nothing to do.
    assert node.sets() == CAP_THEN_RESTORE and node.limit_w() == DEFAULT_W
    assert node.set_pids() == [guard.pid, guard.pid]
    assert doc["provenance"]["power_cap"]["restored"] is True
    _assert_nothing_left(run)


def test_sigkill_of_a_rank_guard_restores(tmp_path: Path, runs: list[CellRun]) -> None:
    node, run, guard = _generating_under_cap(tmp_path, runs, settle_s=1.0)
    worker = run.descendant(entrypoints.WORKER)
    os.kill(worker.pid, signal.SIGKILL)
    code = run.wait()
    doc = run.cell_json()
    assert code != 0, run.logs()
    assert doc["status"] == "failed", run.logs()
    assert doc["rank_exit_codes"] == [-signal.SIGKILL]
    assert not (run.cell_dir / "events.parquet").exists()  # the killed rank 0 wrote nothing
    assert "rank 0 done" not in (run.cell_dir / "logs" / "rank0.log").read_text()  # killed mid-generation
    assert node.sets() == CAP_THEN_RESTORE and node.limit_w() == DEFAULT_W
    assert node.set_pids() == [guard.pid, guard.pid]  # the guard, outside the killed rank, restored
    state = json.loads((run.cell_dir / "powercap" / f"{doc['provenance']['power_cap']['nodes'][0]['node']}.json")
                       .read_text())
    assert state["restored"] is True and state["restore_reason"]
    assert doc["provenance"]["power_cap"]["restored"] is True
    _assert_nothing_left(run)


def test_sigkill_of_run_cell_still_restores_and_leaves_nothing(tmp_path: Path, runs: list[CellRun]) -> None:
    node, run, guard = _generating_under_cap(tmp_path, runs, settle_s=0.5)
    os.kill(run.proc.pid, signal.SIGKILL)  # the launcher itself, with no chance to clean up
    run.proc.wait(10)
    # Its children learn of it from the kernel (parent-death signal): the rank stops after its
    # batch, the agent stops the guard, which restores the cap.
    wait_for(lambda: run.session_processes() == [], "every process of the killed run-cell to end", 60.0)
    assert node.sets() == CAP_THEN_RESTORE and node.limit_w() == DEFAULT_W
    assert node.set_pids() == [guard.pid, guard.pid]
    status = json.loads((run.cell_dir / ".run" / "worker_status.json").read_text())
    assert status["status"] == "incomplete"  # the rank stopped early instead of running the whole cell
    assert not (run.cell_dir / "cell.json").exists()  # unfinished: Snakemake reruns it


@pytest.mark.parametrize(("policy", "expected_code"), [("fail", 1), ("skip", 0)])
def test_denied_permission(tmp_path: Path, runs: list[CellRun], policy: str, expected_code: int) -> None:
    node = FakeGpuNode(tmp_path)
    node.write(deny_set=True)
    run = _start(tmp_path, node, runs, on_power_cap_denied=policy)
    code = run.wait()
    doc = run.cell_json()
    assert code == expected_code, run.logs()
    assert doc["status"] == "power_cap_denied"
    assert FAKE_GPU_UUID in doc["reason"] and "no permission" in doc["reason"], doc["reason"]
    assert doc["provenance"]["power_cap"]["status"] == "denied"
    assert node.sets() == [(FAKE_GPU_UUID, CAP_W, False)]  # tried once, refused, nothing to restore
    assert node.limit_w() == DEFAULT_W
    # It never ran uncapped: no measured batch, no warm-up.
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    assert not set(events["phase"]) & {"warmup", "prefill", "decode"}
    assert (run.root / "results" / "failed" / f"{run.cell_id}.json").exists() == (policy == "fail")
    _assert_nothing_left(run)


def test_out_of_range_cap_is_a_config_error_before_anything_runs(tmp_path: Path) -> None:
    node = FakeGpuNode(tmp_path)
    write_config(tmp_path, power_cap_w=90)
    cmd = [sys.executable, "-m", entrypoints.CLI, "run-cell", "--config", "config.yaml", "--cell", "any",
           "--launcher", "local"]
    res = subprocess.run(cmd, cwd=tmp_path, env=make_env(node), capture_output=True, text=True, timeout=60)
    assert res.returncode == ConfigError.exit_code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == ["llmenergy: error: config.yaml: matrix[0].power_cap_w: 90 W is outside gpus.cpu's range "
                     "200–700 W"], res.stderr
    assert not (tmp_path / "results").exists()
    assert node.calls() == []
