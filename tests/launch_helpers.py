"""Helpers for the end-to-end tests of ``llmenergy run-cell`` on the local launcher.

Each test writes a small config (llama-tiny, synthetic Alpaca, the ``estimate``
collector) into its own ``tmp_path`` and runs the real CLI as a subprocess there
(``output_dir`` is relative to the working directory). Only hardware is faked:
NVML through ``tests/fakes`` (the rank, computing on the CPU, announces the fake
GPU :data:`FAKE_GPU_UUID` through ``tests/fakes/rank/fake_rank_gpu.py``, and the
guard caps that simulated GPU), and GPU memory exhaustion through
``tests/fakes/rank/fake_oom.py``. Every run-cell starts a new session, so every
process it spawned can be found afterwards by session id, orphans included.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

import llmenergy
from llmenergy import entrypoints

FAKES = Path(__file__).resolve().parent / "fakes"
RANK_FAKES = FAKES / "rank"  # sitecustomize: fake_oom, fake_rank_gpu (inert unless their env is set)
SRC = Path(llmenergy.__file__).resolve().parents[1]
FAKE_GPU_UUID = "GPU-fake-e2e-0"  # the GPU a CPU rank announces (fake_rank_gpu) and the fake NVML simulates
SET_FN = "nvmlDeviceSetPowerManagementLimit"


def load_fake(name: str) -> ModuleType:
    """A fake of ``tests/fakes`` (``fake_nvml``, ``fake_dcgm``) under its own top-level name, loaded once by
    file: ``tests/fakes`` never goes on sys.path, where its ``pynvml`` would shadow nvidia-ml-py in the
    test process. The fake DCGM's binding shims (``tests/fakes/dcgm``) then import this same module."""
    if name in sys.modules:
        return sys.modules[name]
    if name != "fake_nvml":
        load_fake("fake_nvml")  # the fake DCGM's GPUs are a fake NVML node
    spec = importlib.util.spec_from_file_location(name, FAKES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fake_nvml = load_fake("fake_nvml")


#: A cell far longer than any test waits for (100 batches of 96 tokens): tests that
#: interrupt generation use it, so the interruption lands mid-decode however
#: loaded the machine is; the rank stops after its current batch.
LONG_CELL: dict[str, Any] = {"n_prompts": 200, "batch_size": 2, "max_gen_len": 96}


def write_config(root: Path, *, power_cap_w: float | None = None, on_oom: str = "record",
                 on_power_cap_denied: str = "fail", n_prompts: int = 6, batch_size: int = 2,
                 max_gen_len: int = 8, backend: str = "estimate", idle_baseline_s: float = 0.2,
                 min_window_s: float = 0, prefill_window_s: float = 0) -> Path:
    """A one-cell config in ``root/config.yaml`` whose outputs go to ``root/results`` (no
    minimum window and no prefill-only loop unless asked: the defaults would add 25 s a repeat)."""
    collector: dict[str, Any] = {"backend": backend, "idle_baseline_s": idle_baseline_s, "idle_settle_s": 0.2,
                                 "interval_ms": 100,
                                 "power_interval_ms": 100, "min_window_s": min_window_s,
                                 "prefill_window_s": prefill_window_s}
    if backend == "estimate":
        collector["estimate_tdp_w"] = 100
    data = {
        "output_dir": "results", "repeats": 1, "seed": 0, "warmup_tokens": 2,
        "models": {"tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
        "datasets": {"alpaca": {"format": "alpaca", "path": "synthetic", "n_prompts": n_prompts, "seed": 0,
                                "max_prompt_len": 32}},
        "gpus": {"cpu": {"partition": "debug", "gpus_per_node": 1, "memory_gb": 16, "device": "cpu",
                         "min_power_w": 200, "max_power_w": 700}},
        "collector": collector,
        "policies": {"on_oom": on_oom, "on_power_cap_denied": on_power_cap_denied},
        "matrix": [{"model": ["tiny"], "dataset": ["alpaca"], "gpu": ["cpu"], "shards": [1],
                    "batch_size": [batch_size], "max_gen_len": [max_gen_len], "power_cap_w": [power_cap_w]}],
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cell_id_of(config_path: Path) -> str:
    """The id of the config's only cell, as ``llmenergy plan`` would show it."""
    from llmenergy.config import load
    from llmenergy.planning.matrix import expand

    cells = expand(load(config_path, check_files=False)).cells
    if len(cells) != 1:
        raise AssertionError(f"expected one cell in {config_path}, got {len(cells)}")
    return cells[0].id


@dataclass
class FakeGpuNode:
    """One fake GPU (:data:`FAKE_GPU_UUID`) in a state file shared by all processes, and the NVML call log."""

    root: Path
    state_file: Path = field(init=False)
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state_file = self.root / "fake_gpus.json"
        self.log_file = self.root / "fake_nvml_calls.jsonl"
        self.write(deny_set=False)

    def write(self, *, limit_w: float = 700, **flags: Any) -> None:
        gpu = fake_nvml.make_gpu(FAKE_GPU_UUID, min_w=200, max_w=700, default_w=700, limit_w=limit_w)
        self.state_file.write_text(json.dumps({"gpus": [gpu], **flags}))

    def limit_w(self) -> float:
        return json.loads(self.state_file.read_text())["gpus"][0]["limit_mw"] / 1000

    def calls(self) -> list[dict[str, Any]]:
        return fake_nvml.read_log(self.log_file)

    def sets(self) -> list[tuple[str, float, bool]]:
        """(uuid, watts, ok) of every set call from every process, in order."""
        return [(c["uuid"], c["args"]["limit_mw"] / 1000, c["ok"]) for c in self.calls() if c["fn"] == SET_FN]

    def set_pids(self) -> list[int]:
        return [c["pid"] for c in self.calls() if c["fn"] == SET_FN]


def make_env(node: FakeGpuNode | None, *, oom_at_batch: int | None = None) -> dict[str, str]:
    """The subprocess environment: the fakes first on PYTHONPATH, never a real GPU setting."""
    env = dict(os.environ)
    paths = [str(RANK_FAKES), str(FAKES), str(SRC)]
    for var in ("FAKE_OOM_AT_BATCH", "FAKE_RANK_GPU_UUID", "FAKE_CRASH_CELLS", "FAKE_METRICS_CRASH",
                "FAKE_SLOW_DECODE_BATCH", "FAKE_RANK_UNSET_ENV"):
        env.pop(var, None)
    if oom_at_batch is not None:
        env["FAKE_OOM_AT_BATCH"] = str(oom_at_batch)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env.pop("SLURM_JOB_ID", None)
    if node is not None:
        env["FAKE_RANK_GPU_UUID"] = FAKE_GPU_UUID
        env.update(FAKE_NVML_STATE=str(node.state_file), FAKE_NVML_LOG=str(node.log_file),
                   DCGM_PYTHON_PATH=str(FAKES / "dcgm"))
    else:  # no fake GPU at all: any NVML call would fail rather than reach a real one
        env.update(FAKE_NVML_STATE=json.dumps({"gpus": [], "init_error": 9}))
    return env


@dataclass(frozen=True)
class ProcInfo:
    """One live process as /proc shows it."""

    pid: int
    ppid: int
    sid: int
    state: str
    cmdline: str


def _proc_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return ProcInfo(pid, int(fields[1]), int(fields[3]), fields[0], cmdline)


def processes() -> list[ProcInfo]:
    """Every live (non-zombie) process on the machine, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc_info(int(entry.name))
            if info is not None and info.state != "Z":
                out.append(info)
    return out


def descendants(pid: int) -> list[ProcInfo]:
    table = processes()
    found, frontier = [], {pid}
    while frontier:
        kids = [p for p in table if p.ppid in frontier]
        found.extend(kids)
        frontier = {p.pid for p in kids}
    return found


@dataclass
class CellRun:
    """One ``llmenergy run-cell`` subprocess, in its own session, run in ``root``."""

    root: Path
    cell_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def cell_dir(self) -> Path:
        return self.root / "results" / "cells" / self.cell_id

    def cell_json(self) -> dict[str, Any]:
        return json.loads((self.cell_dir / "cell.json").read_text())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> str:
        """run-cell's own output and every log of the cell, for failure messages."""
        parts = [f"== run-cell ==\n{self.output()}"]
        logs = self.cell_dir / "logs"
        for path in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            parts.append(f"== {path.name} ==\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run-cell did not finish in {timeout_s:.0f} s\n{self.logs()}") from None

    def descendant(self, fragment: str, timeout_s: float = 30.0) -> ProcInfo:
        """The first process below run-cell whose command line contains ``fragment``."""
        found: list[ProcInfo] = []

        def seen() -> bool:
            found.extend(p for p in descendants(self.proc.pid) if fragment in p.cmdline)
            return bool(found)

        wait_for(seen, f"a process running {fragment}", timeout_s, self)
        return found[0]

    def session_processes(self) -> list[ProcInfo]:
        """Every live process of run-cell's session (run-cell itself included while it runs).

        Orphans keep the session id when they are re-parented, so this finds them too.
        """
        return [p for p in processes() if p.sid == self.proc.pid]

    def kill_leftovers(self) -> None:
        """Teardown: SIGKILL what this test started and left behind, one pid at a time."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for proc in self.session_processes():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def start_run_cell(root: Path, cell_id: str, env: dict[str, str], *extra: str) -> CellRun:
    """Start ``llmenergy run-cell --launcher local`` with ``root`` as its working directory."""
    log_path = root / f"run-cell.{time.time_ns()}.log"
    cmd = [sys.executable, "-m", entrypoints.CLI, "run-cell", "--config", "config.yaml", "--cell", cell_id,
           "--launcher", "local", *extra]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return CellRun(root, cell_id, proc, log_path)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0, run: CellRun | None = None) -> None:
    """Poll ``predicate``; fail with the run's logs if run-cell ended first or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"run-cell exited {run.proc.returncode} before {what}\n{run.logs()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"\n{run.logs()}" if run else ""))


def wait_generation_started(run: CellRun, settle_s: float) -> None:
    """Block until rank 0 has finished its first measured batch, then ``settle_s`` more.

    The worker logs each measured batch as it ends (``repeat 1/N, cycle 1, batch 1/M``), so
    from then on the rank is generating the measured batches, whatever the machine's load
    (under load, load and warm-up alone can outlast a fixed sleep).
    """
    rank_log = run.cell_dir / "logs" / "rank0.log"
    wait_for(lambda: rank_log.exists() and ", cycle 1, batch 1/" in rank_log.read_text(errors="replace"),
             "rank 0 to finish its first measured batch", 90.0, run)
    time.sleep(settle_s)


def batch_spans_ns(events: Any) -> dict[int, tuple[int, int]]:
    """Per measured batch: (prefill start, decode end) from an events table (pandas)."""
    spans: dict[int, tuple[int, int]] = {}
    for batch, group in events[events["repeat"] >= 0].groupby("batch_index"):
        spans[int(batch)] = (int(group["start_ns"].min()), int(group["end_ns"].max()))
    return spans
