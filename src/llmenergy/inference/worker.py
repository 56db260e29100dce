"""One rank of a cell: join the model-parallel group, load, warm up, run batches.

Rank 0 writes ``events.parquet`` and ``responses.parquet``. Every timestamp is
``time.time_ns()`` taken after a device synchronize, so the collector's samples
(another process, maybe another node) can be joined to the events by time.

Started by :mod:`llmenergy.orchestrate.launch` as ``python -m llmenergy.inference.worker SPEC``
(``--group GROUP_JSON`` for a packed group: :mod:`llmenergy.inference.packed`), with the
rank geometry in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
(local launch) or in ``SLURM_*`` (srun launch).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import EVENTS_SCHEMA, RESPONSES_SCHEMA, CellSpec, WorkerStatus
from llmenergy.errors import CellInterrupted, PowerCapDenied, PowerCapError, UserError
from llmenergy.slurm import on_stop_signals

log = logging.getLogger("llmenergy.inference.worker")

EXIT_OOM = 75
EXIT_INTERRUPTED = 76
EXIT_CAP_DENIED = 77
#: how long a failing rank other than 0 waits for rank 0's status file before it exits
RANK0_GRACE_S = 60.0
#: Inductor's cache (compiled engine), under the output directory: repeats and later cells reuse it.
INDUCTOR_CACHE = ".cache/inductor"


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


class _Stop:
    """Turns :data:`llmenergy.slurm.STOP_SIGNALS` into a flag checked between batches."""

    def __init__(self, device: Any) -> None:
        self.signum: int | None = None
        self.device = device
        on_stop_signals(self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: finishing the current batch, then stopping", signum)
        self.signum = signum

    def check(self) -> None:
        """Raise on every rank together once any rank was signalled.

        The flag is all-reduced so that no rank enters a collective the others
        have left.
        """
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

    def write(self, cell_dir: Path) -> None:
        import pyarrow as pa

        atomic.write_parquet(cell_dir / "events.parquet", pa.Table.from_pylist(self.events, schema=EVENTS_SCHEMA))
        atomic.write_parquet(cell_dir / "responses.parquet",
                             pa.Table.from_pylist(self.responses, schema=RESPONSES_SCHEMA))


def _device(spec: CellSpec, local_rank: int) -> Any:
    import torch

    if spec.device == "cuda" and torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _device_info(dev: Any, node: str, rank: int) -> dict[str, Any]:
    import torch

    if dev.type != "cuda":
        return {"node": node, "rank": rank, "uuid": "cpu", "name": "cpu", "index": -1}
    props = torch.cuda.get_device_properties(dev)
    uuid = str(props.uuid)
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return {"node": node, "rank": rank, "uuid": uuid, "name": props.name, "index": dev.index}


def _wait_files(directory: Path, count: int, timeout_s: float) -> list[Path]:
    """The ``*.json`` files of ``directory`` once there are ``count`` (or what is there at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(directory.glob("*.json")) if directory.exists() else []
        if len(files) >= count or time.monotonic() >= deadline:
            return files
        time.sleep(0.05)


def _wait_ready(run_dir: Path, nodes: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    files = _wait_files(run_dir / "ready", nodes, timeout_s)
    if len(files) < nodes:
        log.warning("only %d of %d collectors ready after %.0f s; continuing", len(files), nodes, timeout_s)
    return [json.loads(f.read_text()) for f in files]


def _check_caps(run_dir: Path, nodes: int, timeout_s: float = 120.0) -> None:
    """Wait for every node's power-cap guard; a cell never runs silently uncapped."""
    files = _wait_files(run_dir / "capready", nodes, timeout_s)
    if len(files) < nodes:
        raise PowerCapError(f"only {len(files)} of {nodes} power-cap guards answered in {timeout_s:.0f} s")
    for f in files:
        rep = json.loads(f.read_text())
        if rep["status"] == "denied":
            raise PowerCapDenied(f"node {rep['node']}: {rep.get('reason') or 'permission denied'}")
        if rep["status"] != "applied":
            raise PowerCapError(f"node {rep['node']}: power cap {rep['status']}: {rep.get('reason')}")
        log.info("power cap on %s: %s", rep["node"],
                 ", ".join(f"{g['uuid']}: {g['enforced_w']} W" for g in rep.get("gpus", [])))


def wait_for_rank0(status_file: Path, timeout_s: float = RANK0_GRACE_S) -> None:
    """Before a rank other than 0 exits non-zero, let rank 0 write what was measured and
    its status: ``srun --kill-on-bad-exit`` would otherwise kill rank 0 mid-write, and
    an interrupted cell would be recorded ``failed`` with its events lost."""
    deadline = time.monotonic() + timeout_s
    while not status_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _tokenizer(spec: CellSpec) -> Any:
    """The cell's tokenizer: configured, else the checkpoint's (its folder or, as in Meta's
    release, the parent's), else the project's own."""
    from llmenergy.inference.tokenizer import tokenizer_for

    return tokenizer_for(spec.weights, spec.tokenizer)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run(spec_path: Path) -> int:
    import torch
    import torch.distributed as dist

    from llmenergy.data.prompts import load_prompts
    from llmenergy.inference import tp, weights

    spec = CellSpec.read(spec_path)
    cell_dir = spec_path.parent
    run_dir = cell_dir / ".run"
    renv = rank_env()
    dev = _device(spec, renv.local_rank)
    stop = _Stop(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.manual_seed(spec.seed)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, spec.ranks_per_node)))
    dist.init_process_group(backend, init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
                            rank=renv.rank, world_size=renv.world_size)
    tp.init_model_parallel(renv.world_size)
    info = _device_info(dev, renv.node, renv.rank)
    atomic.write_json(run_dir / "uuids" / f"{renv.node}.{renv.rank}.json", info)
    rec = Recorder(spec.cell_id, dev)
    is_main = renv.rank == 0
    try:
        if is_main:
            _wait_ready(run_dir, spec.nodes)
        dist.barrier()
        t0 = rec.now_ns()
        time.sleep(spec.collector.idle_baseline_s)
        rec.event("idle", t0, rec.now_ns())
        stop.check()

        t0 = rec.now_ns()
        dtype = getattr(torch, spec.dtype)
        model, load_info = weights.build(
            spec.arch, spec.weights, device=dev, dtype=dtype, seed=spec.seed,
            max_batch_size=spec.cell.batch_size, max_seq_len=spec.max_seq_len)
        tok = _tokenizer(spec)
        prompts = load_prompts(spec.dataset)
        encoded = [tok.encode(p.text, bos=True, eos=False)[-spec.max_prompt_len:] for p in prompts]
        dist.barrier()
        rec.event("load", t0, rec.now_ns())
        stop.check()

        if spec.cell.power_cap_w is not None:
            _check_caps(run_dir, spec.nodes)
        stop.check()
        measure(rec, model, tok, prompts, encoded, spec, stop, cell_dir, is_main)
        status, code = WorkerStatus("ok", load=load_info.to_dict()), 0
    except PowerCapDenied as exc:
        status, code = WorkerStatus("power_cap_denied", str(exc)), EXIT_CAP_DENIED
    except PowerCapError as exc:
        status, code = WorkerStatus("failed", f"power cap: {exc}"), 1
    except UserError as exc:  # a bad checkpoint, dataset or tokenizer: one line, no traceback
        log.error("%s", exc)
        status, code = WorkerStatus("failed", str(exc)), 2
    except CellInterrupted as exc:
        status, code = WorkerStatus("incomplete", str(exc)), EXIT_INTERRUPTED
    except torch.OutOfMemoryError as exc:
        status, code = WorkerStatus("oom", f"CUDA out of memory: {str(exc).splitlines()[0]}"), EXIT_OOM
    except Exception as exc:  # noqa: BLE001 - e.g. a peer rank's node died: record why, keep what was measured
        log.exception("rank %d failed", renv.rank)
        first = (str(exc).splitlines() or [""])[0][:300]
        status, code = WorkerStatus("failed", f"rank {renv.rank}: {type(exc).__name__}: {first}"), 1
    if is_main:
        rec.write(cell_dir)
        status.write(run_dir / "worker_status.json")
    log.info("rank %d done: %s", renv.rank, status.status)
    if code == 0:
        dist.barrier()
    elif not is_main:
        wait_for_rank0(run_dir / "worker_status.json")
    with contextlib.suppress(Exception):  # a broken group cannot always be torn down cleanly
        dist.destroy_process_group()
    return code


def measure(rec: Recorder, model: Any, tok: Any, prompts: list[Any], encoded: list[list[int]],
            spec: CellSpec, stop: _Stop, cell_dir: Path, is_main: bool) -> None:
    """The measured part of a cell on a loaded model: its engine (compile recorded as a
    phase of its own), the warm-up, then every repeat's batches, each metered."""
    from llmenergy.inference import engines

    engine = engines.make_engine(spec.cell.engine, model, cache_dir=cell_dir.parent.parent / INDUCTOR_CACHE)
    engine.prepare(on_phase=lambda phase, s, e: rec.event(phase, s, e, n_seqs=spec.cell.batch_size))
    stop.check()
    batch_size = spec.cell.batch_size
    t0 = rec.now_ns()
    engine.generate(encoded[:batch_size], spec.warmup_tokens, eos_id=tok.eos_id, stop_at_eos=False)
    rec.event("warmup", t0, rec.now_ns(), n_seqs=min(len(encoded), batch_size))
    for repeat in range(spec.repeats):
        rec.repeat = repeat
        batches = _batches(list(zip(prompts, encoded, strict=True)), batch_size)
        for b, batch in enumerate(batches):
            stop.check()
            rec.batch_index = b
            t_batch = time.monotonic()
            _run_batch(rec, engine, tok, batch, spec, is_main)
            if is_main:
                log.info("%s: repeat %d/%d, batch %d/%d: %d sequences in %.2f s", spec.cell_id,
                         repeat + 1, spec.repeats, b + 1, len(batches), len(batch), time.monotonic() - t_batch)
    rec.repeat = rec.batch_index = -1


def _run_batch(rec: Recorder, engine: Any, tok: Any, batch: list[Any], spec: CellSpec, is_main: bool) -> None:
    from llmenergy.data.accuracy import is_correct

    prompts = [p for p, _ in batch]
    tokens = [t for _, t in batch]
    n_in = sum(len(t) for t in tokens)
    phases: list[tuple[str, int, int]] = []

    def on_phase(phase: str, start_ns: int, end_ns: int) -> None:
        phases.append((phase, start_ns, end_ns))

    result = engine.generate(tokens, spec.cell.max_gen_len, eos_id=tok.eos_id,
                             stop_at_eos=spec.stop_at_eos, on_phase=on_phase)
    outs = result.tokens
    n_out = sum(len(o) for o in outs)
    for phase, s, e in phases:
        rec.event(phase, s, e, n_seqs=len(batch), tokens_in=n_in if phase == "prefill" else 0,
                  tokens_out=n_out if phase == "decode" else 0)
    if not is_main:
        return
    for p, t, o in zip(prompts, tokens, outs, strict=True):
        text = tok.decode(o)
        rec.responses.append({
            "cell_id": rec.cell_id, "repeat": rec.repeat, "batch_index": rec.batch_index, "prompt_id": p.id,
            "tokens_in": len(t), "tokens_out": len(o), "words_out": len(text.split()), "text": text,
            "reference": p.reference, "correct": is_correct(text, p.reference) if p.reference and
            spec.dataset.format == "gsm8k" else None,
            "template": p.template,
        })


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if args and args[0] == "--group":  # a packed group (llmenergy.inference.packed)
        from llmenergy.inference.packed import run_group

        return run_group(Path(args[1]))
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
