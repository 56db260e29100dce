"""Packing on the real test cluster (issue 18): a group of 4 cells runs as one Slurm
job with one model load; a cell made to fail inside it leaves the other three
finished; a ``scancel`` mid-group and a rerun run only the unfinished cells; a
rerun after success submits nothing.

The configs leave ``packing`` unset: ``profiles/slurm`` packs by default.
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_helpers as h

from llmenergy.planning.groups import group_id

pytestmark = pytest.mark.slurm


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from h.private_workdir(request.node.name)


def _four_cell_group(workdir: Path, dataset: str = "tiny", max_gen_len: int = 4) -> tuple[str, list[str]]:
    """One group of 4 cells (2 batch sizes × 2 generation lengths), 2 ranks on the two a100 nodes."""
    cfg = h.tiny_config({"A1": h.gpu_type("a100", 1)},
                        [{**h.group("A1", 2, dataset=dataset), "batch_size": [1, 2],
                          "max_gen_len": [max_gen_len, max_gen_len + 2]}])
    del cfg["packing"]  # the profile's default: group
    h.write_config(workdir, cfg)
    cells = list(h.planned_cells(workdir).values())
    gids = {group_id(c) for c in cells}
    assert len(cells) == 4 and len(gids) == 1
    return gids.pop(), [c.id for c in cells]


def _status(workdir: Path, cell: str) -> str | None:
    path = h.cell_dir(workdir, cell) / "cell.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def _group_dir(workdir: Path, gid: str) -> Path:
    return workdir / "results" / "groups" / gid


def _loads(workdir: Path, gid: str) -> int:
    return (_group_dir(workdir, gid) / "logs" / "rank0.log").read_text(errors="replace").count("built llama-tiny")


def test_group_is_one_job_with_one_load_and_a_failed_cell_keeps_the_others(workdir: Path) -> None:
    gid, cells = _four_cell_group(workdir)
    victim = cells[1]
    first = h.run_snakemake(workdir, fail_cells=[victim])
    assert first.returncode != 0, first.tail()
    assert first.executed_groups == [gid] and first.executed_cells == []  # one Slurm job for 4 cells
    assert _loads(workdir, gid) == 1
    assert {c: _status(workdir, c) for c in cells} == {c: "failed" if c == victim else "ok" for c in cells}
    assert not (_group_dir(workdir, gid) / "done.json").exists()
    assert (workdir / "results" / "report.html").exists()  # the partial report
    others = [c for c in cells if c != victim]
    before = h.fingerprint(workdir, others)

    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_groups == [gid]
    ran = json.loads((_group_dir(workdir, gid) / "group.json").read_text())["cells"]
    assert ran == [victim]  # only the failed cell, in a job sized for it
    assert _status(workdir, victim) == "ok"
    assert h.fingerprint(workdir, others) == before

    third = h.run_snakemake(workdir)
    assert third.returncode == 0, third.tail()
    assert third.executed_groups == [] and "SLURM jobid" not in third.output  # nothing submitted


def test_scancel_mid_group_then_rerun_runs_only_the_unfinished_cells(workdir: Path) -> None:
    gid, cells = _four_cell_group(workdir, dataset="slow", max_gen_len=24)
    proc, log_path, started = h.start_snakemake(workdir)
    try:
        h.wait_for(lambda: _status(workdir, cells[0]) == "ok", 150, "the group's first cell")
        job = h.wait_for(lambda: h.job_ids(workdir, gid, rule="run_group"), 30, "the group's job id")[-1]
        assert _status(workdir, cells[-1]) is None, "the group finished before the scancel"
        subprocess.run(["scancel", str(job)], check=True, timeout=30)
    finally:
        first = h.finish_snakemake(proc, log_path, started)
    assert first.returncode != 0
    done_before = [c for c in cells if _status(workdir, c) == "ok"]
    assert cells[0] in done_before and len(done_before) < len(cells)
    before = h.fingerprint(workdir, done_before)

    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_groups == [gid]
    ran = json.loads((_group_dir(workdir, gid) / "group.json").read_text())["cells"]
    assert ran == [c for c in cells if c not in done_before]
    assert all(_status(workdir, c) == "ok" for c in cells)
    assert h.fingerprint(workdir, done_before) == before  # finished cells are never rerun


def test_a_rank_failing_alone_ends_the_group_and_the_rerun_runs_the_unfinished(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: rank 1 of 2 raises in cell 2 of 4 while rank 0 waits for it in a
    collective. The job does not hang: it ends within a minute of the failure, cell 2
    is recorded failed (rank 1's reason), cells 3 and 4 are left unfinished, and the
    rerun runs exactly cells 2-4."""
    from datetime import datetime

    gid, cells = _four_cell_group(workdir)
    victim = cells[1]
    monkeypatch.setenv("FAKE_CRASH_RANKS", "1")  # the submit environment passes it to the ranks
    first = h.run_snakemake(workdir, fail_cells=[victim])
    assert first.returncode != 0, first.tail()
    assert first.executed_groups == [gid]
    assert {c: _status(workdir, c) for c in cells} == {cells[0]: "ok", victim: "failed", cells[2]: None,
                                                     cells[3]: None}
    record = h.cell_json(workdir, victim)
    assert "rank 1" in record["reason"] and "FAKE rank failure" in record["reason"], record["reason"]
    failed_ns = json.loads((h.cell_dir(workdir, victim) / ".run" / "ranks" / "1.json").read_text())["at_ns"]
    finalised = datetime.strptime(record["provenance"]["finished_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert finalised - failed_ns / 1e9 < 60  # every rank left the cell, the launcher recorded it
    before = h.fingerprint(workdir, [cells[0]])

    monkeypatch.delenv("FAKE_CRASH_RANKS")
    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    ran = json.loads((_group_dir(workdir, gid) / "group.json").read_text())["cells"]
    assert ran == cells[1:]
    assert all(_status(workdir, c) == "ok" for c in cells)
    assert h.fingerprint(workdir, [cells[0]]) == before
