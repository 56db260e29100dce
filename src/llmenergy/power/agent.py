"""The per-node agent of a job (``python -m llmenergy.power.agent SPEC``, started by the
launcher; ``SPEC`` is the ``spec.json`` of the job's directory: a cell's, or a packed group's).

One runs on every node of the job, beside the ranks (``srun --overlap
--ntasks-per-node=1`` inside Slurm, a child process locally). It starts the
node's power collector and, for a capped cell, the power-cap guard; on
any of :data:`llmenergy.slurm.STOP_SIGNALS` it stops both (SIGUSR1, so they flush and restore),
then runs ``powercap-guard --restore`` as a safety net, which changes nothing
when the guard already restored. A collector that dies before the agent's stop is
reported in its ready record (:func:`report_collector_death`): the job fails at once.

Under ``srun`` a signal forwarded to the step reaches every process of it, the
agent's children included, so the agent first gives them
:data:`SELF_STOP_GRACE_S` to stop on their own: a second SIGUSR1, arriving after
a child has flushed and restored its default handlers, would kill it and mark
the step FAILED in ``sacct``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmenergy import entrypoints
from llmenergy.cellfiles import CellSpec
from llmenergy.errors import RecordError
from llmenergy.handshake import CollectorReady
from llmenergy.layout import CellFiles, node_file
from llmenergy.slurm import on_stop_signals

log = logging.getLogger("llmenergy.power.agent")

STOP_TIMEOUT_S = 30.0
SELF_STOP_GRACE_S = 3.0


def collector_args(spec: CellSpec, job: CellFiles, node: str) -> list[str]:
    c = spec.collector
    args = [sys.executable, "-m", entrypoints.COLLECTOR, "--backend", c.backend,
            "--interval-ms", str(c.interval_ms), "--power-interval-ms", str(c.power_interval_ms),
            "--out", str(job.power_parts), "--node", node,
            "--uuid-dir", str(job.rank_devices), "--ready-dir", str(job.ready),
            "--expect-devices", str(spec.ranks_per_node)]
    if c.estimate_tdp_w:
        args += ["--option", f"tdp_w={c.estimate_tdp_w}"]
    if c.dcgm_host:
        args += ["--option", f"dcgm_host={c.dcgm_host}"]
    return args


def guard_args(spec: CellSpec, job: CellFiles, node: str) -> list[str]:
    backend = "dcgm" if spec.collector.backend == "dcgm" else "nvml"
    args = [sys.executable, "-m", entrypoints.POWERCAP_GUARD, "--cap-w", str(spec.cell.power_cap_w),
            "--uuid-dir", str(job.rank_devices), "--ready-dir", str(job.cap_ready),
            "--state-dir", str(job.powercap), "--node", node,
            "--expect-devices", str(spec.ranks_per_node), "--backend", backend,
            "--on-denied", spec.policies.on_power_cap_denied]
    if spec.collector.dcgm_host:
        args += ["--dcgm-host", spec.collector.dcgm_host]
    return args


def stop_flushing(proc: subprocess.Popen[bytes], name: str, grace_s: float = 0.0) -> int:
    """Stop ``proc`` with SIGUSR1 (it flushes or restores first) after ``grace_s`` to end by itself;
    kill it after :data:`STOP_TIMEOUT_S`. Returns its exit code."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        if grace_s > 0:
            proc.wait(timeout=grace_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGUSR1)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, STOP_TIMEOUT_S)
        proc.kill()
        return proc.wait()


def report_collector_death(job: CellFiles, node: str, interval_ms: int, code: int) -> None:
    """Mark a collector that died before its stop as failed in its ready record, so that rank 0
    and the launcher fail the job at once (a record already carrying an error is kept)."""
    path = node_file(job.ready, node)
    previous = None
    with contextlib.suppress(RecordError, OSError):
        previous = CollectorReady.read(path)
    if previous is not None and previous.error:
        return
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    log.error("node %s: the collector %s", node, how)
    CollectorReady(node=node, backend=previous.backend if previous else None,
                   devices=previous.devices if previous else [], interval_ms=interval_ms,
                   error=f"collector {how}; see {job.collector_log(node)}").write(path)


def run(spec_path: Path, node: str | None = None) -> int:
    spec = CellSpec.read(spec_path)
    job = CellFiles(spec_path.parent)
    node = node or socket.gethostname()
    job.logs.mkdir(parents=True, exist_ok=True)
    stop = {"signum": 0}

    def handle(signum: int, frame: Any) -> None:
        stop["signum"] = signum

    on_stop_signals(handle)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    with open(job.collector_log(node), "ab") as out:
        children.append(("collector", subprocess.Popen(collector_args(spec, job, node),
                                                       stdout=out, stderr=subprocess.STDOUT)))
    if spec.cell.power_cap_w is not None:
        with open(job.powercap_log(node), "ab") as out:
            children.append(("powercap-guard", subprocess.Popen(guard_args(spec, job, node),
                                                                stdout=out, stderr=subprocess.STDOUT)))
    log.info("node %s: started %s", node, ", ".join(n for n, _ in children))
    collector, reported = children[0][1], False
    while not stop["signum"]:  # children may end early (a denied cap); the agent waits for its stop
        if not reported and collector.poll() not in (None, 0):
            report_collector_death(job, node, spec.collector.interval_ms, collector.returncode)
            reported = True
        time.sleep(0.1)
    grace_s = SELF_STOP_GRACE_S if os.environ.get("SLURM_STEP_ID") is not None else 0.0
    deadline = time.monotonic() + grace_s
    codes = {name: stop_flushing(p, name, max(0.0, deadline - time.monotonic())) for name, p in children}
    if spec.cell.power_cap_w is not None:
        subprocess.run([sys.executable, "-m", entrypoints.POWERCAP_GUARD, "--restore",
                        "--state-dir", str(job.powercap), "--node", node], check=False)
    log.info("node %s: stopped (%s)", node, codes)
    return 0 if all(c == 0 for c in codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(Path(args[0]), args[1] if len(args) > 1 else None)


if __name__ == "__main__":
    sys.exit(main())
