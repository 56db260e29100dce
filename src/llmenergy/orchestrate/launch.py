"""Run one cell: start a collector per node and one worker rank per GPU, then finalise.

Two launchers share everything but the process start:

* ``local``: ranks and the collector are child processes of this one;
* ``srun``: inside a Slurm job, ``srun --overlap`` starts the ranks across the
  job's nodes and, beside them, one collector per node.

Whatever happens to the ranks, the collectors are stopped (SIGUSR1, so they
flush), the power files are merged, the metrics are computed and ``cell.json``
is written last. Only an ``ok`` cell (or an ``oom`` cell under
``policies.on_oom: record``) exits 0, so Snakemake reruns the others.

Signals: any of :data:`llmenergy.slurm.STOP_SIGNALS` reaching ``run-cell``
(``scancel --signal=TERM``, Ctrl-C) is passed on to the ranks, which finish the
current batch, record ``incomplete`` and exit non-zero. Under ``srun`` they are
passed on as SIGUSR2, because ``srun`` answers SIGTERM by killing its tasks but
forwards SIGUSR1/2 to them. (Slurm's own time-limit warning reaches the steps,
ranks and node agents directly; see :func:`llmenergy.slurm.time_limit_signal`.)

A cell that does not end accepted (:func:`llmenergy.cellfiles.accepted`), a
failure to compute its metrics included, exits non-zero, keeps its raw data and
``.run/`` for inspection, and leaves a copy of its record in ``failed/``.
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
from typing import Any

from llmenergy import atomic, entrypoints, slurm
from llmenergy.cellfiles import (
    Cell,
    CellFiles,
    CellRecord,
    CellSpec,
    WorkerStatus,
    accepted,
)
from llmenergy.config import Config
from llmenergy.errors import RecordError
from llmenergy.orchestrate.fingerprint import (
    changes,
    definition,
    fingerprint_of,
    supersede,
)
from llmenergy.orchestrate.provenance import collect_provenance
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
        dtype="float32" if device == "cpu" else dtype_for(cfg, cell),
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


def _agent_args(files: CellFiles) -> list[str]:
    return [sys.executable, "-m", entrypoints.NODE_AGENT, str(files.spec)]


def _worker_args(files: CellFiles) -> list[str]:
    return [sys.executable, "-m", entrypoints.WORKER, str(files.spec)]


class _Forward:
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


def _wait_ranks(procs: list[subprocess.Popen[bytes]], tick: Tick | None = None) -> list[int]:
    """Wait for all ranks; once one fails, give the rest GRACE_S, then kill them.
    ``tick`` is called every poll (a packed group finalises its cells there)."""
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


def _launch_local(spec: CellSpec, files: CellFiles, fwd: _Forward, *, worker_args: list[str] | None = None,
                  tick: Tick | None = None) -> list[int]:
    node = socket.gethostname()
    agent_log = open(files.logs / f"agent.{node}.log", "ab")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(_agent_args(files), stdout=agent_log, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_launcher(os.getpid()))
    port = _free_port()
    n = spec.cell.shards
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            out = open(files.logs / f"rank{rank}.log", "ab")  # noqa: SIM115 - child owns it
            procs.append(subprocess.Popen(worker_args or _worker_args(files), env=env, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_launcher(os.getpid())))
            out.close()
        fwd.procs = procs
        codes = _wait_ranks(procs, tick)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_flushing(agent, "node agent")
        agent_log.close()
    return codes


def _launch_srun(files: CellFiles, fwd: _Forward, cfg: Config, cell: Cell, *,
                 worker_args: list[str] | None = None, tick: Tick | None = None) -> list[int]:
    res = slurm.resources_for(cell.shards, cfg.gpus[cell.gpu], 60)
    agent = subprocess.Popen([*slurm.srun_collector_args(res), "--output", str(files.logs / "agent.%N.log"),
                              *_agent_args(files)])
    worker = subprocess.Popen([*slurm.srun_worker_args(res), "--output", str(files.logs / "rank%t.log"),
                               *(worker_args or _worker_args(files))])
    fwd.procs = [worker]
    try:
        codes = _wait_ranks([worker], tick)
    finally:
        if worker.poll() is None:
            worker.kill()
        stop_flushing(agent, "node agents")
    return codes


def _status(files: CellFiles, codes: list[int], signum: int | None) -> tuple[str, str | None]:
    if files.worker_status.exists():
        try:
            st = WorkerStatus.read(files.worker_status)
        except RecordError as exc:
            return "failed", str(exc)
        if st.status != "ok" or all(c == 0 for c in codes):
            return st.status, st.reason
    if signum is not None:
        return "incomplete", f"interrupted by signal {signum}"
    bad = [c for c in codes if c != 0]
    return ("failed", f"rank exited with code {bad[0]}; see logs/") if bad else ("ok", None)


def _finished(cfg: Config, files: CellFiles, current: tuple[str, dict[str, Any]]) -> str | None:
    """The status of the cell's record, when it is finished (accepted) under the config's
    policies with the current fingerprint. A finished cell of another fingerprint is
    superseded (its files moved aside), and so is one without a fingerprint."""
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
    return record.status


def _prepare(files: CellFiles) -> None:
    """Remove what an earlier attempt left, make the scratch folders."""
    shutil.rmtree(files.powercap, ignore_errors=True)
    for name in CellFiles.OUTPUTS:
        (files.root / name).unlink(missing_ok=True)
    shutil.rmtree(files.run, ignore_errors=True)
    for d in ("uuids", "ready", "capready", "power"):
        (files.run / d).mkdir(parents=True, exist_ok=True)
    files.logs.mkdir(parents=True, exist_ok=True)


def run_cell(cfg: Config, cell: Cell, *, launcher: str = "auto", force: bool = False) -> int:
    """Run ``cell`` and write its outputs; returns the process exit code."""
    from llmenergy.power.collector import merge_node_files, recovered_nodes

    files = cell.files(cfg.output_dir)
    fingerprint, defn = measurement(cfg, cell)
    finished = None if force else _finished(cfg, files, (fingerprint, defn))
    if finished is not None:
        log.info("%s: already finished (cell.json is %s); skipping", cell.id, finished)
        return 0
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"
    _prepare(files)
    spec = cell_spec(cfg, cell)
    spec.write(files.spec)
    started = time.time()
    log.info("%s: launching %d rank(s) on %d node(s) via %s", cell.id, cell.shards, spec.nodes, launcher)
    fwd = _Forward(signal.SIGUSR2 if launcher == "srun" else None)
    try:
        codes = _launch_srun(files, fwd, cfg, cell) if launcher == "srun" else _launch_local(spec, files, fwd)
    finally:
        fwd.restore()
    power = merge_node_files(files.run / "power")
    return finalize(cfg, cell, spec, files, codes=codes, signum=fwd.signum, started=started, launcher=launcher,
                    power=power, recovered=recovered_nodes(power), measured=(fingerprint, defn))


def finalize(cfg: Config, cell: Cell, spec: CellSpec, files: CellFiles, *, codes: list[int], signum: int | None,
             started: float, launcher: str, power: Any, recovered: list[str],
             measured: tuple[str, dict[str, Any]], powercap_dir: Any = None,
             group: dict[str, Any] | None = None, wall_s: float | None = None) -> int:
    """Write a cell's ``power.parquet``, ``metrics.parquet`` and, last, ``cell.json``
    (and ``failed/{cell}.json`` when not accepted); returns the cell's exit code."""
    from llmenergy.analysis.metrics import compute_cell_metrics
    from llmenergy.power.caps import read_cap_report

    status, reason = _status(files, codes, signum)
    if power.num_rows:
        atomic.write_parquet(files.power, power)
    record = CellRecord(cell=cell, status=status, reason=reason, repeats=cfg.repeats, launcher=launcher,
                        rank_exit_codes=codes, power_recovered_from_parts=recovered,
                        provenance=collect_provenance(files, started=started, power=power),
                        fingerprint=measured[0], definition=measured[1])
    record.provenance.group = group
    if wall_s is not None:  # a packed cell: its own window, not the job's
        record.provenance.wall_s = round(wall_s, 3)
    if cell.power_cap_w is not None:
        record.provenance.power_cap = read_cap_report(powercap_dir or files.powercap)
    try:
        atomic.write_parquet(files.metrics, compute_cell_metrics(files.root, record=record, spec=spec))
    except Exception as exc:  # noqa: BLE001 - a metrics bug must not lose the run's raw data
        log.exception("%s: computing metrics failed", cell.id)
        record.status, record.reason = "failed", f"metrics: {type(exc).__name__}: {exc}"
    ok = accepted(record.status, cfg.policies)
    if ok:
        shutil.rmtree(files.run, ignore_errors=True)
    record.write(files.record)
    if not ok:
        record.write(files.failed_record())
        log.error("%s: %s (%s)", cell.id, record.status, record.reason)
        return 1
    files.failed_record().unlink(missing_ok=True)  # failed/ lists only cells not yet finished
    log.info("%s: %s in %.1f s", cell.id, record.status, time.time() - started)
    return 0
