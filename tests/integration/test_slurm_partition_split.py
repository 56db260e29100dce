"""Jobs fit the partition (issue 21): on the test cluster's ``short`` partition (MaxTime 15
min, read from ``sinfo``), a group of 4 cells whose one job would ask for 19 min runs as two
consecutive jobs of 2 cells, each asking for at most 15 min: Slurm refuses none, every cell
runs; a rerun runs only the part with an unfinished cell.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_helpers as h

from llmenergy.planning.groups import group_id
from llmenergy.slurm import parse_time_limit_min

pytestmark = pytest.mark.slurm

PARTITION = "short"


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True, timeout=30, check=False)
    limits = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
    if parse_time_limit_min(limits.get(PARTITION, "")) != 15:
        pytest.skip(f"the test cluster has no partition {PARTITION!r} with MaxTime 15 (`tests/slurm/cluster.sh up` "
                    f"adds it): {out.stdout.strip()!r}")
    yield from h.private_workdir(request.node.name)


def _status(workdir: Path, cell: str) -> str | None:
    path = h.cell_dir(workdir, cell) / "cell.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def test_a_group_longer_than_the_partition_runs_as_parts_that_fit(workdir: Path) -> None:
    cfg = h.tiny_config({"S": h.gpu_type(PARTITION, 2)},
                        [{**h.group("S", 1), "batch_size": [1, 2], "max_gen_len": [4, 6]}])
    del cfg["packing"]  # the default of every route: group
    h.write_config(workdir, cfg)
    cells = list(h.planned_cells(workdir))
    (gid,) = {group_id(c) for c in h.planned_cells(workdir).values()}
    parts = [f"{gid}.cells1-2", f"{gid}.cells3-4"]

    plan = subprocess.run([sys.executable, "-m", "llmenergy.cli", "plan", "--config", "config.yaml",
                           "--format", "json"], cwd=workdir, env=h.env(), capture_output=True, text=True,
                          timeout=120, check=True)
    groups = json.loads(plan.stdout)["groups"]
    assert [(g["group_id"], g["part"], g["max_time_min"]) for g in groups] == [
        (parts[0], "1/2", 15), (parts[1], "2/2", 15)]
    assert all(g["time_limit_min"] <= 15 for g in groups)

    first = h.run_snakemake(workdir, timeout_s=420)
    assert first.returncode == 0, first.tail()
    assert sorted(first.executed_groups) == parts
    assert "Error in rule" not in first.output and "sbatch: error" not in first.output
    assert all(_status(workdir, c) == "ok" for c in cells)
    jobs: dict[int, list[str]] = {}
    for c in cells:
        prov = h.cell_json(workdir, c)["provenance"]
        assert prov["group"]["group_id"] in parts
        assert prov["slurm_time_limit_min"] is not None and prov["slurm_time_limit_min"] <= 15
        jobs.setdefault(int(prov["slurm_job_id"]), []).append(c)
    assert sorted(jobs.values()) == [cells[:2], cells[2:]]  # two jobs, consecutive cells
    for job in jobs:
        rows = [r for r in h.sacct(job, "JobID,Timelimit,State") if r["JobID"] == str(job)]
        assert parse_time_limit_min(rows[0]["Timelimit"]) <= 15 and rows[0]["State"] == "COMPLETED", rows

    # one cell of the second part made unfinished: only that part runs again, for that cell
    victim = cells[3]
    for name in ("cell.json", "metrics.parquet"):
        (h.cell_dir(workdir, victim) / name).unlink()
    before = h.fingerprint(workdir, cells[:3])
    second = h.run_snakemake(workdir, timeout_s=300)
    assert second.returncode == 0, second.tail()
    assert second.executed_groups == [parts[1]]
    ran = json.loads((workdir / "results" / "groups" / parts[1] / "group.json").read_text())["cells"]
    assert ran == [victim] and _status(workdir, victim) == "ok"
    assert h.fingerprint(workdir, cells[:3]) == before
