"""Helpers for the integration tests that run the real workflow on the test Slurm
cluster: tiny configs, Snakemake runs through the Slurm executor, which cells a
run executed, the Slurm job of a cell, and fingerprints of cell outputs.

Every run happens in its own working directory (``--directory``) with its own
config file, against the repository's ``Snakefile`` and ``profiles/slurm``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
PROFILE = REPO / "profiles" / "slurm"
VENV_BIN = Path(sys.executable).parent
#: tests/fakes/rank/fake_rank_crash.py: the listed cells' ranks fail in their first batch.
FAKE_CRASH_ENV = "FAKE_CRASH_CELLS"
RANK_FAKES = REPO / "tests" / "fakes" / "rank"

#: The smallest useful cell: a few seconds of work on the 2-core test host.
TINY_DATASET = {"format": "alpaca", "path": "synthetic", "n_prompts": 2, "seed": 0, "max_prompt_len": 32}
#: A cell slow enough to be caught mid-run (about 10-20 s of decoding).
SLOW_DATASET = {"format": "alpaca", "path": "synthetic", "n_prompts": 8, "seed": 1, "max_prompt_len": 32}


def gpu_type(partition: str, gpus_per_node: int) -> dict[str, Any]:
    """A ``gpus.<type>`` entry whose ranks run on CPU (the test cluster's GPUs are fake)."""
    return {"partition": partition, "gpus_per_node": gpus_per_node, "memory_gb": 8, "device": "cpu",
            "cpus_per_gpu": 1}


def group(gpu: str, shards: int, dataset: str = "tiny", max_gen_len: int = 4,
          batch_size: int = 2, engine: str = "reference") -> dict[str, list[Any]]:
    return {"model": ["llama-tiny"], "dataset": [dataset], "gpu": [gpu], "shards": [shards],
            "batch_size": [batch_size], "max_gen_len": [max_gen_len], "engine": [engine]}


def tiny_config(gpus: dict[str, dict[str, Any]], matrix: list[dict[str, list[Any]]]) -> dict[str, Any]:
    return {
        "output_dir": "results", "repeats": 1, "seed": 0, "warmup_tokens": 2,
        "models": {"llama-tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
        "datasets": {"tiny": dict(TINY_DATASET), "slow": dict(SLOW_DATASET)},
        "gpus": gpus,
        "collector": {"backend": "estimate", "estimate_tdp_w": 65, "interval_ms": 100, "idle_baseline_s": 0.2,
                      "idle_settle_s": 0.2, "min_window_s": 0, "prefill_window_s": 0},
        "matrix": matrix,
        # one job per cell (profiles/slurm packs by default): the per-cell tests; the packing
        # tests (test_slurm_packing.py) drop this key
        "packing": "cell",
    }


def write_config(workdir: Path, cfg: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def planned_cells(workdir: Path) -> dict[str, Any]:
    """``{cell_id: Cell}`` of ``workdir/config.yaml``, in plan order."""
    from llmenergy import config
    from llmenergy.planning.matrix import expand

    cfg = config.load(workdir / "config.yaml", check_files=False)
    return {c.id: c for c in expand(cfg).cells}


def cell_id(workdir: Path, **identity: Any) -> str:
    """The one planned cell whose identity matches ``identity`` (e.g. ``shards=2``)."""
    found = [cid for cid, c in planned_cells(workdir).items()
             if all(c.identity().get(k) == v for k, v in identity.items())]
    if len(found) != 1:
        raise LookupError(f"{identity}: {len(found)} matching cells in {workdir}/config.yaml")
    return found[0]


#: Snakemake's Slurm status checks at most this many seconds apart (tests/fakes/rank/status_poll.py).
STATUS_CHECK_MAX_S = "3"


def env(fail_cells: Iterable[str] = (), extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The submit environment (Slurm jobs inherit it): the venv first on PATH, the rank
    fakes' hooks on PYTHONPATH (each idle unless its variable is set) with Snakemake's
    status checks at most :data:`STATUS_CHECK_MAX_S` apart, ``extra`` variables and, when
    ``fail_cells`` are named, those cells' ranks failing for real."""
    out = {k: v for k, v in os.environ.items() if k != FAKE_CRASH_ENV and not k.startswith("SLURM_")}
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    out.setdefault("OMP_NUM_THREADS", "1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(RANK_FAKES), out.get("PYTHONPATH")) if p)
    out["TEST_STATUS_CHECK_MAX_S"] = STATUS_CHECK_MAX_S
    out.update(extra or {})
    cells = ",".join(fail_cells)
    if cells:
        out[FAKE_CRASH_ENV] = cells
    return out


def snakemake_args(workdir: Path, *extra: str, timeout_s: int = 240) -> list[str]:
    return ["timeout", "-s", "INT", "-k", "30", str(timeout_s),
            sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--profile", str(PROFILE),
            "--slurm-init-seconds-before-status-checks", "2", "--retries", "0", "--latency-wait", "5",
            *extra]


@dataclass
class Run:
    returncode: int
    output: str
    wall_s: float

    @property
    def executed_cells(self) -> list[str]:
        """Cells of ``rule run_cell`` this run submitted, in order."""
        return executed_cells(self.output)

    @property
    def executed_groups(self) -> list[str]:
        """Groups of ``rule run_group`` this run submitted, in order."""
        return executed_cells(self.output, rule_name="run_group", wildcard="group")

    def job_ids(self, cell: str) -> list[int]:
        """Slurm job ids this run submitted for ``cell``, in order."""
        pattern = re.compile(rf"SLURM jobid (\d+) \(log: \S*/rule_run_cell/{re.escape(cell)}/\d+\.log\)")
        return [int(m.group(1)) for m in pattern.finditer(self.output)]

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]


def start_snakemake(workdir: Path, *extra: str, fail_cells: Iterable[str] = (), timeout_s: int = 240,
                    extra_env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path, float]:
    """Start Snakemake in the background; its output goes to a log file in ``workdir``."""
    log_path = workdir / f"snakemake.{time.time_ns()}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(snakemake_args(workdir, *extra, timeout_s=timeout_s), cwd=workdir,
                                env=env(fail_cells, extra_env), stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return proc, log_path, time.monotonic()


def finish_snakemake(proc: subprocess.Popen[bytes], log_path: Path, started: float,
                     timeout_s: float = 300) -> Run:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return Run(proc.returncode, log_path.read_text(errors="replace"), time.monotonic() - started)


def run_snakemake(workdir: Path, *extra: str, fail_cells: Iterable[str] = (), timeout_s: int = 240,
                  extra_env: Mapping[str, str] | None = None) -> Run:
    proc, log_path, started = start_snakemake(workdir, *extra, fail_cells=fail_cells, timeout_s=timeout_s,
                                              extra_env=extra_env)
    return finish_snakemake(proc, log_path, started, timeout_s + 60)


_RULE_RE = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")
def executed_cells(output: str, rule_name: str = "run_cell", wildcard: str = "cell") -> list[str]:
    """Cell ids of the ``run_cell`` jobs (or another rule's ``wildcard``) in Snakemake's output."""
    wildcard_re = re.compile(rf"^\s*wildcards: .*\b{wildcard}=([A-Za-z0-9._-]+)")
    cells: list[str] = []
    rule = None
    for line in output.splitlines():
        m = _RULE_RE.match(line)
        if m:
            rule = m.group(1)
            continue
        m = wildcard_re.match(line)
        if m and rule == rule_name:
            cells.append(m.group(1))
            rule = None
    return cells


def job_ids(workdir: Path, cell: str, rule: str = "run_cell") -> list[int]:
    """Slurm job ids of ``cell`` (or group, with ``rule="run_group"``) whose Snakemake job log
    is still there (the plugin removes the logs of successful jobs), oldest first."""
    logs = workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}" / cell
    return sorted(int(p.stem) for p in logs.glob("*.log") if p.stem.isdigit())


def sacct(job_id: int, fields: str = "JobID,State,ExitCode,NNodes,NodeList") -> list[dict[str, str]]:
    """``sacct`` rows of a job and its steps."""
    proc = subprocess.run(["sacct", "-n", "-P", "-j", str(job_id), "-o", fields], capture_output=True,
                          text=True, timeout=30, check=True)
    names = fields.split(",")
    return [dict(zip(names, line.split("|"), strict=True)) for line in proc.stdout.splitlines() if line]


def job_state(job_id: int) -> str:
    """The job's state in squeue (``R``, ``PD``, ...) or sacct once it left the queue."""
    proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%t"], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip()
    rows = [r for r in sacct(job_id) if r["JobID"] == str(job_id)]
    return rows[0]["State"].split()[0] if rows else "UNKNOWN"


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


def cell_dir(workdir: Path, cell: str) -> Path:
    return workdir / "results" / "cells" / cell


def cell_json(workdir: Path, cell: str) -> dict[str, Any]:
    return json.loads((cell_dir(workdir, cell) / "cell.json").read_text())


def fingerprint(workdir: Path, cells: Iterable[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of the given cells' directories."""
    out: dict[str, str] = {}
    for cell in cells:
        root = cell_dir(workdir, cell)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def metrics_row(workdir: Path, cell: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    rows = pq.read_table(cell_dir(workdir, cell) / "metrics.parquet").to_pylist()
    if len(rows) != 1:
        raise ValueError(f"{cell}: {len(rows)} metrics rows, expected 1 (repeats: 1)")
    return rows[0]


def rank_started(workdir: Path, cell: str) -> bool:
    """Whether the cell's ranks are generating (rank 0 logged the model build)."""
    log = cell_dir(workdir, cell) / "logs" / "rank0.log"
    return log.is_file() and "built llama-tiny" in log.read_text(errors="replace")


def pids_of(fragment: str, cwd: Path) -> list[int]:
    """Processes whose command line contains ``fragment`` and whose working
    directory is ``cwd`` (so only this test's processes match)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            here = os.readlink(entry / "cwd")
        except OSError:
            continue
        if fragment in cmdline and Path(here) == cwd:
            found.append(int(entry.name))
    return found


def _squeue_ids() -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False)
    return proc.stdout.split() if proc.returncode == 0 else []


def _nodes_not_idle() -> dict[str, str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=False)
    rows = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    return {n: st for n, st in rows.items() if st != "idle"}


def quiet_cluster(when: str, timeout_s: float = 90.0) -> list[str]:
    """Leave the test cluster as a test expects to find it: no job of an earlier test
    left (cancelled), no node down or drained (resumed), every node idle. Returns what
    it had to do, so that a leftover is reported, not silently inherited by the next
    test (a 2-node job pends forever behind one)."""
    if shutil.which("squeue") is None:
        return []
    done: list[str] = []
    left = _squeue_ids()
    if left:
        subprocess.run(["scancel", *left], check=False)
        done.append(f"{when}: cancelled job(s) {', '.join(left)}")
    deadline = time.monotonic() + timeout_s
    resumed = False
    while time.monotonic() < deadline:
        busy = _nodes_not_idle()
        if not busy and not _squeue_ids():
            return done
        stuck = [n for n, st in busy.items() if st.rstrip("*~#").startswith(("down", "drain", "drng", "fail"))]
        if stuck and not resumed:
            subprocess.run(["scontrol", "update", f"NodeName={','.join(stuck)}", "State=RESUME"], check=False)
            done.append(f"{when}: resumed node(s) {', '.join(f'{n} ({busy[n]})' for n in stuck)}")
            resumed = True
        time.sleep(0.5)
    done.append(f"{when}: cluster not idle after {timeout_s:.0f} s: {_nodes_not_idle()} jobs {_squeue_ids()}")
    return done


def private_workdir(name: str) -> Iterator[Path]:
    """A working directory outside pytest's shared ``tmp_path`` root, which
    concurrent pytest sessions prune while these minutes-long tests run.
    Removed afterwards unless ``LLMENERGY_KEEP_WORKDIRS`` is set. The cluster is
    brought back to idle before and after (:func:`quiet_cluster`); what that took is
    reported as a warning."""
    import warnings

    for msg in quiet_cluster("before"):
        warnings.warn(f"{name}: {msg}", stacklevel=2)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    path = Path(tempfile.mkdtemp(prefix=f"llmenergy-it-{safe}-"))
    try:
        yield path
    finally:
        for msg in quiet_cluster("after"):
            warnings.warn(f"{name}: {msg}", stacklevel=2)
        if not os.environ.get("LLMENERGY_KEEP_WORKDIRS"):
            shutil.rmtree(path, ignore_errors=True)
