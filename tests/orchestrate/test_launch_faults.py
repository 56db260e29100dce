"""Faults of a local ``llmenergy run-cell``, end to end with real processes.

CUDA out-of-memory is faked in the rank (``tests/fakes/rank/fake_oom.py``, armed
by ``FAKE_OOM_AT_BATCH``), since the test machines have no GPU memory to
exhaust, and a slow decode (``tests/fakes/rank/fake_slow_decode.py``) gives a test
the time to signal the job there. The collector is killed with a real SIGKILL; stop
signals go to the whole process group, as Snakemake and ``scancel`` send them.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from launch_helpers import (
    LONG_CELL,
    CellRun,
    cell_id_of,
    make_env,
    start_run_cell,
    wait_for,
    write_config,
)

from llmenergy import entrypoints


def _run(root: Path, runs: list[CellRun], cell_id: str, *extra: str, timeout_s: float = 90.0,
         **env_kw: object) -> tuple[CellRun, int]:
    env = make_env(None, **env_kw)
    env["FAKE_OOM_LOG"] = str(root / "fake_oom.jsonl")
    run = start_run_cell(root, cell_id, env, *extra)
    runs.append(run)
    return run, run.wait(timeout_s)


def _oom_injections(root: Path) -> list[dict[str, int]]:
    path = root / "fake_oom.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(("policy", "expected_code"), [("record", 0), ("fail", 1)])
def test_oom_is_recorded_not_rerun(tmp_path: Path, runs: list[CellRun], policy: str, expected_code: int) -> None:
    cell_id = cell_id_of(write_config(tmp_path, on_oom=policy, n_prompts=6, batch_size=2))
    run, code = _run(tmp_path, runs, cell_id, oom_at_batch=1)
    doc = run.cell_json()
    assert code == expected_code, run.logs()
    assert doc["status"] == "oom", run.logs()
    assert "out of memory" in doc["reason"].lower()
    assert doc["rank_exit_codes"] == [75]
    assert [i["batch"] for i in _oom_injections(tmp_path)] == [1]  # one attempt, no retry inside the cell
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    measured = events[events["repeat"] >= 0]
    assert set(measured["batch_index"]) == {0}  # batch 0 done; batch 1 ran out of memory; batch 2 never ran
    metrics = pd.read_parquet(run.cell_dir / "metrics.parquet")
    assert len(metrics) >= 1 and set(metrics["status"]) == {"oom"}
    assert (tmp_path / "results" / "failed" / f"{cell_id}.json").exists() == (policy == "fail")
    assert run.session_processes() == []
    if policy == "record":  # a recorded oom is a finished cell: running it again changes nothing
        before = (run.cell_dir / "cell.json").stat().st_mtime_ns
        again, code = _run(tmp_path, runs, cell_id, oom_at_batch=1)
        assert code == 0, again.logs()
        assert (run.cell_dir / "cell.json").stat().st_mtime_ns == before
        assert len(_oom_injections(tmp_path)) == 1
        assert "launching" not in again.output()


def test_finished_cell_is_skipped_and_rerun_with_force(tmp_path: Path, runs: list[CellRun]) -> None:
    cell_id = cell_id_of(write_config(tmp_path, n_prompts=4, batch_size=2))
    first, code = _run(tmp_path, runs, cell_id)
    assert code == 0, first.logs()
    cell_json = first.cell_dir / "cell.json"
    before_ns, before_text = cell_json.stat().st_mtime_ns, cell_json.read_text()
    rank_log_size = (first.cell_dir / "logs" / "rank0.log").stat().st_size
    assert json.loads(before_text)["status"] == "ok"

    again, code = _run(tmp_path, runs, cell_id)
    assert code == 0, again.logs()
    assert "already finished" in again.output() and "launching" not in again.output()
    assert cell_json.stat().st_mtime_ns == before_ns and cell_json.read_text() == before_text
    assert (first.cell_dir / "logs" / "rank0.log").stat().st_size == rank_log_size  # no rank started

    forced, code = _run(tmp_path, runs, cell_id, "--force")
    assert code == 0, forced.logs()
    assert "launching" in forced.output()
    assert cell_json.stat().st_mtime_ns > before_ns
    assert json.loads(cell_json.read_text())["status"] == "ok"
    assert (first.cell_dir / "logs" / "rank0.log").stat().st_size > rank_log_size


def test_collector_killed_mid_cell_fails_the_cell_at_once_naming_the_node(tmp_path: Path,
                                                                        runs: list[CellRun]) -> None:
    """Issue 22: a collector that dies leaves its node unmetered; the cell fails at once with
    that error naming the node (it used to go on, recovered from parts, and end ``ok``). Its
    parts are still merged into ``power.parquet`` for inspection; ``failed`` is never accepted."""
    # A long cell: the collector dies while its rank is still measuring.
    cell_id = cell_id_of(write_config(tmp_path, idle_baseline_s=3.0, **LONG_CELL))
    env = make_env(None)
    run = start_run_cell(tmp_path, cell_id, env)
    runs.append(run)
    collector = run.descendant(entrypoints.COLLECTOR)
    power_dir = run.cell_dir / ".run" / "power"
    wait_for(lambda: any(power_dir.glob("*.part-*.parquet")), "the collector's first part file", 30.0, run)
    killed = time.monotonic()
    os.kill(collector.pid, signal.SIGKILL)
    code = run.wait(90.0)
    ended_s = time.monotonic() - killed
    doc = run.cell_json()
    assert code == 1, run.logs()
    assert doc["status"] == "failed", run.logs()
    host = doc["provenance"]["hosts"][0]
    assert f"collector on node {host} failed: collector killed by signal 9" in doc["reason"]
    assert ended_s < 15.0, f"the cell went on {ended_s:.0f} s after its collector died\n{run.logs()}"
    assert doc["power_recovered_from_parts"] == [host]
    assert len(pd.read_parquet(run.cell_dir / "power.parquet")) > 0  # the parts, kept for inspection
    assert (tmp_path / "results" / "failed" / f"{cell_id}.json").exists()
    assert run.session_processes() == []


def test_stop_signal_to_the_process_group_in_the_last_decode_is_incomplete_and_reruns(
        tmp_path: Path, runs: list[CellRun]) -> None:
    """Issue 22: SIGTERM to every process of the job (Snakemake's and Slurm's scancel) during the
    last decode. The ranks finish the batch, the collector has already stopped: the cell used to
    be recorded ``ok`` with repeat energy missing, and never rerun."""
    cell_id = cell_id_of(write_config(tmp_path, n_prompts=4, batch_size=2, max_gen_len=8))
    mark = tmp_path / "in_last_decode"
    env = make_env(None)
    env.update(FAKE_SLOW_DECODE_BATCH="1", FAKE_SLOW_DECODE_S="4", FAKE_SLOW_DECODE_MARK=str(mark))
    run = start_run_cell(tmp_path, cell_id, env)
    runs.append(run)
    wait_for(mark.exists, "rank 0 in the last batch's decode", 120.0, run)
    os.killpg(run.proc.pid, signal.SIGTERM)  # run-cell leads its own session and process group
    code = run.wait(90.0)
    doc = run.cell_json()
    assert code != 0, run.logs()
    assert doc["status"] == "incomplete", run.logs()
    assert doc["reason"] and "signal 15" in doc["reason"]
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    assert set(events[events["repeat"] >= 0]["batch_index"]) == {0, 1}  # the ranks did finish the batch
    assert set(pd.read_parquet(run.cell_dir / "metrics.parquet")["status"]) == {"incomplete"}
    assert run.session_processes() == []
    again = start_run_cell(tmp_path, cell_id, make_env(None))
    runs.append(again)
    assert again.wait(120.0) == 0, again.logs()
    assert "launching" in again.output()  # not taken as finished
    assert again.cell_json()["status"] == "ok"


def test_metrics_failure_fails_the_cell_and_keeps_the_raw_data(tmp_path: Path, runs: list[CellRun]) -> None:
    """Issue 14: a cell whose metrics cannot be computed is not finished. It used to
    exit 0 (the status was checked before the metrics step), delete ``.run/`` and
    write nothing to ``failed/``, so ``llmenergy submit`` reported it COMPLETED."""
    cell_id = cell_id_of(write_config(tmp_path))
    env = make_env(None)
    env["FAKE_METRICS_CRASH"] = "1"
    run = start_run_cell(tmp_path, cell_id, env)
    runs.append(run)
    code = run.wait(90.0)
    assert code == 1, run.logs()
    doc = run.cell_json()
    assert doc["status"] == "failed" and "FAKE metrics failure" in doc["reason"]
    failed = json.loads((tmp_path / "results" / "failed" / f"{cell_id}.json").read_text())
    assert failed["status"] == "failed"
    assert (run.cell_dir / "events.parquet").is_file() and (run.cell_dir / "responses.parquet").is_file()
    assert (run.cell_dir / ".run").is_dir()  # the raw collector files stay for inspection
    assert not (run.cell_dir / "metrics.parquet").exists()
    # not finished: the next run-cell runs it again (and, without the fault, finishes it)
    again = start_run_cell(tmp_path, cell_id, make_env(None))
    runs.append(again)
    assert again.wait(90.0) == 0, again.logs()
    assert again.cell_json()["status"] == "ok"
