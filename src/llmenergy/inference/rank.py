"""What every rank of a job does around its cells: process setup, the rank geometry,
stop signals, the event recorder, the handshakes with the node agents, the mapping
of an exception to a cell status, and the ranks' agreement after each cell.

The rank loop (:mod:`.worker`) runs one cell or a packed group's cells with these.

After each cell every rank writes its :class:`~llmenergy.handshake.RankOutcome`
(``cells/{id}/.run/ranks/{rank}.json``) and waits, at most :data:`PEER_WAIT_S`, for
the other ranks' (:func:`agree`). When all are there and none left, the ranks are
in step (no rank is blocked in a collective the others left) and the group goes on
with its next cell, even after a failure every rank shared. When a rank is missing
(it is blocked in a collective because a peer failed alone, or it died), the ranks
that wait leave the group: they mark their outcome ``left`` and exit non-zero, and
the launcher ends the rest (``srun --kill-on-bad-exit``, or the local launcher after
its grace period). Collectives have no usable timeout (an NCCL one aborts the
process; gloo's also fires on a legitimately long load), so no rank relies on one.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import EVENTS_SCHEMA, RESPONSES_SCHEMA, CellSpec
from llmenergy.errors import CellInterrupted, PowerCapDenied, PowerCapError, RecordError, SensorError, UserError
from llmenergy.handshake import (
    CapReady,
    ClockOffsets,
    CollectorReady,
    RankDevice,
    RankOutcome,
    WorkerStatus,
    collector_problem,
    read_ready,
)
from llmenergy.layout import CellFiles
from llmenergy.slurm import on_stop_signals

log = logging.getLogger("llmenergy.inference.worker")

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_OOM = 75
EXIT_INTERRUPTED = 76
EXIT_CAP_DENIED = 77
#: Round trips of the clock-offset handshake; each node's offset comes from its shortest.
CLOCK_ROUNDS = 8
#: How long a rank waits, after a cell, for the other ranks' outcomes; the bound on a
#: group's hang when a rank fails alone (the launcher's grace comes on top locally).
PEER_WAIT_S = 30.0


@dataclass
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    node: str


def rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """The rank geometry, from torchrun-style variables or from Slurm's."""
    env = dict(os.environ if environ is None else environ)
    node = socket.gethostname()
    if "RANK" in env:
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), node)
    from llmenergy import slurm

    senv = slurm.SlurmEnv.from_environ(env)
    addr, port = slurm.rendezvous(senv)
    return RankEnv(senv.rank, senv.world_size, senv.local_rank, addr, port, node)


def select_device(spec: CellSpec, local_rank: int) -> Any:
    """The rank's device: its local GPU, or the CPU."""
    import torch

    if spec.device == "cuda" and torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def process_group_backend(device_type: str, world_size: int) -> str:
    """NCCL only where ranks share a model on GPUs. One rank has nothing to all-reduce, so its
    barriers and stop flag go over gloo and no NCCL communicator is made: a live one slowed
    every CUDA-graph decode step by ~170 µs on an H200 (4 % at batch 1; docs/precision.md)."""
    return "nccl" if device_type == "cuda" and world_size > 1 else "gloo"


def start_process(spec: CellSpec, renv: RankEnv, dev: Any) -> None:
    """Seed, CPU threads, the process group and model parallel: once per rank process."""
    import torch
    import torch.distributed as dist

    from llmenergy.inference import tp

    torch.manual_seed(spec.seed)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, spec.ranks_per_node)))
    dist.init_process_group(process_group_backend(dev.type, renv.world_size),
                            init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
                            rank=renv.rank, world_size=renv.world_size)
    tp.init_model_parallel(renv.world_size)


def device_info(dev: Any, node: str, rank: int) -> RankDevice:
    """What a rank announces in the job's ``CellFiles.rank_devices`` (the node agents wait for it)."""
    import torch

    if dev.type != "cuda":
        return RankDevice(node=node, rank=rank, uuid="cpu", name="cpu", index=-1, pid=os.getpid())
    props = torch.cuda.get_device_properties(dev)
    uuid = str(props.uuid)
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return RankDevice(node=node, rank=rank, uuid=uuid, name=props.name, index=dev.index, pid=os.getpid())


class StopFlag:
    """Turns :data:`llmenergy.slurm.STOP_SIGNALS` into a flag checked between batches."""

    def __init__(self, device: Any) -> None:
        self.signum: int | None = None
        self.device = device
        on_stop_signals(self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: finishing the current batch, then stopping", signum)
        self.signum = signum

    def check(self) -> None:
        """Raise on every rank together once any rank was signalled (the flag is
        all-reduced, so that no rank enters a collective the others have left)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            raise CellInterrupted(f"interrupted by signal {int(flag.item())}")


class Recorder:
    """Collects phase events and responses on rank 0."""

    def __init__(self, cell_id: str, device: Any) -> None:
        self.cell_id = cell_id
        self.device = device
        self.events: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.repeat = -1
        self.batch_index = -1

    def now_ns(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time_ns()

    def event(self, phase: str, start_ns: int, end_ns: int, n_seqs: int = 0, tokens_in: int = 0,
              tokens_out: int = 0) -> None:
        self.events.append({
            "cell_id": self.cell_id, "repeat": self.repeat, "phase": phase, "batch_index": self.batch_index,
            "start_ns": start_ns, "end_ns": end_ns, "n_seqs": n_seqs, "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        })

    def write(self, files: CellFiles) -> None:
        import pyarrow as pa

        atomic.write_parquet(files.events, pa.Table.from_pylist(self.events, schema=EVENTS_SCHEMA))
        atomic.write_parquet(files.responses, pa.Table.from_pylist(self.responses, schema=RESPONSES_SCHEMA))


def wait_files(directory: Path, count: int, timeout_s: float) -> list[Path]:
    """The ``*.json`` files of ``directory`` once there are ``count`` (or what is there at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(directory.glob("*.json")) if directory.exists() else []
        if len(files) >= count or time.monotonic() >= deadline:
            return files
        time.sleep(0.05)


def wait_ready(job: CellFiles, nodes: int, timeout_s: float = 60.0) -> list[CollectorReady]:
    """Rank 0, once per job: wait for every node's collector. A collector's error, backends
    that differ between nodes (:func:`~llmenergy.handshake.collector_problem`), or a node
    missing at the timeout raise :class:`SensorError` at once, naming the node."""
    deadline = time.monotonic() + timeout_s
    world_size = int(os.environ.get("WORLD_SIZE", "0") or 0)
    while True:
        records = read_ready(job.ready)
        problem = collector_problem(records)
        if problem is not None:
            raise SensorError(problem)
        hosts = _rank_nodes(job, world_size)  # the local launcher runs every rank on one host
        if len(records) >= (nodes if hosts is None else min(nodes, len(hosts))):
            return records
        if time.monotonic() >= deadline:
            raise SensorError(f"only {len(records)} of {nodes} collector(s) ready after {timeout_s:.0f} s "
                              f"(ready: {', '.join(r.node for r in records) or 'none'}); see logs/collector.*.log")
        time.sleep(0.05)


def _rank_nodes(job: CellFiles, world_size: int) -> set[str] | None:
    """The nodes the ranks run on, once every rank's device file is there."""
    names = [p.name[:-len(".json")] for p in job.rank_devices.glob("*.json")] if job.rank_devices.is_dir() else []
    ranked = [n.rpartition(".") for n in names]
    if world_size <= 0 or len({r for _, _, r in ranked if r.isdigit()}) < world_size:
        return None
    return {node for node, _, r in ranked if r.isdigit()}


def check_caps(job: CellFiles, nodes: int, timeout_s: float = 120.0) -> None:
    """Wait for every node's power-cap guard; a cell never runs silently uncapped."""
    files = wait_files(job.cap_ready, nodes, timeout_s)
    if len(files) < nodes:
        raise PowerCapError(f"only {len(files)} of {nodes} power-cap guards answered in {timeout_s:.0f} s")
    for f in files:
        try:
            rep = CapReady.read(f)
        except RecordError as exc:
            raise PowerCapError(str(exc)) from None
        if rep.status == "denied":
            raise PowerCapDenied(f"node {rep.node}: {rep.reason or 'permission denied'}")
        if rep.status != "applied":
            raise PowerCapError(f"node {rep.node}: power cap {rep.status}: {rep.reason}")
        log.info("power cap on %s: %s", rep.node, ", ".join(f"{g['uuid']}: {g['enforced_w']} W" for g in rep.gpus))


def outcome_of(exc: BaseException, rank: int) -> tuple[WorkerStatus, int]:
    """A cell's status and the rank's exit code for an exception raised in it."""
    import torch

    if isinstance(exc, PowerCapDenied):
        return WorkerStatus("power_cap_denied", str(exc)), EXIT_CAP_DENIED
    if isinstance(exc, PowerCapError):
        return WorkerStatus("failed", f"power cap: {exc}"), EXIT_FAILED
    if isinstance(exc, UserError):  # a bad checkpoint, dataset or tokenizer: one line, no traceback
        log.error("%s", exc)
        return WorkerStatus("failed", str(exc)), EXIT_USER_ERROR
    if isinstance(exc, CellInterrupted):
        return WorkerStatus("incomplete", str(exc)), EXIT_INTERRUPTED
    if isinstance(exc, torch.OutOfMemoryError):
        return WorkerStatus("oom", f"CUDA out of memory: {str(exc).splitlines()[0]}"), EXIT_OOM
    log.error("rank %d failed", rank, exc_info=exc)
    first = (str(exc).splitlines() or [""])[0][:300]
    return WorkerStatus("failed", f"rank {rank}: {type(exc).__name__}: {first}"), EXIT_FAILED


def agree(files: CellFiles, own: RankOutcome, world_size: int, timeout_s: float = PEER_WAIT_S) -> list[RankOutcome]:
    """Write this rank's outcome of a cell, then wait for every rank's (and, on ranks other
    than 0, for rank 0's status, so that leaving never kills rank 0 mid-write). Returns
    the outcomes there by the deadline, sorted by rank."""
    own.write(files.outcome(own.rank))
    deadline = time.monotonic() + timeout_s
    while True:
        found = wait_files(files.outcomes, world_size, 0.0)
        status_there = own.rank == 0 or files.worker_status.exists()
        if (len(found) >= world_size and status_there) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    outcomes = []
    for path in found:
        try:
            outcomes.append(RankOutcome.read(path))
        except RecordError as exc:  # a torn peer file counts as missing
            log.warning("%s", exc)
    return sorted(outcomes, key=lambda o: o.rank)


def in_step(outcomes: list[RankOutcome], world_size: int) -> bool:
    """Whether every rank reported the cell and none has left: the ranks can go on together."""
    return len({o.rank for o in outcomes}) == world_size and not any(o.left for o in outcomes)


def cell_status(own: WorkerStatus, outcomes: list[RankOutcome], world_size: int) -> WorkerStatus:
    """Rank 0's record of the cell: its own status, unless another rank failed first or is missing."""
    failed = sorted((o for o in outcomes if o.status != "ok"), key=lambda o: (o.at_ns, o.rank))
    if failed and failed[0].rank != 0:  # the first rank to fail names the cause
        return WorkerStatus(failed[0].status, failed[0].reason)
    missing = sorted(set(range(world_size)) - {o.rank for o in outcomes})
    if own.status == "ok" and missing:
        return WorkerStatus("failed", f"rank(s) {missing} did not finish the cell within {PEER_WAIT_S:.0f} s")
    return own


def estimate_offset(samples: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A peer clock's offset to rank 0's, and the round trip it was measured over (ns).

    Each sample is ``(t0, remote, t1)``: rank 0's clock when it sent, the peer's clock
    when the message arrived, rank 0's clock once the peer's reply came back. The peer's
    reading happened between t0 and t1, so ``remote − (t0 + t1) / 2`` is the offset
    to within half the round trip ``t1 − t0`` whatever the split of the delays (the
    NTP estimate); the sample with the shortest round trip bounds it best.
    """
    if not samples:
        raise ValueError("no clock samples")
    t0, remote, t1 = min(samples, key=lambda s: (s[2] - s[0], s[0]))
    return remote - (t0 + t1) // 2, t1 - t0


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_clock_offsets(device: Any, node: str, rounds: int = CLOCK_ROUNDS) -> dict[int, tuple[str, int, int]]:
    """Every rank, together: time ``rounds`` round trips from rank 0 to every other rank
    over the process group (a broadcast out, an all-gather of the peers' stamps back;
    on NCCL the tensors live on the device and each stamp follows a synchronize).
    Returns, on rank 0, ``{rank: (node, offset_ns, rtt_ns)}`` for every other rank
    (:func:`estimate_offset`); on the other ranks ``{}``."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    token = torch.zeros(1, dtype=torch.int64, device=device)
    stamps = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    samples: dict[int, list[tuple[int, int, int]]] = {r: [] for r in range(1, world)}
    for _ in range(rounds):
        dist.barrier()
        _sync(device)
        t0 = time.time_ns()
        dist.broadcast(token, src=0)
        _sync(device)
        mine = torch.tensor([time.time_ns()], dtype=torch.int64, device=device)
        dist.all_gather(stamps, mine)
        _sync(device)
        t1 = time.time_ns()
        if rank == 0:
            for r in range(1, world):
                samples[r].append((t0, int(stamps[r].item()), t1))
    if rank != 0:
        return {}
    return {r: (str(nodes[r]), *estimate_offset(s)) for r, s in samples.items()}


def node_offsets(per_rank: dict[int, tuple[str, int, int]], node0: str) -> ClockOffsets:
    """Each node's offset from its rank with the shortest round trip; rank 0's node is 0 by definition."""
    offsets: dict[str, int] = {node0: 0}
    rtt: dict[str, int] = {node0: 0}
    for node, offset, trip in sorted(per_rank.values(), key=lambda v: v[2]):
        if node not in offsets:
            offsets[node], rtt[node] = offset, trip
    return ClockOffsets(offsets_ns=offsets, rtt_ns=rtt, measured_ns=time.time_ns())


def clock_handshake(job: CellFiles, device: Any, renv: RankEnv) -> None:
    """Every rank: measure the nodes' clock offsets; rank 0 writes them to the job's ``.run/clocks.json``."""
    per_rank = measure_clock_offsets(device, renv.node)
    if renv.rank != 0:
        return
    clocks = node_offsets(per_rank, renv.node)
    clocks.write(job.clocks)
    log.info("clock offsets to rank 0 (ms): %s", ", ".join(
        f"{n}: {o / 1e6:+.3f} (round trip {clocks.rtt_ns[n] / 1e6:.3f})" for n, o in clocks.offsets_ns.items()))
