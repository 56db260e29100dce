"""The Snakemake route end to end: llmenergy.slurm's resources and srun forms
under snakemake-executor-plugin-slurm, a one-rank and a two-node cell."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

SNAKEFILE = """
from dataclasses import dataclass
from llmenergy.slurm import resources_for, snakemake_resources, srun_collector_args, srun_worker_args

@dataclass
class Gpu:
    name: str = "T"
    partition: str = "{partition}"
    gpus_per_node: int = {gpn}
    memory_gb: int = 32
    cpus_per_gpu: int = 1

ONE = resources_for(1, Gpu(), 3)
MANY = resources_for({ranks}, Gpu(), 3)
REPORT = "echo $SLURM_PROCID $SLURM_NTASKS $(hostname) $CUDA_VISIBLE_DEVICES"
LAUNCH = "{{params.collector}} hostname > {{output.hosts}}; {{params.worker}} bash -c '{{REPORT}}' > {{output.ranks}}"

rule all:
    input: "ranks.one.txt", "ranks.many.txt"

rule one_rank:
    output: ranks="ranks.one.txt", hosts="hosts.one.txt"
    resources: **snakemake_resources(ONE)
    params: worker=" ".join(srun_worker_args(ONE)), collector=" ".join(srun_collector_args(ONE))
    shell: LAUNCH

rule many_ranks:
    output: ranks="ranks.many.txt", hosts="hosts.many.txt"
    resources: **snakemake_resources(MANY)
    params: worker=" ".join(srun_worker_args(MANY)), collector=" ".join(srun_collector_args(MANY))
    shell: LAUNCH
"""


def _two_node_partition(cluster) -> tuple[str, int]:
    for part, nodes in sorted(cluster.partitions.items()):
        if len(nodes) >= 2 and cluster.gpus_per_node(part) >= 2:
            return part, cluster.gpus_per_node(part)
    pytest.skip(f"no partition with 2 nodes of 2+ GPUs: {cluster.partitions}")


def test_snakemake_cells_one_rank_and_two_nodes(slurm_cluster, tmp_path: Path) -> None:
    part, gpn = _two_node_partition(slurm_cluster)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(partition=part, gpn=gpn, ranks=2 * gpn))
    proc = subprocess.run(
        ["timeout", "-s", "INT", "150", sys.executable, "-m", "snakemake", "-j", "2",
         "--executor", "slurm", "--slurm-init-seconds-before-status-checks", "2"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = (tmp_path / "ranks.one.txt").read_text().split()
    assert one[:2] == ["0", "1"] and "," not in one[3]
    ranks = sorted(line.split() for line in (tmp_path / "ranks.many.txt").read_text().splitlines())
    assert [int(r[0]) for r in ranks] == list(range(2 * gpn))
    assert {r[1] for r in ranks} == {str(2 * gpn)}
    assert len({r[2] for r in ranks}) == 2
    assert all("," not in r[3] for r in ranks), ranks
    assert len(set((tmp_path / "hosts.many.txt").read_text().split())) == 2
