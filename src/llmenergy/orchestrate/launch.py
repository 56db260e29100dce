"""Run one cell: start a collector per node and one worker rank per GPU, then finalise.

Two launchers share everything but the process start:

* ``local``: ranks and the collector are child processes of this one;
* ``srun``: inside a Slurm job, ``srun --overlap`` starts the ranks across the
  job's nodes and, beside them, one collector per node.

Whatever happens to the ranks, the collectors are stopped (SIGUSR1, so they
flush), the power files are merged, the metrics are computed and ``cell.json``
is written last. Only an ``ok`` cell (or an ``oom`` cell under
``policies.on_oom: record``) exits 0, so Snakemake reruns the others.

Signals: SIGTERM/SIGINT/SIGUSR1/SIGUSR2 reaching ``run-cell`` (Slurm's
time-limit warning, ``scancel --signal=TERM``) are passed on to the ranks, which
finish the current batch, record ``incomplete`` and exit non-zero. Under
``srun`` they are passed on as SIGUSR2, because ``srun`` answers SIGTERM by
killing its tasks but forwards SIGUSR1/2 to them.

Test hook: ``LLMENERGY_TEST_FAIL_CELL`` (see :data:`TEST_FAIL_ENV`) makes the
named cells fail on purpose. It exists only for the integration tests of
incremental reruns; never set it in a real run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmenergy import atomic, entrypoints
from llmenergy.config import Config
from llmenergy.orchestrate.provenance import collect_provenance
from llmenergy.planning.matrix import Cell, dtype_for, estimate_runtime_s, layout
from llmenergy.power.agent import stop_flushing

log = logging.getLogger(__name__)

GRACE_S = 20.0

#: Test hook: a comma-separated list of cell ids that ``run-cell`` fails on
#: purpose (status ``failed``, exit 1) without starting anything. Used by
#: ``tests/integration`` to check that a rerun executes exactly the failed cells;
#: Slurm jobs inherit it from the submitting environment (``--export=ALL``).
TEST_FAIL_ENV = "LLMENERGY_TEST_FAIL_CELL"


def runtime_min(cfg: Config, cell: Cell, *, runtime_s: float | None = None) -> int:
    """The Slurm time limit of a cell's job: twice the estimate plus 10 min, at least 15 min."""
    runtime_s = estimate_runtime_s(cfg, cell) if runtime_s is None else runtime_s
    return max(15, math.ceil(runtime_s * 2 / 60) + 10)


def fail_requested_by_test_hook(cell_id: str, environ: dict[str, str] | None = None) -> bool:
    """Whether the test hook :data:`TEST_FAIL_ENV` names ``cell_id``."""
    raw = (os.environ if environ is None else environ).get(TEST_FAIL_ENV, "")
    return cell_id in {c.strip() for c in raw.split(",") if c.strip()}


def cell_resources(cfg: Config, cell: Cell, *, runtime_s: float | None = None) -> dict[str, Any]:
    """Snakemake resources of the cell's Slurm job (see :mod:`llmenergy.slurm`)."""
    from llmenergy import slurm

    res = slurm.resources_for(cell.shards, cfg.gpus[cell.gpu], runtime_min(cfg, cell, runtime_s=runtime_s))
    return slurm.snakemake_resources(res)


def cell_spec(cfg: Config, cell: Cell) -> dict[str, Any]:
    """Everything a rank needs, resolved from the config: written to ``spec.json``."""
    model, ds, gpu = cfg.models[cell.model], cfg.datasets[cell.dataset], cfg.gpus[cell.gpu]
    nodes, ranks_per_node = layout(cfg, cell)
    device = gpu.device
    if device == "auto":
        device = "cuda" if _cuda_count() >= cell.shards else "cpu"
    spec = {
        "cell_id": cell.id, "cell": cell.identity(), "arch": model.arch, "weights": model.weights,
        "tokenizer": model.tokenizer, "stop_at_eos": model.stop_at_eos, "device": device,
        "dtype": "float32" if device == "cpu" else dtype_for(cfg, cell),
        "batch_size": cell.batch_size, "max_gen_len": cell.max_gen_len, "max_prompt_len": ds.max_prompt_len,
        "max_seq_len": ds.max_prompt_len + cell.max_gen_len, "repeats": cfg.repeats, "seed": cfg.seed,
        "warmup_tokens": cfg.warmup_tokens, "idle_baseline_s": cfg.collector.idle_baseline_s,
        "nodes": nodes, "ranks_per_node": ranks_per_node,
        "dataset": ds.data_spec().to_dict(),
        "collector": {"backend": cfg.collector.backend, "interval_ms": cfg.collector.interval_ms,
                      "power_interval_ms": cfg.collector.power_interval_ms,
                      "estimate_tdp_w": cfg.collector.estimate_tdp_w, "dcgm_host": cfg.collector.dcgm_host},
        "power_cap_w": cell.power_cap_w,
        "policies": {"on_oom": cfg.policies.on_oom, "on_power_cap_denied": cfg.policies.on_power_cap_denied},
        "grid_gco2_per_kwh": cfg.grid_gco2_per_kwh,
    }
    return spec


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


def _agent_args(cell_dir: Path) -> list[str]:
    return [sys.executable, "-m", entrypoints.NODE_AGENT, str(cell_dir / "spec.json")]


class _Forward:
    """Forward SIGTERM/SIGINT/SIGUSR1/2 to the ranks (Slurm's time-limit signal).

    ``as_signal`` replaces the forwarded signal: the srun launcher uses SIGUSR2,
    which ``srun`` passes on to its tasks (SIGTERM would make it kill them).
    """

    def __init__(self, as_signal: int | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.signum: int | None = None
        self.as_signal = as_signal
        self._old = {s: signal.signal(s, self._handle)
                     for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}

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


def _wait_ranks(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Wait for all ranks; once one fails, give the rest GRACE_S, then kill them."""
    failed_at: float | None = None
    while True:
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


def _launch_local(spec: dict[str, Any], cell_dir: Path, fwd: _Forward) -> tuple[list[int], Any]:
    logs = cell_dir / "logs"
    node = socket.gethostname()
    agent_log = open(logs / f"agent.{node}.log", "ab")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(_agent_args(cell_dir), stdout=agent_log, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_launcher(os.getpid()))
    port = _free_port()
    n = spec["cell"]["shards"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            out = open(logs / f"rank{rank}.log", "ab")  # noqa: SIM115 - child owns it
            procs.append(subprocess.Popen([sys.executable, "-m", entrypoints.WORKER, str(cell_dir / "spec.json")],
                                          env=env, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_launcher(os.getpid())))
            out.close()
        fwd.procs = procs
        codes = _wait_ranks(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop_flushing(agent, "node agent")
        agent_log.close()
    return codes, None


def _launch_srun(spec: dict[str, Any], cell_dir: Path, fwd: _Forward, cfg: Config, cell: Cell) -> tuple[list[int], Any]:
    from llmenergy import slurm

    logs = cell_dir / "logs"
    res = slurm.resources_for(cell.shards, cfg.gpus[cell.gpu], 60)
    agent = subprocess.Popen([*slurm.srun_collector_args(res), "--output", str(logs / "agent.%N.log"),
                              *_agent_args(cell_dir)])
    worker = subprocess.Popen(
        [*slurm.srun_worker_args(res), "--output", str(logs / "rank%t.log"),
         sys.executable, "-m", entrypoints.WORKER, str(cell_dir / "spec.json")])
    fwd.procs = [worker]
    try:
        codes = [worker.wait()]
    finally:
        if worker.poll() is None:
            worker.kill()
        stop_flushing(agent, "node agents")
    return codes, res


def _status(cell_dir: Path, codes: list[int], signum: int | None) -> tuple[str, str | None]:
    ws = cell_dir / ".run" / "worker_status.json"
    if ws.exists():
        st = json.loads(ws.read_text())
        if st["status"] != "ok" or all(c == 0 for c in codes):
            return st["status"], st.get("reason")
    if signum is not None:
        return "incomplete", f"interrupted by signal {signum}"
    bad = [c for c in codes if c != 0]
    return ("failed", f"rank exited with code {bad[0]}; see logs/") if bad else ("ok", None)


def _fail_on_purpose(cfg: Config, cell: Cell, launcher: str, started: float) -> int:
    """The :data:`TEST_FAIL_ENV` hook: record a failed cell without running it."""
    cell_dir = cell.dir(cfg.output_dir)
    cell_json = {
        "schema_version": 1, "cell_id": cell.id, "cell": cell.identity(), "status": "failed",
        "reason": f"failed on purpose by the test hook {TEST_FAIL_ENV}", "repeats": cfg.repeats,
        "launcher": launcher, "rank_exit_codes": [], "power_recovered_from_parts": [],
        "provenance": collect_provenance(cell_dir, started=started, power=None),
    }
    atomic.write_json(cell_dir / "cell.json", cell_json)
    atomic.write_json(Path(cfg.output_dir) / "failed" / f"{cell.id}.json", cell_json)
    log.error("%s: failed (%s)", cell.id, cell_json["reason"])
    return 1


def accepted(cfg: Config, status: str) -> bool:
    """Whether a cell with ``status`` is finished under the config's policies (exit 0, never rerun).

    ``ok`` always; ``oom`` under ``policies.on_oom: record``; ``power_cap_denied``
    under ``policies.on_power_cap_denied: skip``.
    """
    return (status == "ok" or (status == "oom" and cfg.policies.on_oom == "record")
            or (status == "power_cap_denied" and cfg.policies.on_power_cap_denied == "skip"))


def run_cell(cfg: Config, cell: Cell, *, launcher: str = "auto", force: bool = False) -> int:
    """Run ``cell`` and write its outputs; returns the process exit code."""
    from llmenergy.analysis.metrics import compute_cell_metrics
    from llmenergy.power.collector import merge_node_files, recovered_nodes

    cell_dir = cell.dir(cfg.output_dir)
    done = cell_dir / "cell.json"
    finished = json.loads(done.read_text()).get("status") if done.exists() and not force else None
    if finished is not None and accepted(cfg, finished):
        log.info("%s: already finished (cell.json is %s); skipping", cell.id, finished)
        return 0
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"
    shutil.rmtree(cell_dir / "powercap", ignore_errors=True)
    for stale in ("cell.json", "metrics.parquet", "events.parquet", "responses.parquet", "power.parquet"):
        (cell_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(cell_dir / ".run", ignore_errors=True)
    for d in ("uuids", "ready", "capready", "power"):
        (cell_dir / ".run" / d).mkdir(parents=True, exist_ok=True)
    (cell_dir / "logs").mkdir(parents=True, exist_ok=True)
    spec = cell_spec(cfg, cell)
    atomic.write_json(cell_dir / "spec.json", spec)
    started = time.time()
    if fail_requested_by_test_hook(cell.id):
        return _fail_on_purpose(cfg, cell, launcher, started)
    log.info("%s: launching %d rank(s) on %d node(s) via %s", cell.id, cell.shards, spec["nodes"], launcher)
    fwd = _Forward(signal.SIGUSR2 if launcher == "srun" else None)
    try:
        if launcher == "srun":
            codes, _ = _launch_srun(spec, cell_dir, fwd, cfg, cell)
        else:
            codes, _ = _launch_local(spec, cell_dir, fwd)
    finally:
        fwd.restore()
    status, reason = _status(cell_dir, codes, fwd.signum)
    power = merge_node_files(cell_dir / ".run" / "power")
    recovered = recovered_nodes(power)
    if power.num_rows:
        atomic.write_parquet(cell_dir / "power.parquet", power)
    cell_json = {
        "schema_version": 1, "cell_id": cell.id, "cell": cell.identity(), "status": status, "reason": reason,
        "repeats": cfg.repeats, "launcher": launcher, "rank_exit_codes": codes,
        "power_recovered_from_parts": recovered,
        "provenance": collect_provenance(cell_dir, started=started, power=power),
    }
    atomic.write_json(cell_dir / "cell.status.json", cell_json)
    try:
        atomic.write_parquet(cell_dir / "metrics.parquet", compute_cell_metrics(cell_dir, status=cell_json))
    except Exception as exc:  # noqa: BLE001 - a metrics bug must not lose the run's raw data
        log.exception("%s: computing metrics failed", cell.id)
        cell_json.update(status="failed", reason=f"metrics: {exc}")
    if cell.power_cap_w is not None:
        from llmenergy.power.caps import read_cap_report

        cell_json["provenance"]["power_cap"] = read_cap_report(cell_dir / "powercap")
    ok = accepted(cfg, status)
    if ok:
        shutil.rmtree(cell_dir / ".run", ignore_errors=True)
    atomic.write_json(done, cell_json)
    (cell_dir / "cell.status.json").unlink(missing_ok=True)
    if not ok:
        failed = Path(cfg.output_dir) / "failed" / f"{cell.id}.json"
        atomic.write_json(failed, cell_json)
        log.error("%s: %s (%s)", cell.id, status, reason)
        return 1
    log.info("%s: %s in %.1f s", cell.id, status, time.time() - started)
    return 0
