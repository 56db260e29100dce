"""Run a job: one cell (``llmenergy run-cell``) or a packed group's cells in order with
one model load (``llmenergy run-group``); a cell run alone is a group of one.

The launcher skips the job's finished cells (:func:`finished`: accepted, current
fingerprint), writes each remaining cell's ``spec.json`` and the job's
:class:`~llmenergy.cellfiles.GroupSpec` (``groups/{id}/group.json``, or the cell's
``.run/group.json``), then starts one node agent per node (collector, and the
power-cap guard of a capped job: the cap is set once and restored at the end, on
every exit path) and the ranks (:mod:`llmenergy.inference.worker`), with their
logs in the job's ``logs/`` (the cell's own for ``run-cell``, ``groups/{id}/logs``).
Two launchers share everything but the process start:

* ``local``: ranks and the agent are child processes of this one;
* ``srun``: inside a Slurm job, ``srun --overlap`` starts the ranks across the
  job's nodes and, beside them, one agent per node.

Whatever happens to the ranks, the agents are stopped (SIGUSR1, so they flush),
and every cell that started is finalised (:mod:`.finalize`). Only a job whose
cells all end accepted exits 0, so Snakemake reruns the others; a packed group
then writes ``groups/{id}/done.json``, its Snakemake output.

Signals: any of :data:`llmenergy.slurm.STOP_SIGNALS` reaching the launcher
(``scancel --signal=TERM``, Ctrl-C) is passed on to the ranks, which finish the
current batch, record ``incomplete`` and exit non-zero. Under ``srun`` they are
passed on as SIGUSR2, because ``srun`` answers SIGTERM by killing its tasks but
forwards SIGUSR1/2 to them. (Slurm's own time-limit warning reaches the steps,
ranks and node agents directly; see :func:`llmenergy.slurm.time_limit_signal`.)

Collectors: :class:`CollectorWatch` reads their ready records every tick; a collector's
error on any node, or backends that differ between nodes, ends the ranks at once and
fails the cell they were in with that one line.

A stop signal received before a cell's record is written makes that cell
``incomplete`` (:func:`.finalize.cell_status`), even when its ranks finished the
last batch: the collectors stopped with the signal.

A rank that fails alone leaves the job within :data:`llmenergy.inference.rank.PEER_WAIT_S`;
the launcher then ends the other ranks (``srun --kill-on-bad-exit`` at once, the local
launcher after :data:`GRACE_S`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmenergy import atomic, entrypoints, slurm
from llmenergy.cellfiles import Cell, CellRecord, CellSpec, GroupSpec, accepted
from llmenergy.config import Config
from llmenergy.errors import RecordError
from llmenergy.handshake import collector_problem, read_ready
from llmenergy.layout import CellFiles, RunLayout
from llmenergy.orchestrate.finalize import CellsInFlight, JobOf
from llmenergy.orchestrate.fingerprint import (
    changes,
    definition,
    fingerprint_of,
    supersede,
)
from llmenergy.planning.groups import Group
from llmenergy.planning.matrix import dtype_for, layout
from llmenergy.power.agent import stop_flushing

log = logging.getLogger(__name__)

GRACE_S = 20.0


def cell_spec(cfg: Config, cell: Cell, *, resolve_device: bool = True) -> CellSpec:
    """Everything a cell's ranks and node agents need, resolved from the config (``spec.json``).

    ``resolve_device=False`` keeps ``device: auto`` as configured (no torch import):
    the spec a cell's fingerprint is computed from.
    """
    model, gpu = cfg.models[cell.model], cfg.gpus[cell.gpu]
    nodes, ranks_per_node = layout(cfg, cell)
    device = gpu.device
    if device == "auto" and resolve_device:
        device = "cuda" if _cuda_count() >= cell.shards else "cpu"
    return CellSpec(
        cell=cell, arch=model.arch, weights=model.weights, tokenizer=model.tokenizer,
        stop_at_eos=model.stop_at_eos, device=device,
        # a device that resolves to CPU at run time (auto) computes in float32 unless the
        # config names a dtype: dtype_for decides for a configured CPU device, as the plan does
        dtype=("float32" if device == "cpu" and model.dtype == "auto" else dtype_for(cfg, cell)),
        repeats=cfg.repeats, seed=cfg.seed, warmup_tokens=cfg.warmup_tokens,
        nodes=nodes, ranks_per_node=ranks_per_node, dataset=cfg.datasets[cell.dataset],
        collector=cfg.collector, policies=cfg.policies, grid_gco2_per_kwh=cfg.grid_gco2_per_kwh)


def measurement(cfg: Config, cell: Cell) -> tuple[str, dict[str, Any]]:
    """The cell's fingerprint and the definition it hashes (:mod:`.fingerprint`)."""
    defn = definition(cell_spec(cfg, cell, resolve_device=False))
    return fingerprint_of(defn), defn


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_args(job: CellFiles) -> list[str]:
    return [sys.executable, "-m", entrypoints.NODE_AGENT, str(job.spec)]


class Forward:
    """Forward :data:`llmenergy.slurm.STOP_SIGNALS` to the ranks.

    ``as_signal`` replaces the forwarded signal: the srun launcher uses SIGUSR2,
    which ``srun`` passes on to its tasks (SIGTERM would make it kill them).
    """

    def __init__(self, as_signal: int | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.signum: int | None = None
        self.as_signal = as_signal
        self._old = slurm.on_stop_signals(self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("signal %d: forwarding to the ranks", signum)
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self.as_signal is not None:
                        p.send_signal(self.as_signal)
                    else:
                        p.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


Tick = Callable[[], None]


class CollectorWatch:
    """The launcher's eye on the job's collectors: the first problem in their ready records
    (:func:`~llmenergy.handshake.collector_problem`: a collector's error, or backends that
    differ between nodes) ends the ranks at once, and the cell they were in is recorded
    ``failed`` with that one line (no cell runs on with a node unmetered)."""

    def __init__(self, job: CellFiles, fwd: Forward, *, srun: bool) -> None:
        self.job, self.fwd, self.srun = job, fwd, srun
        self.error: str | None = None

    def check(self) -> None:
        if self.error is not None:
            return
        problem = collector_problem(read_ready(self.job.ready))
        if problem is None:
            return
        self.error = problem
        log.error("%s: ending the ranks", problem)
        for p in self.fwd.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()  # srun killed: the job's end (the launcher's exit) takes its tasks


def wait_ranks(procs: list[subprocess.Popen[bytes]], tick: Tick | None = None) -> list[int]:
    """Wait for all ranks; once one fails, give the rest GRACE_S, then kill them.
    ``tick`` is called every poll (the launcher finalises the cells done there)."""
    failed_at: float | None = None
    while True:
        if tick is not None:
            tick()
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes if c is not None]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


def _die_with_launcher(launcher_pid: int) -> Any:
    """A ``preexec_fn`` for local children: SIGTERM them when ``run-cell`` dies, even by SIGKILL.

    Linux ``PR_SET_PDEATHSIG``: the ranks then stop after their batch and the
    agent stops the guard, which restores the power caps. Without it a killed
    launcher left the agent, the guard (caps applied) and the ranks running.
    """
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None

    def set_parent_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def launch_local(spec: CellSpec, job: CellFiles, fwd: Forward, worker_args: list[str],
                 tick: Tick | None = None) -> list[int]:
    node = socket.gethostname()
    agent_log = open(job.agent_log(node), "ab")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(_agent_args(job), stdout=agent_log, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_launcher(os.getpid()))
    port = _free_port()
    n = spec.cell.shards
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            out = open(job.rank_log(rank), "ab")  # noqa: SIM115 - child owns it
            procs.append(subprocess.Popen(worker_args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_launcher(os.getpid())))
            out.close()
        fwd.procs = procs
        codes = wait_ranks(procs, tick)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_flushing(agent, "node agent")
        agent_log.close()
    return codes


def launch_srun(job: CellFiles, fwd: Forward, cfg: Config, cell: Cell, worker_args: list[str],
                tick: Tick | None = None) -> list[int]:
    res = slurm.resources_for(cell.shards, cfg.gpus[cell.gpu], 60)
    agent = subprocess.Popen([*slurm.srun_collector_args(res), "--output", str(job.agent_log("%N")),
                              *_agent_args(job)])
    worker = subprocess.Popen([*slurm.srun_worker_args(res), "--output", str(job.rank_log("%t")),
                               *worker_args])
    fwd.procs = [worker]
    try:
        codes = wait_ranks([worker], tick)
    finally:
        if worker.poll() is None:
            worker.kill()
        stop_flushing(agent, "node agents")
    return codes


def finished(cfg: Config, files: CellFiles, current: tuple[str, dict[str, Any]]) -> str | None:
    """The status of the cell's record, when it is finished (accepted) under the config's
    policies with the current fingerprint. A finished cell of another fingerprint is
    superseded (its files moved aside), and so is one without a fingerprint, and one whose
    status the last ``aggregate`` found changed under this version's metrics rules
    (:func:`llmenergy.analysis.remeter.status_changed_since`)."""
    if not files.record.exists():
        return None
    try:
        record = CellRecord.read(files.record)
    except RecordError as exc:
        log.warning("%s; the cell will run again", exc)
        return None
    if not accepted(record.status, cfg.policies):
        return None
    if record.fingerprint != current[0]:
        log.warning("%s: the config changed (%s); rerunning", files.root.name,
                    changes(record.definition, current[1]))
        supersede(files, record.fingerprint)
        return None
    from llmenergy.analysis.remeter import status_changed_since

    problems = RunLayout(Path(cfg.output_dir)).problems
    for _cid, why in status_changed_since(problems, {files.root.name: files.record}):
        log.warning("%s: status changed under newer rules (%s); rerunning", files.root.name, why)
        supersede(files, record.fingerprint)
        return None
    return record.status


def prepare(files: CellFiles) -> None:
    """Remove what an earlier attempt left in a cell's or a job's directory, make the scratch folders."""
    shutil.rmtree(files.powercap, ignore_errors=True)
    for name in CellFiles.OUTPUTS:
        (files.root / name).unlink(missing_ok=True)
    files.done.unlink(missing_ok=True)
    shutil.rmtree(files.run, ignore_errors=True)
    for d in CellFiles.HANDSHAKE:
        getattr(files, d).mkdir(parents=True, exist_ok=True)
    files.logs.mkdir(parents=True, exist_ok=True)


def group_dir(output_dir: str | Path, gid: str) -> Path:
    return RunLayout(Path(output_dir)).group(gid).root


def done_path(output_dir: str | Path, gid: str) -> Path:
    """The group's done marker: written once every cell of the group is finished."""
    return CellFiles(group_dir(output_dir, gid)).done


def _write_done(cfg: Config, group: Group) -> None:
    statuses = {}
    for cell in group.cells:
        try:
            statuses[cell.id] = CellRecord.read(cell.files(cfg.output_dir).record).status
        except RecordError:
            statuses[cell.id] = None
    atomic.write_json(done_path(cfg.output_dir, group.id), {"group_id": group.id, "cells": statuses})


def _launcher(launcher: str) -> str:
    if launcher == "auto":
        return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"
    return launcher


def run_job(cfg: Config, todo: list[Cell], job: CellFiles, *, group: Group | None, launcher: str) -> int:
    """Run ``todo`` (unfinished cells, in order) in one job whose handshake and logs are
    in ``job``; finalise each; 0 when every one ends accepted."""
    started = time.time()
    launcher = _launcher(launcher)
    measured = {c.id: measurement(cfg, c) for c in todo}
    prepare(job)
    specs: dict[str, CellSpec] = {}
    for cell in todo:
        files = cell.files(cfg.output_dir)
        if files.root != job.root:
            prepare(files)
        specs[cell.id] = cell_spec(cfg, cell)
        specs[cell.id].write(files.spec)
    first = specs[todo[0].id]
    if job.root != todo[0].files(cfg.output_dir).root:
        first.write(job.spec)  # the node agents' spec: collector, layout, power cap, policies
    group_spec = job.group_spec if group is not None else job.own_group_spec
    GroupSpec(group.id if group is not None else todo[0].id, [c.id for c in todo],
              str(RunLayout(Path(cfg.output_dir)).cells.resolve()), job_dir=str(job.root.resolve())).write(group_spec)
    if group is None:
        log.info("%s: launching %d rank(s) on %d node(s) via %s", todo[0].id, todo[0].shards, first.nodes, launcher)
    else:
        log.info("%s: %d of %d cell(s) to run, one model load, launching %d rank(s) on %d node(s) via %s",
                 group.id, len(todo), len(group.cells), todo[0].shards, first.nodes, launcher)
    cells = CellsInFlight(cfg, JobOf(job, group.id if group is not None else None,
                                     group.cell_ids if group is not None else [], launcher, started),
                          todo, specs, measured)
    worker = [sys.executable, "-m", entrypoints.WORKER, str(group_spec)]
    fwd = Forward(signal.SIGUSR2 if launcher == "srun" else None)
    watch = CollectorWatch(job, fwd, srun=launcher == "srun")

    def tick() -> None:
        watch.check()
        cells.tick(signum=fwd.signum)

    try:
        if launcher == "srun":
            codes = launch_srun(job, fwd, cfg, todo[0], worker, tick=tick)
        else:
            codes = launch_local(first, job, fwd, worker, tick=tick)
    finally:
        fwd.restore()
    watch.check()
    cells.tick(final=True, codes=codes, signum=fwd.signum, error=watch.error)
    done = [c for c in todo if cells.codes.get(c.id) == 0]
    if group is None:
        return 0 if done else 1
    log.info("%s: %d of %d cell(s) finished in this job (ranks exited %s)", group.id, len(done), len(todo), codes)
    if len(done) == len(todo):
        shutil.rmtree(job.run, ignore_errors=True)
        _write_done(cfg, group)
        return 0
    return 1


def run_cell(cfg: Config, cell: Cell, *, launcher: str = "auto", force: bool = False) -> int:
    """Run ``cell`` alone (a group of one) and write its outputs; returns the process exit code."""
    current = measurement(cfg, cell)
    status = None if force else finished(cfg, cell.files(cfg.output_dir), current)
    if status is not None:
        log.info("%s: already finished (cell.json is %s); skipping", cell.id, status)
        return 0
    return run_job(cfg, [cell], cell.files(cfg.output_dir), group=None, launcher=launcher)


def run_group(cfg: Config, group: Group, *, launcher: str = "auto", force: bool = False) -> int:
    """Run ``group``'s unfinished cells in one job with one model load; returns the exit code."""
    out = cfg.output_dir
    todo = [c for c in group.cells if force or finished(cfg, c.files(out), measurement(cfg, c)) is None]
    if not todo:
        log.info("%s: all %d cells already finished; nothing to run", group.id, len(group.cells))
        _write_done(cfg, group)
        return 0
    return run_job(cfg, todo, CellFiles(group_dir(out, group.id)), group=group, launcher=launcher)
