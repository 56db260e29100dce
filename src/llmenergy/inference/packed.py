"""One rank of a packed group: load the model once, then run the group's cells in order.

Started as ``python -m llmenergy.inference.worker --group groups/{id}/group.json``
(:class:`~llmenergy.cellfiles.GroupSpec`). The ranks join one process group,
announce their device in the group's ``.run/uuids/`` and (rank 0) wait for the
group's collectors, exactly once. Then, for each cell, in order:

1. rank 0 writes ``cells/{id}/.run/begin.json`` (the launcher's cue);
2. idle baseline (the cell's own);
3. ``load``: the first cell builds the model; every later cell re-allocates the
   KV cache for its batch size and sequence length around the loaded weights
   (:func:`llmenergy.inference.model.resize_cache`) and encodes its prompts;
4. power cap (first cell: wait for the group's guards; a denied or failed cap is
   every cell's outcome), warm-up, repeats × batches, as :mod:`.worker` does;
5. rank 0 writes the cell's ``events.parquet``, ``responses.parquet`` and
   ``.run/worker_status.json``; the launcher finalises the cell from them while the
   ranks go on.

A cell that fails (out of memory, an error in a batch) is recorded and the group
goes on with the next cell. A stop signal records the current cell ``incomplete``
and ends the group; the cells not started stay without records, so a rerun runs
exactly them. A failure that leaves the ranks out of step (a peer's node died)
ends the group at the next barrier.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmenergy import atomic
from llmenergy.cellfiles import CellSpec, GroupSpec, WorkerStatus
from llmenergy.errors import CellInterrupted, PowerCapDenied, PowerCapError, UserError
from llmenergy.inference.worker import (
    EXIT_INTERRUPTED,
    Recorder,
    _check_caps,
    _device,
    _device_info,
    _Stop,
    _tokenizer,
    _wait_ready,
    measure,
    rank_env,
    wait_for_rank0,
)

log = logging.getLogger("llmenergy.inference.worker")

#: rank 0 → launcher: the cell has started (its idle baseline begins).
BEGIN = "begin.json"


@dataclass
class _Shared:
    """What the cells of a group share: the device, the model and tokenizer, the cap outcome."""

    device: Any
    model: Any = None
    load: dict[str, Any] | None = None
    tokenizer: Any = None
    cap_error: Exception | None = None
    prompts: dict[str, Any] = field(default_factory=dict)


def _load(spec: CellSpec, shared: _Shared) -> bool:
    """Build the model (first cell) or give it this cell's KV cache; True when built here."""
    import torch

    from llmenergy.inference import model as M
    from llmenergy.inference import weights

    if shared.model is None:
        shared.model, info = weights.build(
            spec.arch, spec.weights, device=shared.device, dtype=getattr(torch, spec.dtype), seed=spec.seed,
            max_batch_size=spec.cell.batch_size, max_seq_len=spec.max_seq_len)
        shared.load = info.to_dict()
        shared.tokenizer = _tokenizer(spec)
        return True
    M.resize_cache(shared.model, spec.cell.batch_size, spec.max_seq_len)
    log.info("%s: model kept loaded; KV cache %d × %d", spec.cell_id, spec.cell.batch_size, spec.max_seq_len)
    return False


def _prompts(spec: CellSpec, shared: _Shared) -> tuple[list[Any], list[list[int]]]:
    from llmenergy.data.prompts import load_prompts

    key = repr(spec.dataset)
    if key not in shared.prompts:
        prompts = load_prompts(spec.dataset)
        tok = shared.tokenizer
        shared.prompts[key] = (prompts, [tok.encode(p.text, bos=True, eos=False)[-spec.max_prompt_len:]
                                         for p in prompts])
    return shared.prompts[key]


def _measure(spec: CellSpec, cell_dir: Path, group_run: Path, shared: _Shared, rec: Recorder, stop: _Stop,
             is_main: bool, first: bool) -> WorkerStatus:
    """One cell's phases after the model is up; raises as :func:`.worker.run`'s body does."""
    import torch.distributed as dist


    t0 = rec.now_ns()
    time.sleep(spec.collector.idle_baseline_s)
    rec.event("idle", t0, rec.now_ns())
    stop.check()
    t0 = rec.now_ns()
    built = _load(spec, shared)
    prompts, encoded = _prompts(spec, shared)
    dist.barrier()
    rec.event("load", t0, rec.now_ns())
    stop.check()
    if first and spec.cell.power_cap_w is not None:
        try:
            _check_caps(group_run, spec.nodes)
        except (PowerCapDenied, PowerCapError) as exc:
            shared.cap_error = exc
    if shared.cap_error is not None:
        raise shared.cap_error
    stop.check()
    measure(rec, shared.model, shared.tokenizer, prompts, encoded, spec, stop, cell_dir, is_main)
    load = dict(shared.load or {}, shared_model_load=not built)
    return WorkerStatus("ok", load=load)


def _run_cell(spec: CellSpec, cell_dir: Path, group_run: Path, shared: _Shared, stop: _Stop,
              is_main: bool, rank: int, first: bool) -> tuple[WorkerStatus, bool]:
    """Run one cell, record it on rank 0; returns (status, whether the group goes on)."""
    import torch

    rec = Recorder(spec.cell_id, shared.device)
    go_on = True
    try:
        status = _measure(spec, cell_dir, group_run, shared, rec, stop, is_main, first)
    except PowerCapDenied as exc:
        status = WorkerStatus("power_cap_denied", str(exc))
    except PowerCapError as exc:
        status = WorkerStatus("failed", f"power cap: {exc}")
    except UserError as exc:
        log.error("%s: %s", spec.cell_id, exc)
        status = WorkerStatus("failed", str(exc))
    except CellInterrupted as exc:
        status, go_on = WorkerStatus("incomplete", str(exc)), False
    except torch.OutOfMemoryError as exc:
        status = WorkerStatus("oom", f"CUDA out of memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a bad batch fails this cell, not the group
        log.exception("rank %d: cell %s failed", rank, spec.cell_id)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        status = WorkerStatus("failed", f"rank {rank}: {type(exc).__name__}: {first_line}")
    if status.status == "oom" and shared.device.type == "cuda":
        torch.cuda.empty_cache()
    if is_main:
        rec.write(cell_dir)
        status.write(cell_dir / ".run" / "worker_status.json")
    log.info("rank %d: cell %s done: %s", rank, spec.cell_id, status.status)
    return status, go_on


def run_group(group_path: Path) -> int:
    """Run a packed group's cells; 0 unless stopped by a signal (each cell's outcome is its own)."""
    import torch
    import torch.distributed as dist

    from llmenergy.inference import tp

    group = GroupSpec.read(group_path)
    group_dir = group_path.parent
    group_run = group_dir / ".run"
    first_spec = CellSpec.read(group.cell_dir(group.cells[0]) / "spec.json")
    renv = rank_env()
    dev = _device(first_spec, renv.local_rank)
    stop = _Stop(dev)
    torch.manual_seed(first_spec.seed)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, first_spec.ranks_per_node)))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
                            rank=renv.rank, world_size=renv.world_size)
    tp.init_model_parallel(renv.world_size)
    atomic.write_json(group_run / "uuids" / f"{renv.node}.{renv.rank}.json", _device_info(dev, renv.node, renv.rank))
    is_main = renv.rank == 0
    if is_main:
        _wait_ready(group_run, first_spec.nodes)
    shared = _Shared(device=dev)
    code = 0
    for i, cid in enumerate(group.cells):
        dist.barrier()  # every rank starts the cell together; a dead peer ends the group here
        spec = CellSpec.read(group.cell_dir(cid) / "spec.json")  # read as it starts (fakes key on it)
        if is_main:
            atomic.write_json(group.cell_dir(cid) / ".run" / BEGIN, {"cell_id": cid, "position": i,
                                                                     "started_ns": time.time_ns()})
        torch.manual_seed(spec.seed)
        _, go_on = _run_cell(spec, group.cell_dir(cid), group_run, shared, stop, is_main, renv.rank, i == 0)
        if not go_on:
            code = EXIT_INTERRUPTED
            if not is_main:
                wait_for_rank0(group.cell_dir(cid) / ".run" / "worker_status.json")
            break
    log.info("rank %d: group %s done", renv.rank, group.group_id)
    if code == 0:
        with contextlib.suppress(Exception):
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return code
