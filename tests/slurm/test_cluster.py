"""Real jobs on the Slurm test cluster: multi-node placement, fake GPUs, and the
srun forms of llmenergy.slurm run for real inside an allocation."""
from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

import pytest

from llmenergy.config import GpuSpec
from llmenergy.slurm import (
    resources_for,
    sbatch_args,
    srun_collector_args,
    srun_worker_args,
)

pytestmark = pytest.mark.slurm

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


# the config's GPU type with the small memory and CPU counts of the test cluster
GpuType = functools.partial(GpuSpec, memory_gb=32, cpus_per_gpu=2)


def _multi_gpu_partition(cluster) -> tuple[str, int]:
    """A partition with at least 2 nodes of at least 2 GPUs."""
    for part, nodes in sorted(cluster.partitions.items()):
        if len(nodes) >= 2 and cluster.gpus_per_node(part) >= 2:
            return part, cluster.gpus_per_node(part)
    pytest.skip(f"no partition with 2 nodes of 2+ GPUs: {cluster.partitions}")


def _sbatch(args: list[str], script: str, tmp_path: Path) -> str:
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\nset -eu\n" + script)
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wait_sacct(job_id: str, timeout_s: float = 60.0) -> dict[str, str]:
    """Poll sacct until the job's allocation row has a terminal state."""
    deadline = time.monotonic() + timeout_s
    row: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,NNodes,NodeList,ExitCode"],
                             capture_output=True, text=True, timeout=15, check=False).stdout
        for line in out.splitlines():
            fields = line.split("|")
            if fields[0] == job_id:
                row = dict(zip(["JobID", "State", "NNodes", "NodeList", "ExitCode"], fields, strict=True))
        if row.get("State", "").split(" ")[0] in TERMINAL:
            return row
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} not finished after {timeout_s} s: {row}")


def test_two_node_job_runs_on_two_hosts(slurm_cluster, tmp_path: Path) -> None:
    part, _ = _multi_gpu_partition(slurm_cluster)
    out = tmp_path / "out.txt"
    job = _sbatch(["sbatch", "--parsable", "-p", part, "-N2", "--ntasks-per-node=1", "-t", "2",
                   f"--output={out}"], "srun hostname\n", tmp_path)
    row = _wait_sacct(job)
    assert row["State"] == "COMPLETED", row
    assert row["NNodes"] == "2"
    hosts = out.read_text().split()
    assert len(hosts) == 2 and len(set(hosts)) == 2, hosts
    if slurm_cluster.project_cluster:  # each slurmd has its node's name as hostname
        assert sorted(hosts) == sorted(slurm_cluster.partitions[part][:2])


def test_gres_sets_visible_devices(slurm_cluster, tmp_path: Path) -> None:
    part, gpn = _multi_gpu_partition(slurm_cluster)
    out = tmp_path / "out.txt"
    script = 'echo "$CUDA_VISIBLE_DEVICES|$SLURM_GPUS_ON_NODE|$SLURM_JOB_GPUS"\n'
    job = _sbatch(["sbatch", "--parsable", "-p", part, "-N1", f"--gres=gpu:{gpn}", "-t", "2",
                   f"--output={out}"], script, tmp_path)
    assert _wait_sacct(job)["State"] == "COMPLETED"
    visible, on_node, job_gpus = out.read_text().strip().split("|")
    assert len(visible.split(",")) == gpn
    assert on_node == str(gpn)
    assert len(job_gpus.split(",")) == gpn


def test_builders_give_one_gpu_per_rank_across_nodes(slurm_cluster, tmp_path: Path) -> None:
    part, gpn = _multi_gpu_partition(slurm_cluster)
    res = resources_for(2 * gpn, GpuType("T", part, gpn), time_limit_min=3)
    assert res.nodes == 2
    ranks_out, coll_out = tmp_path / "ranks.txt", tmp_path / "collectors.txt"
    report = 'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $(hostname) $CUDA_VISIBLE_DEVICES"'
    script = (
        f"{' '.join(srun_collector_args(res))} bash -c '{report}' > {coll_out}\n"
        f"{' '.join(srun_worker_args(res))} bash -c '{report}' > {ranks_out}\n"
    )
    job = _sbatch(sbatch_args(res, "llmenergy-test", str(tmp_path / "job.out")), script, tmp_path)
    row = _wait_sacct(job)
    assert row["State"] == "COMPLETED", (row, (tmp_path / "job.out").read_text())
    assert row["NNodes"] == "2"
    ranks = sorted(line.split() for line in ranks_out.read_text().splitlines())
    assert sorted(int(r[0]) for r in ranks) == list(range(res.ranks))
    assert {r[2] for r in ranks} == {str(res.ranks)}
    for _, local, _, host, visible in ranks:
        assert "," not in visible, f"rank on {host} sees several GPUs: {visible}"
    per_host: dict[str, set[str]] = {}
    for _, _, _, host, visible in ranks:
        per_host.setdefault(host, set()).add(visible)
    assert len(per_host) == 2 and all(len(v) == gpn for v in per_host.values()), per_host
    collectors = coll_out.read_text().split("\n")
    assert len({line.split()[3] for line in collectors if line}) == 2
