"""The whole workflow through real Slurm and real Snakemake (issue 3): a 2-node
cell, a 1-node cell, the plan of the default config, an incremental rerun after
a failed cell, and `llmenergy submit` through submitit."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import slurm_helpers as h


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from h.private_workdir(request.node.name)

N_PROMPTS = h.TINY_DATASET["n_prompts"]


def _resources(output: str, rule: str = "run_cell", wildcard: str = "cell") -> dict[str, dict[str, str]]:
    """``{cell: {resource: value}}`` of the run_cell jobs (or ``{group: ...}`` of run_group) in Snakemake's output."""
    out: dict[str, dict[str, str]] = {}
    for block in output.split(f"rule {rule}:")[1:]:
        cell = re.search(rf"wildcards: .*\b{wildcard}=([A-Za-z0-9._-]+)", block)
        res = re.search(r"resources: (.*)", block)
        if cell and res:
            out[cell.group(1)] = dict(kv.split("=", 1) for kv in res.group(1).split(", ") if "=" in kv)
    return out


@pytest.mark.parametrize("packing", ["cell", "group"])
def test_plan_of_default_config_asks_for_whole_nodes(workdir: Path, packing: str) -> None:
    """`snakemake -n` of the default config: a 32-GPU A100 cell is 8 nodes × gpu:4
    on partition a100, and no cell asks a node for more GPUs than it has; packed
    (the profile's default), each cell's group job asks for exactly that."""
    from llmenergy.planning.groups import group_id

    shutil.copy(h.REPO / "config.yaml", workdir / "config.yaml")
    extra = ("--config", "packing=cell") if packing == "cell" else ()
    proc = subprocess.run(h.snakemake_args(workdir, "-n", *extra, timeout_s=120), cwd=workdir, env=h.env(),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = h.planned_cells(workdir)
    if packing == "cell":
        jobs = _resources(proc.stdout + proc.stderr)
    else:
        groups = _resources(proc.stdout + proc.stderr, "run_group", "group")
        assert len(groups) == len({group_id(c) for c in cells.values()}) < len(cells)
        jobs = {cid: groups[group_id(c)] for cid, c in cells.items()}
    assert set(jobs) == set(cells)
    big = [cid for cid, c in cells.items() if c.gpu == "A100" and c.shards == 32]
    assert big, "the default matrix should hold a 32-GPU A100 cell"
    for cid in big:
        assert jobs[cid]["nodes"] == "8" and jobs[cid]["gres"] == "gpu:4"
        assert jobs[cid]["slurm_partition"] == "a100" and jobs[cid]["tasks"] == "32"
        assert jobs[cid]["mpi"] == "srun"
    per_node = {"V100": 2, "A100": 4}
    for cid, res in jobs.items():
        gpus = int(res["gres"].removeprefix("gpu:"))
        assert gpus <= per_node[cells[cid].gpu], (cid, res)
        assert gpus * int(res["nodes"]) == cells[cid].shards, (cid, res)
        assert "--signal=TERM@" in res["slurm_extra"]


@pytest.mark.slurm
def test_two_node_and_one_node_cells(workdir: Path) -> None:
    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1)},
                                           [h.group("V1", 2), h.group("V1", 1)]))
    two, one = h.cell_id(workdir, shards=2), h.cell_id(workdir, shards=1)
    # The profile polls squeue; this run overrides it to exercise the plugin's default sacct path.
    run = h.run_snakemake(workdir, "--slurm-status-command", "sacct")
    assert run.returncode == 0, run.tail()
    assert sorted(run.executed_cells) == sorted([two, one])

    for cell, nodes in ((two, 2), (one, 1)):
        (job,) = run.job_ids(cell)
        rows = {r["JobID"]: r for r in h.sacct(job)}
        assert rows[str(job)]["State"] == "COMPLETED" and rows[str(job)]["NNodes"] == str(nodes)
        # run-cell runs in the batch step; its srun steps are the node agents and the ranks
        steps = [k for k in rows if re.fullmatch(rf"{job}\.\d+", k)]
        assert len(steps) == 2, rows
        assert all(rows[s]["NNodes"] == str(nodes) for s in steps), rows
        info = h.cell_json(workdir, cell)
        assert info["status"] == "ok" and info["launcher"] == "srun"
        assert info["provenance"]["slurm_job_id"] == str(job)
        rank_hosts = {g["rank"]: g["node"] for g in info["provenance"]["gpus"]}
        assert sorted(rank_hosts) == list(range(nodes))
        assert len(set(rank_hosts.values())) == nodes, rank_hosts  # one rank per node
        offsets = info["provenance"]["clock_offsets_ns"]  # measured across the nodes at the job's start
        assert sorted(offsets) == sorted(set(rank_hosts.values())) and offsets[rank_hosts[0]] == 0
        assert all(abs(o) < 5_000_000 for o in offsets.values()), offsets  # the test nodes share one host's clock
        m = h.metrics_row(workdir, cell)
        assert m["status"] == "ok" and m["nodes"] == nodes and m["shards"] == nodes
        assert m["tokens_out"] == N_PROMPTS * 4 * 1  # n_prompts × max_gen_len × repeats
        assert m["responses"] == N_PROMPTS and m["energy_j"] > 0
    assert (workdir / "results" / "report.html").is_file()


@pytest.mark.slurm
def test_an_engine_switch_set_where_snakemake_runs_reaches_the_ranks_and_its_change_reruns_the_cell(
        workdir: Path) -> None:
    """A compiled engine's switch set in the submit environment passes through sbatch and
    srun to ranks on two nodes: the cell's definition (its fingerprint) and what its rank
    0 ran with both carry it. Planned without it, the cell would rerun, and `-n` says why."""
    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1)}, [h.group("V1", 2, engine="compiled")]))
    (cell,) = h.planned_cells(workdir)
    switch = {"LLMENERGY_KEY_BUCKETS": "0"}
    run = h.run_snakemake(workdir, extra_env=switch)
    assert run.returncode == 0, run.tail()
    info = h.cell_json(workdir, cell)
    assert info["status"] == "ok" and info["launcher"] == "srun"
    assert len({g["node"] for g in info["provenance"]["gpus"]}) == 2
    assert info["definition"]["engine_switches"] == switch
    assert info["provenance"]["load"]["engine_switches"] == switch

    same = h.run_snakemake(workdir, "-n", extra_env=switch)
    assert same.returncode == 0 and same.executed_cells == [] and "config changed" not in same.output, same.tail()
    without = h.run_snakemake(workdir, "-n")  # lists the cell's job and says why; moves nothing
    assert without.returncode == 0 and without.executed_cells == [cell], without.tail()
    assert f"{cell}: config changed (engine_switches.LLMENERGY_KEY_BUCKETS: 0 → null); would rerun (dry run)" \
        in without.output, without.tail()
    assert h.cell_json(workdir, cell)["definition"]["engine_switches"] == switch


@pytest.mark.slurm
def test_rerun_after_a_failed_cell_runs_only_that_cell(workdir: Path) -> None:
    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1), "A1": h.gpu_type("a100", 1)},
                                           [h.group("V1", 1), h.group("A1", 1), h.group("A1", 2)]))
    cells = list(h.planned_cells(workdir))
    bad = h.cell_id(workdir, gpu="A1", shards=1)
    others = [c for c in cells if c != bad]

    first = h.run_snakemake(workdir, fail_cells=[bad])
    assert first.returncode != 0, first.tail()
    assert sorted(first.executed_cells) == sorted(cells)
    assert "Error in rule run_cell" in first.output
    failed = json.loads((workdir / "results" / "failed" / f"{bad}.json").read_text())
    assert failed["status"] == "failed" and "FAKE rank failure" in failed["reason"]
    assert not (h.cell_dir(workdir, bad) / "metrics.parquet").exists()
    assert all(h.cell_json(workdir, c)["status"] == "ok" for c in others)
    before = h.fingerprint(workdir, others)

    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_cells == [bad]
    assert h.cell_json(workdir, bad)["status"] == "ok"
    assert h.fingerprint(workdir, others) == before


@pytest.mark.slurm
def test_failed_cell_leaves_a_partial_report_and_its_retry_asks_for_more_time(workdir: Path) -> None:
    """Issue 15 (3, 4): a cell that fails (injected from outside: the rank fakes) is retried
    by Snakemake with twice the time, still fails, and the run writes a report of what
    finished that names it, with its reason and logs; the run exits non-zero."""
    from llmenergy.slurm import parse_time_limit_min

    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1)}, [h.group("V1", 1), h.group("V1", 2)]))
    bad, good = h.cell_id(workdir, shards=2), h.cell_id(workdir, shards=1)
    run = h.run_snakemake(workdir, "--retries", "1", fail_cells=[bad])
    assert run.returncode != 0, run.tail()
    assert set(run.executed_cells) == {bad, good}
    jobs = run.job_ids(bad)
    assert len(jobs) == 2, run.tail()  # the first attempt and its retry
    limits = [parse_time_limit_min(h.sacct(j, "JobID,Timelimit")[0]["Timelimit"]) for j in jobs]
    assert limits[0] is not None and limits[1] == 2 * limits[0], limits

    report = (workdir / "results" / "report.html").read_text()
    section = report[report.index('id="not-measured"'):report.index("Cells without a measured power")
                     if "Cells without a measured power" in report else None]
    assert bad in section and good not in section
    assert "FAKE rank failure" in section
    assert f"logs/run_cell/{bad}.log" in section and f"cells/{bad}/logs/" in section
    summary = pd.read_parquet(workdir / "results" / "summary.parquet")
    status = dict(zip(summary.cell_id, summary.status, strict=True))
    assert status == {good: "ok", bad: "failed"}
    assert summary.set_index("cell_id").loc[good, "fingerprint"] == h.cell_json(workdir, good)["fingerprint"]


@pytest.mark.slurm
def test_llmenergy_submit_runs_a_cell_through_submitit(workdir: Path) -> None:
    h.write_config(workdir, h.tiny_config({"V1": h.gpu_type("v100", 1)}, [h.group("V1", 2), h.group("V1", 1)]))
    cell = h.cell_id(workdir, shards=2)
    proc = subprocess.run(
        ["timeout", "-s", "INT", "240", str(h.VENV_BIN / "llmenergy"), "submit", "--config", "config.yaml",
         "--cells", cell, "--executor", "slurm", "--wait"],
        cwd=workdir, env=h.env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    job_id, name, state = proc.stdout.splitlines()[-1].split("\t")
    assert name == cell and state == "COMPLETED"
    rows = {r["JobID"]: r for r in h.sacct(int(job_id))}
    assert rows[job_id]["NNodes"] == "2"
    info = h.cell_json(workdir, cell)
    assert info["status"] == "ok" and info["provenance"]["slurm_job_id"] == job_id
    assert len(info["provenance"]["hosts"]) == 2
    assert h.metrics_row(workdir, cell)["tokens_out"] == N_PROMPTS * 4
    assert (workdir / "results" / "submitit" / job_id).is_dir()
    # only the requested cell ran
    assert [p.name for p in (workdir / "results" / "cells").iterdir()] == [cell]
