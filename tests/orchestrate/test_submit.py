"""llmenergy.orchestrate.submit: the pure parameter mapping, the commands file, and real
submissions (Slurm test cluster, and the local executor)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import submitit

from llmenergy.config import GpuSpec
from llmenergy.errors import UserError
from llmenergy.orchestrate.submit import (
    _load_commands_file,
    choose_executor,
    main,
    submit_jobs,
    submitit_parameters,
    wait_jobs,
)
from llmenergy.slurm import Resources, resources_for
from orchestrate_helpers import write_timed_out

# the config's GPU type with the small memory and CPU counts of the test cluster
GpuType = functools.partial(GpuSpec, memory_gb=32, cpus_per_gpu=2)


def _write_file_command(path: Path, text: str) -> list[str]:
    code = f"import pathlib; pathlib.Path({str(path)!r}).write_text({text!r})"
    return [sys.executable, "-c", code]


# ---------------------------------------------------------------- the config's jobs

def _config(tmp: Path, **gpu: object) -> Path:
    import yaml

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "profiles/local/demo-config.yaml").read_text())
    data["output_dir"] = str(tmp / "results")
    data["gpus"]["local"].update(gpu)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_group_jobs_ask_what_the_snakemake_rule_asks(tmp_path: Path) -> None:
    """Issue 21 (2): `llmenergy submit` and Snakemake share one request: the same --time
    (doubled after an `incomplete` record on this route too), the same host memory."""
    from types import SimpleNamespace

    from llmenergy.orchestrate.smk import load
    from llmenergy.orchestrate.submit import group_jobs

    path = _config(tmp_path)
    ctx = load(__import__("yaml").safe_load(path.read_text()))
    victim = ctx.jobs[0].cells[1]
    write_timed_out(tmp_path / "results", victim, time_limit_min=50)

    commands, resources, names, _ = group_jobs(path)
    ctx = load(__import__("yaml").safe_load(path.read_text()))
    assert names == ctx.job_ids
    for name, cmd, res in zip(names, commands, resources, strict=True):
        assert cmd[-2:] == ["--group", name]
        wild = SimpleNamespace(group=name)
        assert res.time_limit_min == ctx.rule_group_resources()["runtime"](wild)
        assert res.mem_mb == ctx.rule_group_resources()["mem_mb"](wild)
    assert resources[0].time_limit_min == 100  # twice the incomplete's 50 min, on this route too


def test_group_jobs_cut_a_long_group_into_parts(tmp_path: Path) -> None:
    from llmenergy.orchestrate.submit import group_jobs

    _, whole, names, _ = group_jobs(_config(tmp_path))
    limit = whole[0].time_limit_min - 1
    commands, resources, parts, _ = group_jobs(_config(tmp_path, max_time_min=limit))
    assert len(parts) > len(names) and all(r.time_limit_min <= limit for r in resources)
    assert any(".cells1-" in p for p in parts)
    # a group named on the command line is submitted as its parts
    _, _, chosen, _ = group_jobs(_config(tmp_path, max_time_min=limit), [names[0]])
    assert chosen == [p for p in parts if p.startswith(names[0] + ".cells")]


def test_a_selection_that_contradicts_the_packing_is_one_error_not_every_job(tmp_path: Path) -> None:
    """--cells with --packing group (or --groups with --packing cell) used to drop the selection
    and submit every job of the config."""
    path = _config(tmp_path)
    for argv, hint in ((["--cells", "x", "--packing", "group"], "use --groups"),
                       (["--groups", "x", "--packing", "cell"], "use --cells"),
                       (["--cells", "x", "--groups", "y"], "not both")):
        with pytest.raises(UserError, match=hint) as err:
            main(["--config", str(path), *argv])
        assert "\n" not in str(err.value)
    assert not (tmp_path / "results" / "submitit").exists()  # nothing submitted


# ---------------------------------------------------------------- pure mapping

def test_submitit_parameters_one_task_per_node() -> None:
    res = resources_for(8, GpuType("A100", "a100", 4, constraint="a100_80g", account="p1", qos="q",
                                   mem_mb_per_gpu=16000), time_limit_min=45)
    assert submitit_parameters(res, job_name="cell-x") == {
        "name": "cell-x", "timeout_min": 45, "tasks_per_node": 1,
        "slurm_nodes": 2, "slurm_cpus_per_task": 8, "slurm_gres": "gpu:4", "slurm_use_srun": False,
        "slurm_partition": "a100", "slurm_mem": "64000M", "slurm_constraint": "a100_80g",
        "slurm_account": "p1", "slurm_qos": "q",
        "slurm_signal_delay_s": 120, "slurm_additional_parameters": {"signal": "TERM@120"},
    }


def test_submitit_parameters_optional_keys_absent() -> None:
    params = submitit_parameters(resources_for(1, GpuType("V100", "v100", 2), 10), job_name="c")
    assert params["slurm_gres"] == "gpu:1" and params["slurm_cpus_per_task"] == 2
    assert not {"slurm_mem", "slurm_account", "slurm_qos", "slurm_constraint"} & params.keys()


def test_parameters_render_to_sbatch_lines(tmp_path: Path) -> None:
    # submitit accepts every key and renders the job we intend (no srun wrapper)
    res = resources_for(4, GpuType("V100", "v100", 2), time_limit_min=7)
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**submitit_parameters(res, job_name="c4"))
    text = ex._executor._make_submission_file_text("CMD", "uid")  # noqa: SLF001
    for line in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=4", "--gres=gpu:2",
                 "--partition=v100", "--time=7", "--job-name=c4"):
        assert f"#SBATCH {line}" in text
    assert "srun" not in text.split("# command")[1]
    # the same time-limit signal as the Snakemake route, not submitit's USR2@90
    assert "#SBATCH --signal=TERM@120" in text and "USR2" not in text


def test_choose_executor_rejects_unknown() -> None:
    assert choose_executor("local") == "local"
    with pytest.raises(UserError, match="--executor"):
        choose_executor("k8s")


def test_submit_rejects_mismatched_lists(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="2 commands but 1 resource"):
        submit_jobs([["true"], ["true"]], [resources_for(1, GpuType("V", "v", 2), 1)], tmp_path, "local")


def test_commands_file_errors_name_the_entry(tmp_path: Path) -> None:
    f = tmp_path / "jobs.json"
    f.write_text(json.dumps([{"command": ["x"], "resources": {"nodes": 1}}]))
    with pytest.raises(UserError, match=r"jobs.json: \[0\].resources"):
        _load_commands_file(f)
    f.write_text(json.dumps([{"command": "echo hi", "resources": {}}]))
    with pytest.raises(UserError, match=r"\[0\].command must be"):
        _load_commands_file(f)
    f.write_text("{")
    with pytest.raises(UserError, match="invalid JSON"):
        _load_commands_file(f)


# ---------------------------------------------------------------- real runs

def test_local_executor_runs_command(tmp_path: Path) -> None:
    res = resources_for(1, GpuType("CPU", "none", 1), time_limit_min=2)
    ok, bad = tmp_path / "ok.txt", tmp_path / "never.txt"
    jobs = submit_jobs([_write_file_command(ok, "local"), [sys.executable, "-c", "raise SystemExit(3)"]],
                       [res, res], tmp_path / "sub", "local")
    states = wait_jobs(jobs, timeout_s=60, poll_s=0.2)
    assert states == {jobs[0].job_id: "COMPLETED", jobs[1].job_id: "FAILED"}
    assert ok.read_text() == "local" and not bad.exists()


@pytest.mark.slurm
def test_slurm_submission_completes(slurm_cluster, tmp_path: Path) -> None:
    part = slurm_cluster.default_partition or sorted(slurm_cluster.partitions)[0]
    gpn = slurm_cluster.gpus_per_node(part)
    if gpn < 1:
        pytest.skip(f"partition {part} has no GPUs")
    res = Resources(nodes=1, tasks_per_node=1, gpus_per_node=1, cpus_per_task=1, mem_mb=None,
                    time_limit_min=2, partition=part)
    out = tmp_path / "written.txt"
    ids = [j.job_id for j in submit_jobs([_write_file_command(out, "from slurm")], [res], tmp_path / "sub", "slurm")]
    assert len(ids) == 1 and ids[0].isdigit()
    job = submitit.SlurmJob(folder=tmp_path / "sub" / "%j", job_id=ids[0])
    assert wait_jobs([job], timeout_s=90, poll_s=0.5) == {ids[0]: "COMPLETED"}
    assert out.read_text() == "from slurm"


@pytest.mark.slurm
def test_cli_submits_and_waits(slurm_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = slurm_cluster.default_partition or sorted(slurm_cluster.partitions)[0]
    out = tmp_path / "cli.txt"
    res = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 1, "mem_mb": None,
           "time_limit_min": 2, "partition": part}
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps([
        {"name": "ok", "command": _write_file_command(out, "cli"), "resources": res},
        {"name": "boom", "command": [sys.executable, "-c", "raise SystemExit(2)"], "resources": res},
    ]))
    rc = main(["--commands-file", str(jobs_file), "--folder", str(tmp_path / "sub"),
               "--executor", "slurm", "--wait"])
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    final = {row[1]: row[2] for row in lines if len(row) == 3}
    assert final == {"ok": "COMPLETED", "boom": "FAILED"}
    assert rc == 1
    assert out.read_text() == "cli"


@pytest.mark.slurm
def test_slurm_multi_node_command_launches_its_own_ranks(slurm_cluster, tmp_path: Path) -> None:
    # tasks_per_node=1 + use_srun=False: the command runs once and its own srun starts all ranks
    from llmenergy.slurm import srun_worker_args

    two_node = [p for p, nodes in sorted(slurm_cluster.partitions.items())
                if len(nodes) >= 2 and slurm_cluster.gpus_per_node(p) >= 2]
    if not two_node:
        pytest.skip(f"no partition with 2 nodes of 2+ GPUs: {slurm_cluster.partitions}")
    part = two_node[0]
    res = resources_for(4, GpuType("T", part, 2, cpus_per_gpu=1), time_limit_min=2)
    out, once = tmp_path / "ranks.txt", tmp_path / "launcher.txt"
    inner = " ".join(srun_worker_args(res)) + " bash -c 'echo $SLURM_PROCID $(hostname) $CUDA_VISIBLE_DEVICES'"
    command = ["bash", "-c", f"echo launcher >> {once}; {inner} > {out}"]
    [job] = submit_jobs([command], [res], tmp_path / "sub", "slurm")
    assert wait_jobs([job], timeout_s=90, poll_s=0.5) == {job.job_id: "COMPLETED"}
    assert once.read_text().split() == ["launcher"]
    ranks = sorted(line.split() for line in out.read_text().splitlines())
    assert [int(r[0]) for r in ranks] == [0, 1, 2, 3]
    assert len({r[1] for r in ranks}) == 2 and all("," not in r[2] for r in ranks)
