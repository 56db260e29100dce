"""Slurm facts as pure functions: the ``SLURM_*`` environment table, node lists,
the rendezvous address, a job's resources and the sbatch/srun/Snakemake
argument builders.

Everything here is deterministic and free of side effects except
:func:`resolve_node_addr`, which asks ``scontrol`` (and falls back to DNS).
The builders are golden-tested in ``tests/test_slurm.py``.

How a cell runs on Slurm (docs/internals.md and the README, "Running on your cluster"):

* one job per cell or per group of cells sharing a model load (packing), ``nodes``
  nodes with ``tasks_per_node`` GPUs used on each (its size:
  :func:`llmenergy.planning.jobs.job_request`);
* inside the job, the launcher starts one collector per node with
  :func:`srun_collector_args` in the background and the ranks with
  :func:`srun_worker_args`; both use ``--overlap`` so they share the allocation,
  and both spell out every count so that neither the inherited ``SLURM_*``
  variables (plain sbatch, submitit) nor their absence (the Snakemake jobstep
  strips them) change the step's shape;
* ``--gpu-bind=single:1`` gives each rank exactly one GPU in
  ``CUDA_VISIBLE_DEVICES``: without it, every rank of a step sees all GPUs of its
  node (checked on the test cluster).
"""
from __future__ import annotations

import logging
import math
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmenergy.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "ENV_TABLE",
    "Resources",
    "ShardLayoutError",
    "SlurmEnv",
    "expand_nodelist",
    "node_layout",
    "rendezvous",
    "rendezvous_port",
    "resolve_node_addr",
    "resources_for",
    "sbatch_args",
    "snakemake_resources",
    "srun_collector_args",
    "srun_worker_args",
    "STOP_SIGNALS",
    "TIME_LIMIT_SIGNAL",
    "on_stop_signals",
    "parse_time_limit_min",
    "time_limit_signal",
]

RENDEZVOUS_PORT_BASE = 20000
RENDEZVOUS_PORT_SPAN = 20000


class ShardLayoutError(UserError, ValueError):
    """A shard count cannot be laid out on a GPU type's nodes."""


# --------------------------------------------------------------------------- #
# Stop signals: one policy for every launch path and every process of a cell
# --------------------------------------------------------------------------- #

#: Every cell's job asks Slurm for this signal to all its steps this long before
#: its time limit (the Snakemake rule, ``llmenergy submit`` and :func:`sbatch_args`
#: alike): ranks finish the current batch and record ``incomplete``, node agents
#: stop and flush their collectors and restore power caps.
TIME_LIMIT_SIGNAL = "TERM"
TIME_LIMIT_WARNING_S = 120

#: What every process of a cell (launcher, ranks, node agent, collector, guard)
#: treats as "stop cleanly now": Slurm's time-limit warning (TERM here; USR2 is
#: submitit's default), ``scancel --signal``, Ctrl-C, and the launcher's own stop
#: request (USR1, which ``srun`` forwards to its tasks).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def time_limit_signal() -> str:
    """The value of sbatch's ``--signal`` for a cell's job: ``TERM@120``."""
    return f"{TIME_LIMIT_SIGNAL}@{TIME_LIMIT_WARNING_S}"


def on_stop_signals(handler: Callable[[int, Any], None],
                    extra: tuple[signal.Signals, ...] = ()) -> dict[int, Any]:
    """Install ``handler`` for :data:`STOP_SIGNALS` (and ``extra``); returns the previous handlers."""
    return {int(s): signal.signal(s, handler) for s in (*STOP_SIGNALS, *extra)}


# --------------------------------------------------------------------------- #
# Environment table
# --------------------------------------------------------------------------- #

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"node list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """``"1-3,05"`` -> ``["1", "2", "3", "05"]``; zero padding follows the lower bound."""
    out: list[str] = []
    for item in spec.split(","):
        m = _RANGE_RE.match(item.strip())
        if not m:
            raise ValueError(f"node list {whole!r}: bad range {item!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(lo_s)
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    """Expand one host expression, which may hold several bracket groups."""
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        if "[" in name or "]" in name:
            raise ValueError(f"node list {whole!r}: unbalanced brackets in {name!r}")
        return [name]
    prefix, suffix = name[: m.start()], name[m.end():]
    if "[" in prefix or "]" in prefix:
        raise ValueError(f"node list {whole!r}: unbalanced brackets in {name!r}")
    return [
        prefix + value + rest
        for value in _expand_ranges(m.group(1), whole)
        for rest in _expand_one(suffix, whole)
    ]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list, in order: ``"node[1-3,5],gpu07"`` ->
    ``["node1", "node2", "node3", "node5", "gpu07"]``.

    Pure Python (no ``scontrol show hostnames``). Handles zero padding
    (``gpu[08-10]``) and several bracket groups (``r[1-2]n[1-2]``). Raises
    ``ValueError`` on malformed input.
    """
    names: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        names.extend(_expand_one(part, nodelist))
    return names


def parse_time_limit_min(text: str) -> int | None:
    """Minutes of a Slurm time limit as squeue/sacct print it (``MM:SS``, ``HH:MM:SS``,
    ``D-HH:MM:SS``, ``D-HH``); None for ``UNLIMITED``, ``INVALID`` or anything else."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        return None
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = a or 0, b or 0, c or 0
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = a or 0, b or 0, c
    elif b is not None:  # MM:SS
        hours, minutes, seconds = 0, a or 0, b
    else:  # MM
        hours, minutes, seconds = 0, a or 0, 0
    return (days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _int(value: str) -> int:
    return int(value.strip())


def _job_id(value: str) -> int:
    # SLURM_JOB_ID is numeric; array tasks have their own numeric id too.
    return int(value.strip().split("_")[0])


@dataclass(frozen=True)
class _EnvField:
    field: str
    names: tuple[str, ...]  # first present wins
    parse: Callable[[str], Any]


#: The one table from ``SLURM_*`` variables to :class:`SlurmEnv` fields.
ENV_TABLE: tuple[_EnvField, ...] = (
    _EnvField("job_id", ("SLURM_JOB_ID", "SLURM_JOBID"), _job_id),
    _EnvField("rank", ("SLURM_PROCID",), _int),
    _EnvField("local_rank", ("SLURM_LOCALID",), _int),
    _EnvField("world_size", ("SLURM_NTASKS", "SLURM_NPROCS"), _int),
    _EnvField("node_id", ("SLURM_NODEID",), _int),
    _EnvField("nodes", ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
              lambda v: tuple(expand_nodelist(v))),
    _EnvField("launch_addr", ("SLURM_LAUNCH_NODE_IPADDR",), lambda v: v.strip() or None),
)


@dataclass(frozen=True)
class SlurmEnv:
    """What a process learns from its ``SLURM_*`` variables (defaults: one local process)."""

    job_id: int | None = None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_id: int = 0
    nodes: tuple[str, ...] = field(default_factory=tuple)
    launch_addr: str | None = None

    @property
    def in_slurm(self) -> bool:
        return self.job_id is not None

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> SlurmEnv:
        values: dict[str, Any] = {}
        for entry in ENV_TABLE:
            for name in entry.names:
                raw = env.get(name)
                if raw is None or raw.strip() == "":
                    continue
                try:
                    values[entry.field] = entry.parse(raw)
                except ValueError as exc:
                    raise ValueError(f"environment {name}={raw!r}: {exc}") from None
                break
        return cls(**values)


# --------------------------------------------------------------------------- #
# Rendezvous
# --------------------------------------------------------------------------- #

def _run_scontrol(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True)
    return proc.stdout


def resolve_node_addr(host: str, *, run: Callable[[list[str]], str] = _run_scontrol) -> str:
    """The address to reach Slurm node ``host``: its ``NodeAddr`` from
    ``scontrol show node -o``, else DNS, else ``host`` itself."""
    try:
        out = run(["scontrol", "show", "node", "-o", host])
        m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
        if m and m.group(1) not in ("(null)", ""):
            return m.group(1)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("scontrol show node %s failed: %s", host, exc)
    try:
        return socket.gethostbyname(host)
    except OSError:
        log.warning("cannot resolve node %s; using the name as address", host)
        return host


def rendezvous_port(job_id: int | None, *, base: int = RENDEZVOUS_PORT_BASE,
                    span: int = RENDEZVOUS_PORT_SPAN) -> int:
    """A port derived from the job id, so concurrent jobs on a node rarely collide."""
    if job_id is None:
        return base
    return base + job_id % span


def rendezvous(env: SlurmEnv, *,
               resolve: Callable[[str], str] = resolve_node_addr) -> tuple[str, int]:
    """``(address, port)`` for ``torch.distributed``: the first node of the step
    (resolved through ``resolve``), else the launch node's address, else loopback."""
    if env.nodes:
        addr = resolve(env.nodes[0])
    elif env.launch_addr:
        addr = env.launch_addr
    else:
        addr = "127.0.0.1"
    return addr, rendezvous_port(env.job_id)


# --------------------------------------------------------------------------- #
# Resources
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Resources:
    """One job's Slurm allocation. ``mem_mb`` is per node; ``None`` leaves it to
    the cluster's default (``DefMemPerCPU``)."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_mb: int | None
    time_limit_min: int
    partition: str | None
    constraint: str | None = None
    account: str | None = None
    qos: str | None = None

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def optional_settings(self) -> dict[str, Any]:
        """The optional settings that are set, by field name, in the order
        partition, mem_mb, constraint, account, qos."""
        values = {"partition": self.partition, "mem_mb": self.mem_mb, "constraint": self.constraint,
                  "account": self.account, "qos": self.qos}
        return {k: v for k, v in values.items() if v is not None}


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShardLayoutError(f"{what}: {value!r} must be a positive integer")
    return value


def node_layout(shards: int, gpus_per_node: int | None, gpu_name: str = "?") -> tuple[int, int]:
    """``(nodes, GPUs per node)`` of a cell: the fewest nodes, the same number of GPUs on each.

    6 shards on 4-GPU nodes run as 2 × 3; 5 shards cannot be spread evenly over
    2 nodes and raise :class:`ShardLayoutError`, whose message the plan shows.
    """
    _positive_int(shards, f"gpu {gpu_name}: shards")
    per_node_max = _positive_int(gpus_per_node, f"gpus.{gpu_name}.gpus_per_node")
    nodes = math.ceil(shards / per_node_max)
    if shards % nodes:
        raise ShardLayoutError(f"gpu {gpu_name}: {shards} shards do not spread evenly over {nodes} nodes "
                               f"of {per_node_max} GPUs")
    return nodes, shards // nodes


def resources_for(shards: int, gpu: Any, time_limit_min: int, *, mem_mb: int | None = None) -> Resources:
    """Lay ``shards`` ranks (one GPU each) out on nodes of GPU type ``gpu``.

    ``gpu`` needs ``name``, ``partition``, ``gpus_per_node``, ``memory_gb`` and may
    have ``constraint``, ``account``, ``qos``, ``cpus_per_gpu`` (default 4) and
    ``mem_mb_per_gpu``. Uses the fewest nodes, and the same number of GPUs on each.
    Host memory per node: ``mem_mb_per_gpu`` × GPUs per node when ``gpu`` sets it,
    else ``mem_mb`` (what loading needs, :func:`llmenergy.planning.matrix.host_mem_mb`),
    else none asked (the cluster's default).
    """
    name = getattr(gpu, "name", "?")
    _positive_int(time_limit_min, f"gpu {name}: time_limit_min")
    nodes, per_node = node_layout(shards, getattr(gpu, "gpus_per_node", None), name)
    cpus_per_gpu = getattr(gpu, "cpus_per_gpu", None) or 4
    _positive_int(cpus_per_gpu, f"gpus.{name}.cpus_per_gpu")
    mem_per_gpu = getattr(gpu, "mem_mb_per_gpu", None)
    if mem_per_gpu is not None:
        mem_mb = _positive_int(mem_per_gpu, f"gpus.{name}.mem_mb_per_gpu") * per_node
    elif mem_mb is not None:
        mem_mb = _positive_int(mem_mb, f"gpu {name}: mem_mb")
    return Resources(
        nodes=nodes,
        tasks_per_node=per_node,
        gpus_per_node=per_node,
        cpus_per_task=cpus_per_gpu,
        mem_mb=mem_mb,
        time_limit_min=time_limit_min,
        partition=getattr(gpu, "partition", None),
        constraint=getattr(gpu, "constraint", None),
        account=getattr(gpu, "account", None),
        qos=getattr(gpu, "qos", None),
    )


# --------------------------------------------------------------------------- #
# Command builders
# --------------------------------------------------------------------------- #

#: Resources.optional_settings() names -> snakemake-executor-plugin-slurm resource keys.
_SNAKEMAKE_KEYS = {"partition": "slurm_partition", "mem_mb": "mem_mb", "constraint": "constraint",
                   "account": "slurm_account", "qos": "qos"}
#: ... -> sbatch flags.
_SBATCH_FLAGS = {"partition": "--partition={}", "mem_mb": "--mem={}M", "constraint": "--constraint={}",
                 "account": "--account={}", "qos": "--qos={}"}


def snakemake_resources(res: Resources) -> dict[str, Any]:
    """Resources for a Snakemake rule under snakemake-executor-plugin-slurm 2.8.0.

    Multi-rank cells need ``mpi="srun"`` (else multi-node silently runs one
    rank) with ``tasks`` (``tasks_per_node`` is rejected with ``mpi``) and
    ``tasks_per_gpu=1`` (else ``tasks`` becomes ``--ntasks-per-gpu``). The
    plugin rejects ``mpi`` with one task, so one-rank cells drop it.
    """
    out: dict[str, Any] = {}
    if res.ranks > 1:
        out["mpi"] = "srun"
    out["nodes"] = res.nodes
    out["tasks"] = res.ranks
    out["tasks_per_gpu"] = 1
    out["gres"] = f"gpu:{res.gpus_per_node}"
    out["runtime"] = res.time_limit_min  # the plugin's name for --time
    out["cpus_per_task"] = res.cpus_per_task
    out.update({_SNAKEMAKE_KEYS[k]: v for k, v in res.optional_settings().items()})
    return out


def srun_worker_args(res: Resources, *, kill_on_bad_exit: bool = True) -> list[str]:
    """``srun`` prefix that starts the cell's ranks inside its allocation,
    one GPU per rank. The same form serves one- and many-rank cells."""
    return [
        "srun",
        "--overlap",
        f"--nodes={res.nodes}",
        f"--ntasks={res.ranks}",
        f"--ntasks-per-node={res.tasks_per_node}",
        f"--cpus-per-task={res.cpus_per_task}",
        "--gpu-bind=single:1",
        f"--kill-on-bad-exit={1 if kill_on_bad_exit else 0}",
    ]


def srun_collector_args(res: Resources) -> list[str]:
    """``srun`` prefix for one background helper per node (the power collector).
    Stop it with ``kill -USR1 <srun pid>`` so the helpers can flush."""
    return [
        "srun",
        "--overlap",
        f"--nodes={res.nodes}",
        f"--ntasks={res.nodes}",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
    ]


def sbatch_args(res: Resources, job_name: str, output: str) -> list[str]:
    """``sbatch`` command line (without the script) for one job.

    Uses ``--ntasks-per-node`` rather than ``--ntasks-per-gpu``: the latter is
    exported as ``SLURM_NTASKS_PER_GPU`` and then makes the inner
    ``srun --ntasks-per-node`` fail."""
    args = [
        "sbatch",
        "--parsable",
        f"--job-name={job_name}",
        f"--output={output}",
        f"--nodes={res.nodes}",
        f"--ntasks-per-node={res.tasks_per_node}",
        f"--gres=gpu:{res.gpus_per_node}",
        f"--cpus-per-task={res.cpus_per_task}",
        f"--time={res.time_limit_min}",
        f"--signal={time_limit_signal()}",
    ]
    args += [_SBATCH_FLAGS[k].format(v) for k, v in res.optional_settings().items()]
    return args
