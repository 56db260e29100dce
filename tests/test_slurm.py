"""Golden tests of llmenergy.slurm: env table, node lists, layouts, command builders."""
from __future__ import annotations

import subprocess

import pytest

from llmenergy.config import GpuSpec
from llmenergy.errors import UserError
from llmenergy.slurm import (
    Resources,
    ShardLayoutError,
    SlurmEnv,
    expand_nodelist,
    rendezvous,
    rendezvous_port,
    resolve_node_addr,
    resources_for,
    sbatch_args,
    snakemake_resources,
    srun_collector_args,
    srun_worker_args,
)

A100 = GpuSpec("A100", "a100", 4, 80, constraint="a100_80g")
H100 = GpuSpec("H100", "gpu", 8, 80, account="proj42", qos="high", cpus_per_gpu=8,
               mem_mb_per_gpu=64000)


# ---------------------------------------------------------------- node lists

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node[1-3,5],gpu07", ["node1", "node2", "node3", "node5", "gpu07"]),
        ("node1", ["node1"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a[3],b,c[9-10]-ib", ["a3", "b", "c9-ib", "c10-ib"]),
        ("  node[2-3] ", ["node2", "node3"]),
        ("", []),
    ],
)
def test_expand_nodelist(text: str, expected: list[str]) -> None:
    assert expand_nodelist(text) == expected


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[3-1]", "node[a-b]", "n[1]]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


# ---------------------------------------------------------------- env table

def test_env_inside_srun_step() -> None:
    env = SlurmEnv.from_environ({
        "SLURM_JOB_ID": "4711", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8", "SLURM_NODEID": "2", "SLURM_STEP_NODELIST": "node[3-4],gpu[07-08]",
        "SLURM_JOB_NODELIST": "ignored[1-9]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.3",
        "PATH": "/bin",
    })
    assert env == SlurmEnv(job_id=4711, rank=5, local_rank=1, world_size=8, node_id=2,
                           nodes=("node3", "node4", "gpu07", "gpu08"), launch_addr="10.0.0.3")
    assert env.in_slurm


def test_env_falls_back_to_job_nodelist_and_old_names() -> None:
    env = SlurmEnv.from_environ({"SLURM_JOBID": "12", "SLURM_NPROCS": "2",
                                 "SLURM_JOB_NODELIST": "node[1-2]"})
    assert (env.job_id, env.world_size, env.nodes) == (12, 2, ("node1", "node2"))


def test_env_outside_slurm_is_one_local_process() -> None:
    env = SlurmEnv.from_environ({"HOME": "/root"})
    assert env == SlurmEnv()
    assert (env.rank, env.world_size, env.nodes, env.in_slurm) == (0, 1, (), False)


def test_env_stripped_jobstep_shell() -> None:
    # snakemake's jobstep 0.6.1 leaves only the job id in the rule shell
    env = SlurmEnv.from_environ({"SLURM_JOB_ID": "99", "SLURM_CLUSTER_NAME": "c"})
    assert env.in_slurm and env.nodes == () and env.world_size == 1


def test_env_bad_value_names_variable() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        SlurmEnv.from_environ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "x"})


# ---------------------------------------------------------------- rendezvous

def test_rendezvous_uses_first_step_node() -> None:
    asked: list[str] = []

    def fake_resolve(host: str) -> str:
        asked.append(host)
        return {"node3": "192.168.1.3"}[host]

    env = SlurmEnv(job_id=123456, nodes=("node3", "node4"), launch_addr="10.9.9.9")
    assert rendezvous(env, resolve=fake_resolve) == ("192.168.1.3", 20000 + 123456 % 20000)
    assert asked == ["node3"]


def test_rendezvous_without_nodes() -> None:
    assert rendezvous(SlurmEnv(job_id=7, launch_addr="10.0.0.1")) == ("10.0.0.1", 20007)
    assert rendezvous(SlurmEnv()) == ("127.0.0.1", 20000)


def test_rendezvous_port_stays_in_range() -> None:
    ports = {rendezvous_port(j) for j in range(0, 100_000, 7)}
    assert min(ports) >= 20000 and max(ports) < 40000
    assert rendezvous_port(40001) != rendezvous_port(40002)


def test_resolve_node_addr_reads_scontrol() -> None:
    line = "NodeName=node1 Arch=x86_64 CoresPerSocket=16 NodeAddr=127.0.0.1 NodeHostName=localhost\n"
    calls: list[list[str]] = []

    def fake_run(args: list[str]) -> str:
        calls.append(args)
        return line

    assert resolve_node_addr("node1", run=fake_run) == "127.0.0.1"
    assert calls == [["scontrol", "show", "node", "-o", "node1"]]


def test_resolve_node_addr_falls_back_to_dns() -> None:
    def failing_run(args: list[str]) -> str:
        raise subprocess.CalledProcessError(1, args)

    assert resolve_node_addr("localhost", run=failing_run) == "127.0.0.1"
    assert resolve_node_addr("no-such-host.invalid", run=failing_run) == "no-such-host.invalid"


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize(
    ("gpu", "shards", "nodes", "per_node"),
    [(A100, 1, 1, 1), (A100, 2, 1, 2), (A100, 4, 1, 4), (A100, 8, 2, 4), (A100, 16, 4, 4),
     (A100, 32, 8, 4), (H100, 1, 1, 1), (H100, 8, 1, 8), (H100, 16, 2, 8), (H100, 32, 4, 8)],
)
def test_resources_for_layout(gpu: GpuSpec, shards: int, nodes: int, per_node: int) -> None:
    res = resources_for(shards, gpu, 30)
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node, res.ranks) == (nodes, per_node, per_node, shards)
    assert res.gpus_per_node <= gpu.gpus_per_node


def test_resources_for_fields() -> None:
    assert resources_for(8, H100, 90) == Resources(
        nodes=1, tasks_per_node=8, gpus_per_node=8, cpus_per_task=8, mem_mb=512000,
        time_limit_min=90, partition="gpu", constraint=None, account="proj42", qos="high")
    assert resources_for(2, A100, 10).mem_mb is None


def test_resources_for_uneven_layout_is_user_error() -> None:
    v100 = GpuSpec("V100", "v100", 4, 32)
    assert resources_for(6, v100, 10).tasks_per_node == 3  # 2 nodes x 3 GPUs is even
    with pytest.raises(ShardLayoutError, match="V100: 10 shards do not spread evenly over 3 nodes of 4 GPUs"):
        resources_for(10, v100, 10)
    with pytest.raises(UserError):
        resources_for(0, v100, 10)
    with pytest.raises(ValueError, match="gpus_per_node"):
        resources_for(1, GpuSpec("X", "p", 0, 16), 10)


def test_resources_for_on_three_gpu_nodes() -> None:
    three = GpuSpec("T4", "t4", 3, 16)
    assert [(r.nodes, r.tasks_per_node) for r in (resources_for(n, three, 20) for n in (1, 2, 4))] == [
        (1, 1), (1, 2), (2, 2)]
    for shards in (8, 16, 32):  # do not split over 3-GPU nodes
        with pytest.raises(ShardLayoutError):
            resources_for(shards, three, 20)


# ---------------------------------------------------------------- builders (golden)

def test_snakemake_resources_one_rank_drops_mpi() -> None:
    assert snakemake_resources(resources_for(1, A100, 30)) == {
        "nodes": 1, "tasks": 1, "tasks_per_gpu": 1, "gres": "gpu:1",
        "slurm_partition": "a100", "constraint": "a100_80g", "runtime": 30, "cpus_per_task": 4,
    }


@pytest.mark.parametrize(
    ("gpu", "shards", "expected"),
    [
        (A100, 2, {"mpi": "srun", "nodes": 1, "tasks": 2, "tasks_per_gpu": 1, "gres": "gpu:2",
                   "slurm_partition": "a100", "constraint": "a100_80g", "runtime": 30,
                   "cpus_per_task": 4}),
        (A100, 8, {"mpi": "srun", "nodes": 2, "tasks": 8, "tasks_per_gpu": 1, "gres": "gpu:4",
                   "slurm_partition": "a100", "constraint": "a100_80g", "runtime": 30,
                   "cpus_per_task": 4}),
        (A100, 32, {"mpi": "srun", "nodes": 8, "tasks": 32, "tasks_per_gpu": 1, "gres": "gpu:4",
                    "slurm_partition": "a100", "constraint": "a100_80g", "runtime": 30,
                    "cpus_per_task": 4}),
        (H100, 32, {"mpi": "srun", "nodes": 4, "tasks": 32, "tasks_per_gpu": 1, "gres": "gpu:8",
                    "slurm_partition": "gpu", "runtime": 30, "mem_mb": 512000, "cpus_per_task": 8,
                    "slurm_account": "proj42", "qos": "high"}),
    ],
)
def test_snakemake_resources_multi_rank(gpu: GpuSpec, shards: int, expected: dict) -> None:
    assert snakemake_resources(resources_for(shards, gpu, 30)) == expected


def test_snakemake_resources_never_invents_account() -> None:
    for shards in (1, 2, 8, 32):
        assert "slurm_account" not in snakemake_resources(resources_for(shards, A100, 5))


@pytest.mark.parametrize(
    ("gpu", "shards", "expected"),
    [
        (A100, 1, ["srun", "--overlap", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
                   "--cpus-per-task=4", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
        (A100, 2, ["srun", "--overlap", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                   "--cpus-per-task=4", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
        (A100, 8, ["srun", "--overlap", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                   "--cpus-per-task=4", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
        (A100, 32, ["srun", "--overlap", "--nodes=8", "--ntasks=32", "--ntasks-per-node=4",
                    "--cpus-per-task=4", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
        (H100, 8, ["srun", "--overlap", "--nodes=1", "--ntasks=8", "--ntasks-per-node=8",
                   "--cpus-per-task=8", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
        (H100, 32, ["srun", "--overlap", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8",
                    "--cpus-per-task=8", "--gpu-bind=single:1", "--kill-on-bad-exit=1"]),
    ],
)
def test_srun_worker_args(gpu: GpuSpec, shards: int, expected: list[str]) -> None:
    assert srun_worker_args(resources_for(shards, gpu, 30)) == expected


def test_srun_worker_args_without_kill() -> None:
    assert srun_worker_args(resources_for(2, A100, 30), kill_on_bad_exit=False)[-1] == "--kill-on-bad-exit=0"


@pytest.mark.parametrize(("gpu", "shards", "nodes"), [(A100, 1, 1), (A100, 8, 2), (A100, 32, 8), (H100, 32, 4)])
def test_srun_collector_args(gpu: GpuSpec, shards: int, nodes: int) -> None:
    assert srun_collector_args(resources_for(shards, gpu, 30)) == [
        "srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
        "--cpus-per-task=1"]


def test_sbatch_args_golden() -> None:
    assert sbatch_args(resources_for(1, A100, 45), "c1", "logs/%j.out") == [
        "sbatch", "--parsable", "--job-name=c1", "--output=logs/%j.out", "--nodes=1",
        "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=4", "--time=45", "--signal=TERM@120",
        "--partition=a100", "--constraint=a100_80g"]
    assert sbatch_args(resources_for(8, A100, 45), "c8", "o") == [
        "sbatch", "--parsable", "--job-name=c8", "--output=o", "--nodes=2",
        "--ntasks-per-node=4", "--gres=gpu:4", "--cpus-per-task=4", "--time=45", "--signal=TERM@120",
        "--partition=a100", "--constraint=a100_80g"]
    assert sbatch_args(resources_for(32, H100, 600), "big", "o") == [
        "sbatch", "--parsable", "--job-name=big", "--output=o", "--nodes=4",
        "--ntasks-per-node=8", "--gres=gpu:8", "--cpus-per-task=8", "--time=600", "--signal=TERM@120",
        "--partition=gpu", "--mem=512000M", "--account=proj42", "--qos=high"]
    assert "--ntasks-per-gpu" not in " ".join(sbatch_args(resources_for(2, H100, 5), "x", "o"))


# ---------------------------------------------------------------- host memory of a cell's job

def test_resources_for_takes_the_host_memory_unless_the_gpu_type_overrides_it() -> None:
    assert resources_for(8, A100, 30, mem_mb=84224).mem_mb == 84224
    assert resources_for(8, H100, 30, mem_mb=84224).mem_mb == 512000  # gpus.H100.mem_mb_per_gpu × 8
    assert snakemake_resources(resources_for(1, A100, 30, mem_mb=8448)) == {
        "nodes": 1, "tasks": 1, "tasks_per_gpu": 1, "gres": "gpu:1", "slurm_partition": "a100",
        "mem_mb": 8448, "constraint": "a100_80g", "runtime": 30, "cpus_per_task": 4,
    }
    assert "--mem=8448M" in sbatch_args(resources_for(1, A100, 30, mem_mb=8448), "c", "o")
    with pytest.raises(ShardLayoutError, match="mem_mb"):
        resources_for(1, A100, 30, mem_mb=0)
