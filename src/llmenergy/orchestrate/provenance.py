"""Provenance of a cell: versions, commit, hosts, GPUs, driver, Slurm job, energy seen by Slurm,
the nodes' clock offsets to rank 0."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import llmenergy
from llmenergy.cellfiles import Fidelity, Provenance
from llmenergy.errors import RecordError
from llmenergy.handshake import ClockOffsets, CollectorReady, RankDevice, WorkerStatus
from llmenergy.layout import CellFiles
from llmenergy.slurm import parse_time_limit_min

log = logging.getLogger(__name__)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


#: what of the checkout runs: a change here makes its commit ``-dirty`` (config and docs do not)
CODE_PATHS = ("src", "workflow", "Snakefile")


def git_commit(package_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the llmenergy checkout the package was imported from, else None.

    Only when the package directory (``package_dir``, default the imported
    ``llmenergy``) is its git work tree's own ``src/llmenergy``: a copy of the
    package inside another repository, or one installed into a virtual
    environment that lives in some repository, records no commit rather than
    that repository's.  ``<commit>-dirty`` where the code in the work tree (``src/``,
    ``workflow/``, ``Snakefile``: tracked files changed, or new files git does not ignore)
    is not that commit's: the commit alone would claim code that did not run.
    """
    package = Path(package_dir if package_dir is not None else Path(llmenergy.__file__).parent).resolve()
    if not package.is_dir():
        return None
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=package)
    if top is None or (Path(top).resolve() / "src" / "llmenergy") != package:
        return None
    head = _run(["git", "rev-parse", "HEAD"], cwd=package)
    if head is None:
        return None
    clean = _run(["git", "status", "--porcelain", "--", *CODE_PATHS], cwd=Path(top)) == ""
    return head if clean else f"{head}-dirty"


def _versions() -> dict[str, str | None]:
    """Installed versions from the packages' metadata: importing torch and snakemake here
    only to read ``__version__`` cost the launcher ~3 s per cell."""
    out: dict[str, str | None] = {"llmenergy": llmenergy.__version__, "python": platform.python_version()}
    for dist in ("torch", "fairscale", "pyarrow", "pandas", "snakemake"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _driver() -> str | None:
    """The NVIDIA driver version through NVML (:mod:`~llmenergy.power.backends.nvml_lib`), None without NVML."""
    try:
        from llmenergy.power.backends import nvml_lib
    except ImportError:  # nvidia-ml-py not installed: no driver to report
        return None
    return nvml_lib.driver_version()


def slurm_consumed_energy_j(job_id: str | None) -> float | None:
    """Slurm's own ConsumedEnergyRaw for the job's finished steps (acct_gather_energy), if recorded."""
    if not job_id:
        return None
    out = _run(["sacct", "-j", job_id, "-n", "-P", "--format=ConsumedEnergyRaw"])
    if not out:
        return None
    vals = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
    return sum(vals) if vals and any(vals) else None


def slurm_time_limit_min(job_id: str | None) -> int | None:
    """The job's time limit in minutes (``squeue -o %l``), if it is a Slurm job."""
    if not job_id:
        return None
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%l"])
    return parse_time_limit_min(out.splitlines()[0]) if out else None


def worker_fidelity(files: CellFiles) -> Fidelity | None:
    """The precision's cost in logits that rank 0 measured (``.run/worker_status.json``)."""
    if not files.worker_status.exists():
        return None
    try:
        data = WorkerStatus.read(files.worker_status).fidelity
        return None if data is None else Fidelity.from_json(data, str(files.worker_status))
    except RecordError as exc:
        log.warning("%s", exc)
        return None


def collect_provenance(files: CellFiles, *, started: float, power: Any = None) -> Provenance:
    """What the cell ran on and with, from its ``.run/`` folder (ranks' devices, collectors) and here."""
    uuid_list = [RankDevice.read(p).to_dict() for p in sorted(files.rank_devices.glob("*.json"))]
    ready = [CollectorReady.read(p).to_dict() for p in sorted(files.ready.glob("*.json"))]
    job = os.environ.get("SLURM_JOB_ID")
    load = None
    clocks = None
    if files.clocks.exists():
        try:
            clocks = ClockOffsets.read(files.clocks)
        except RecordError as exc:
            log.warning("%s", exc)
    if files.worker_status.exists():
        with contextlib.suppress(RecordError):
            load = WorkerStatus.read(files.worker_status).load
    return Provenance(
        versions=_versions(),
        git_commit=git_commit(),
        hosts=sorted({u["node"] for u in uuid_list}),
        gpus=uuid_list,
        collectors=ready,
        driver=_driver(),
        slurm_job_id=job,
        slurm_cluster=os.environ.get("SLURM_CLUSTER_NAME"),
        slurm_consumed_energy_j=slurm_consumed_energy_j(job),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        wall_s=round(time.time() - started, 3),
        power_samples=int(power.num_rows) if power is not None else 0,
        load=load,
        slurm_time_limit_min=slurm_time_limit_min(job),
        clock_offsets_ns=clocks.offsets_ns if clocks is not None else None,
        clock_offset_rtt_ns=clocks.rtt_ns if clocks is not None else None,
    )
