"""Submit cells (or any command lines) through submitit, without Snakemake.

One command per job, for example
``["llmenergy", "run-group", "--config", cfg, "--group", group_id]``, each with
the :class:`~llmenergy.slurm.Resources` of its job: the same request as the
Snakemake rules' (:func:`llmenergy.planning.jobs.job_request`), a group too long
for its partition cut into the same parts.

How the Slurm job is shaped, and why ``tasks_per_node=1``: the submitted command
is the cell's *launcher*. It starts one collector per node and the ranks itself,
with ``srun --overlap`` (:func:`llmenergy.slurm.srun_worker_args`), exactly as the
Snakemake rule does. So submitit must run the command once, not once per GPU or
per node: the job asks for one task per node (holding all the CPUs its ranks will
use, ``cpus_per_task × GPUs``) and the GPUs as ``--gres=gpu:G``, and submitit runs
its Python entry point straight in the batch script (``use_srun=False``) on the
first node. Had submitit started ``G`` tasks per node through its own ``srun``,
the launcher would run ``nodes × G`` times and each copy would start every rank.

Status comes from ``sacct`` (submitit's watcher), which needs slurmdbd; the
project's test cluster has it. Without Slurm, the local executor runs the
command on this machine (one node only).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from llmenergy import entrypoints
from llmenergy.errors import UserError
from llmenergy.slurm import TIME_LIMIT_WARNING_S, Resources, time_limit_signal

log = logging.getLogger(__name__)

ExecutorKind = Literal["auto", "slurm", "local"]

#: Slurm states after which a job will not change any more.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE",
})


class RunCommand:
    """Picklable job body: run ``command`` with inherited stdout/stderr (they go
    to submitit's log files) and fail the job on a non-zero exit code.

    Unlike ``submitit.helpers.CommandFunction`` it does not buffer the output in
    memory; it returns the exit code.
    """

    def __init__(self, command: Sequence[str], cwd: str | None = None) -> None:
        self.command = [str(c) for c in command]
        self.cwd = cwd

    def __call__(self) -> int:
        proc = subprocess.run(self.command, cwd=self.cwd, check=False)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, self.command)
        return proc.returncode

    def __repr__(self) -> str:
        return f"RunCommand({self.command!r})"


def submitit_parameters(res: Resources, *, job_name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords for one cell (pure).

    Generic keys apply to every executor; ``slurm_*`` keys only to Slurm (the
    local executor ignores them).
    """
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": res.time_limit_min,
        "tasks_per_node": 1,
        "slurm_nodes": res.nodes,
        "slurm_cpus_per_task": res.cpus_per_task * res.tasks_per_node,
        "slurm_gres": f"gpu:{res.gpus_per_node}",
        "slurm_use_srun": False,
        # the same time-limit signal as every other launch path (submitit's default is USR2@90)
        "slurm_signal_delay_s": TIME_LIMIT_WARNING_S,
        "slurm_additional_parameters": {"signal": time_limit_signal()},
    }
    for name, value in res.optional_settings().items():
        key = "slurm_mem" if name == "mem_mb" else f"slurm_{name}"
        params[key] = f"{value}M" if name == "mem_mb" else value
    return params


def slurm_answers(timeout_s: float = 10.0) -> bool:
    """Whether a Slurm controller answers ``sinfo`` here."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def choose_executor(kind: str) -> str:
    """``auto`` -> ``slurm`` when a controller answers, else ``local``."""
    if kind not in ("auto", "slurm", "local"):
        raise UserError(f"--executor: {kind!r} must be one of auto, slurm, local")
    if kind == "auto":
        return "slurm" if slurm_answers() else "local"
    return kind


def submit_jobs(
    commands: Sequence[Sequence[str]],
    resources: Sequence[Resources],
    folder: str | Path,
    executor: ExecutorKind = "auto",
    *,
    job_names: Sequence[str] | None = None,
    cwd: str | Path | None = None,
) -> list[Any]:
    """Submit each command as one job with its resources; return submitit jobs."""
    import submitit  # heavy-ish; only needed here

    if len(commands) != len(resources):
        raise UserError(f"submit: {len(commands)} commands but {len(resources)} resource sets")
    if job_names is not None and len(job_names) != len(commands):
        raise UserError(f"submit: {len(commands)} commands but {len(job_names)} job names")
    cluster = choose_executor(executor)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    jobs = []
    for i, (command, res) in enumerate(zip(commands, resources, strict=True)):
        if not command:
            raise UserError(f"submit: command {i} is empty")
        name = job_names[i] if job_names is not None else f"llmenergy-{i}"
        if cluster == "local" and res.nodes > 1:
            raise UserError(f"submit: job {name} needs {res.nodes} nodes; the local executor runs one")
        ex.update_parameters(**submitit_parameters(res, job_name=name))
        job = ex.submit(RunCommand(command, None if cwd is None else str(cwd)))
        log.info("submitted %s as %s job %s", name, cluster, job.job_id)
        jobs.append(job)
    return jobs


def _launcher(job: Any) -> Any:
    """The task that ran the command. A multi-node job has one submitit task per
    node, but with ``use_srun=False`` only task 0 runs (and writes a result)."""
    return job.task(0)


def _slurm_state(job: Any) -> str:
    info = job.get_info(mode="force")
    return str(info.get("State", "UNKNOWN")).split(" ")[0]  # "CANCELLED by 0" -> "CANCELLED"


def job_state(job: Any, *, settle_s: float = 15.0) -> str:
    """Final state of a finished job: a Slurm state (``COMPLETED``, ``FAILED``,
    ``CANCELLED``, ``TIMEOUT``, ...) for Slurm jobs; ``COMPLETED`` or ``FAILED``
    (``CANCELLED`` if interrupted) for local ones."""
    import submitit

    failed = _launcher(job).exception() is not None
    if isinstance(job, submitit.SlurmJob):
        # sacct may lag the result file by a moment; wait for a terminal state.
        deadline = time.monotonic() + settle_s
        state = _slurm_state(job)
        while state not in TERMINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            state = _slurm_state(job)
        if state not in TERMINAL_STATES:
            state = "FAILED" if failed else "COMPLETED"
        if state == "COMPLETED" and failed:
            state = "FAILED"
        return state
    if job.state == "INTERRUPTED":
        return "CANCELLED"
    return "FAILED" if failed else "COMPLETED"


def wait_jobs(jobs: Sequence[Any], *, timeout_s: float | None = None,
              poll_s: float = 1.0) -> dict[str, str]:
    """Wait until every job is done; return ``{job_id: state}``. Jobs still
    running at ``timeout_s`` report their current state (e.g. ``RUNNING``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(jobs)
    while pending:
        pending = [j for j in pending if not _launcher(j).done(force_check=True)]
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_s)
    states: dict[str, str] = {}
    for job in jobs:
        if job in pending:
            states[job.job_id] = str(job.state)
        else:
            states[job.job_id] = job_state(job)
    return states


# --------------------------------------------------------------------------- #
# CLI skeleton: `llmenergy submit`
# --------------------------------------------------------------------------- #

def _load_commands_file(path: Path) -> tuple[list[list[str]], list[Resources], list[str]]:
    """Read ``[{"command": [...], "resources": {Resources fields}, "name": "..."}, ...]``."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: must hold a non-empty list of jobs")
    commands: list[list[str]] = []
    resources: list[Resources] = []
    names: list[str] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UserError(f"{path}: [{i}] must be an object")
        cmd = item.get("command")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise UserError(f"{path}: [{i}].command must be a non-empty list of strings")
        res = item.get("resources")
        if not isinstance(res, dict):
            raise UserError(f"{path}: [{i}].resources must be an object")
        try:
            resources.append(Resources(**res))
        except TypeError as exc:
            raise UserError(f"{path}: [{i}].resources: {exc}") from None
        commands.append(cmd)
        names.append(str(item.get("name", f"llmenergy-{i}")))
    return commands, resources, names


def llmenergy_command() -> list[str]:
    """How a job calls the ``llmenergy`` CLI: this interpreter's console script, else ``-m``."""
    script = Path(sys.executable).with_name("llmenergy")
    if script.is_file():
        return [str(script)]
    found = shutil.which("llmenergy")
    return [found] if found else [sys.executable, "-m", entrypoints.CLI]


def _packing(args: argparse.Namespace) -> str:
    """``--packing``, else ``cell`` for ``--cells``, else the config's ``packing``, else the
    default of every route (``group``)."""
    from llmenergy import config
    from llmenergy.planning.groups import resolve_packing

    if args.packing:
        return str(args.packing)
    if args.cells:
        return "cell"
    if args.groups:
        return "group"
    return resolve_packing(config.load(args.config, check_files=False))


def _out_dir(output_dir: str) -> Path:
    out = Path(output_dir)
    return out if out.is_absolute() else Path.cwd() / out


def cell_jobs(config_path: str | Path, cell_ids: Sequence[str] | None = None,
              ) -> tuple[list[list[str]], list[Resources], list[str], Path]:
    """Commands, resources and names of the cells of ``config_path`` (all planned
    cells, or ``cell_ids``), plus the config's output directory.

    Each command is ``llmenergy run-cell --config CFG --cell ID`` with the config's
    absolute path; each resource set is the cell's
    :func:`~llmenergy.planning.jobs.job_request`, as in the Snakemake rule. The config
    is validated, and unknown cell ids rejected, before anything is submitted.
    """
    from llmenergy import config
    from llmenergy.planning import jobs
    from llmenergy.planning.matrix import expand

    cfg_path = Path(config_path).resolve()
    cfg = config.load(cfg_path)
    plan = expand(cfg)
    cells = plan.cells if not cell_ids else [plan.get(cid) for cid in cell_ids]
    history = jobs.read_history(cfg, plan.cells)
    base = llmenergy_command()
    commands, resources = [], []
    for job in jobs.cell_jobs(cfg, cells, jobs.partition_limits()):
        commands.append([*base, "run-cell", "--config", str(cfg_path), "--cell", job.id])
        resources.append(jobs.job_request(cfg, job.cells, history=history,
                                          max_time_min=job.max_time_min).resources)
    return commands, resources, [c.id for c in cells], _out_dir(cfg.output_dir)


def group_jobs(config_path: str | Path, group_ids: Sequence[str] | None = None,
               ) -> tuple[list[list[str]], list[Resources], list[str], Path]:
    """As :func:`cell_jobs`, one job per packed group (``llmenergy run-group``), or per part
    of a group too long for its partition: the layout of the group's cells, the time of its
    unfinished ones (learned, as the Snakemake rule's). Jobs whose cells are all finished are
    left out; ``group_ids`` names groups (all their parts) or parts."""
    from llmenergy import config
    from llmenergy.planning import jobs
    from llmenergy.orchestrate.smk import changed_cell_ids
    from llmenergy.planning.groups import find_group
    from llmenergy.planning.matrix import expand

    cfg_path = Path(config_path).resolve()
    cfg = config.load(cfg_path)
    cells = expand(cfg).cells
    history = jobs.read_history(cfg, cells)
    limits = jobs.partition_limits()
    planned = jobs.group_jobs(cfg, cells, limits)
    chosen = [] if group_ids else planned
    for gid in group_ids or ():
        match = [j for j in planned if gid in (j.id, j.group_id)]
        if not match:  # a part of another split; one line naming the config for an unknown id
            g = find_group(cfg, cells, gid)
            match = [jobs.Job(g.id, g.id, g.cells, max_time_min=jobs.max_time_min(cfg, g.first.gpu, limits))]
        chosen += [j for j in match if j not in chosen]
    changed = changed_cell_ids(cfg, "group")  # finished, but rerun (run-group sets their files aside)
    base = llmenergy_command()
    commands, resources, names = [], [], []
    for job in chosen:
        if all(history.finished(c) and c.id not in changed for c in job.cells):
            log.info("%s: every cell finished; not submitted", job.id)
            continue
        commands.append([*base, "run-group", "--config", str(cfg_path), "--group", job.id])
        resources.append(jobs.job_request(cfg, job.cells, history=history,
                                          max_time_min=job.max_time_min).resources)
        names.append(job.id)
    return commands, resources, names, _out_dir(cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    """``llmenergy submit (--config CFG [--cells ID ...] | --commands-file F) [--folder F]
    [--executor K] [--wait]``."""
    parser = argparse.ArgumentParser(
        prog="llmenergy submit",
        description="Submit a config's jobs (one per group of cells sharing a model load, or per "
                    "cell) through submitit, without Snakemake.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="config.yaml whose cells to submit")
    src.add_argument("--commands-file", type=Path,
                     help='JSON list of {"command": [...], "resources": {...}, "name": "..."}')
    parser.add_argument("--cells", nargs="+", metavar="ID",
                        help="cell ids to submit, one job each (default: every planned cell); see `llmenergy plan`")
    parser.add_argument("--groups", nargs="+", metavar="ID",
                        help="packed groups (each as its parts, where too long for its partition) or parts "
                             "to submit (default: every job with unfinished cells)")
    parser.add_argument("--packing", choices=["group", "cell"], default=None,
                        help="one job per group of cells sharing a model load, or per cell "
                             "(default: the config's `packing`, else group; --cells implies cell)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where submitit keeps job files and logs "
                             "(default: OUTPUT_DIR/submitit, or results/submitit)")
    parser.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto")
    parser.add_argument("--wait", action="store_true", help="wait and print each job's final state")
    args = parser.parse_args(argv)
    if args.config is not None:
        if args.cells and args.groups:
            raise UserError("submit: give --cells or --groups, not both")
        if args.cells and args.packing == "group":
            raise UserError("submit: --cells submits one job per cell; with --packing group use --groups")
        if args.groups and args.packing == "cell":
            raise UserError("submit: --groups submits one job per group; with --packing cell use --cells")
        if _packing(args) == "group":
            commands, resources, names, out_dir = group_jobs(args.config, args.groups)
            if not commands:
                log.info("every cell of the selected groups is finished; nothing to submit")
                return 0
        else:
            commands, resources, names, out_dir = cell_jobs(args.config, args.cells)
        folder = args.folder or out_dir / "submitit"
    else:
        if args.cells or args.groups:
            raise UserError("submit: --cells and --groups need --config")
        commands, resources, names = _load_commands_file(args.commands_file)
        folder = args.folder or Path("results/submitit")
    jobs = submit_jobs(commands, resources, folder, args.executor, job_names=names, cwd=Path.cwd())
    for name, job in zip(names, jobs, strict=True):
        print(f"{job.job_id}\t{name}")
    if not args.wait:
        return 0
    states = wait_jobs(jobs)
    for name, job in zip(names, jobs, strict=True):
        print(f"{job.job_id}\t{name}\t{states[job.job_id]}")
    return 0 if all(s == "COMPLETED" for s in states.values()) else 1
