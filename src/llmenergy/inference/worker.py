"""The rank loop: one process per rank runs a job's cells in order, a cell run alone
being a group of one.

Started by :mod:`llmenergy.orchestrate.launch` as ``python -m llmenergy.inference.worker
GROUP_JSON`` (:class:`~llmenergy.cellfiles.GroupSpec`: ``groups/{id}/group.json`` for a
packed group, ``cells/{id}/.run/group.json`` for ``run-cell``), with the rank geometry
in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (local launch)
or in ``SLURM_*`` (srun launch).

Once per job the ranks join one process group, announce their device in the job's
``CellFiles.rank_devices``, time their clocks against rank 0's (:func:`.rank.clock_handshake`:
``.run/clocks.json``) and (rank 0) wait for the job's collectors. Then, for each cell:

1. rank 0 writes the cell's ``.run/begin.json`` (the launcher's cue), the ranks meet;
2. ``load``: the first cell builds the model; every later cell re-allocates the KV
   cache for its batch size and sequence length around the loaded weights
   (:func:`llmenergy.inference.model.resize_cache`) and encodes its prompts;
3. ``settle`` (``collector.idle_settle_s``), then the ``idle`` baseline
   (``collector.idle_baseline_s``): the same definition for every cell, the model
   loaded;
4. power cap (first cell: wait for the job's guards; a denied or failed cap is every
   cell's outcome), the engine, warm-up, then per repeat its batches (cycled until
   they last ``collector.min_window_s``) and its prefill-only loop, each metered;
5. every rank writes its outcome and waits for the others' (:func:`.rank.agree`);
   rank 0 writes ``events.parquet``, ``responses.parquet`` and
   ``.run/worker_status.json``; the launcher finalises the cell from them while the
   ranks go on.

A cell that fails on every rank together (out of memory, an error in a batch) is
recorded and the ranks go on with the next cell. A failure that leaves the ranks
out of step (one rank failed alone, a peer died) ends the job within
:data:`.rank.PEER_WAIT_S`; a stop signal records the current cell ``incomplete`` and
ends it. Cells not started stay without records, so a rerun runs exactly them.
Every timestamp is ``time.time_ns()`` taken after a device synchronize, so the
collector's samples (another process, maybe another node) join the events by time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmenergy.arch import NARROW_BYTES, PRECISION_DTYPE, engine_switches, weight_loads
from llmenergy.cellfiles import CellSpec, GroupSpec
from llmenergy.errors import PowerCapDenied, PowerCapError
from llmenergy.handshake import CellBegin, RankOutcome, WorkerStatus
from llmenergy.inference.rank import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    PEER_WAIT_S,
    RankEnv,
    Recorder,
    StopFlag,
    agree,
    cell_status,
    check_caps,
    clock_handshake,
    device_info,
    in_step,
    outcome_of,
    rank_env,
    select_device,
    start_process,
    wait_ready,
)
from llmenergy.inference.measure import measure
from llmenergy.layout import CellFiles, RunLayout, rank_file

log = logging.getLogger("llmenergy.inference.worker")

@dataclass
class Shared:
    """What the cells of a job share: the device, the model and tokenizer, the cap outcome."""

    device: Any
    model: Any = None
    load: dict[str, Any] | None = None
    tokenizer: Any = None
    cap_error: Exception | None = None
    prompts: dict[str, Any] = field(default_factory=dict)
    engine: Any = None
    engine_key: tuple[Any, ...] | None = None
    engines_made: int = 0  # in this process
    #: Dynamo entries of the engines kept since the last reset (None: unknown, reset next time)
    kept_entries: int | None = 0
    #: the engine in use was built after a reset in this process: decoded slower (docs/measurement.md)
    engine_after_reset: bool = False
    cell_dirs: list[Path] = field(default_factory=list)  # the job's cells, in run order
    references: dict[str, Any] = field(default_factory=dict)  # fp16 logits (inference.fidelity)

    def engine_for(self, spec: CellSpec, cache_dir: Path, batch_sizes: set[int]) -> tuple[Any, bool]:
        """The cell's engine, and whether it is the previous cell's (same engine, precision
        and KV cache shape: its compiled graphs fit this cell, so it compiles nothing new).

        The compiled code of the job's engines is kept while Dynamo has room for what the
        cell compiles (one entry per new batch size among ``batch_sizes``); without room it
        is dropped (``engines.forget_compiled``) and the cell gets a new engine."""
        from llmenergy.inference import engines

        key = (spec.cell.engine, spec.cell.precision, self.model.max_batch_size, self.model.max_seq_len)
        if self.engine is not None:
            total = engines.kept_with(self.kept_entries, self.engine)
            if key == self.engine_key:
                more = engines.new_entries(self.engine, batch_sizes)
                if not more or total is None or engines.room_for(total, more):
                    return self.engine, True
            self.kept_entries = total
            self.engine = self.engine_key = None
        if not engines.room_for(self.kept_entries, len(batch_sizes)):
            engines.forget_compiled()
            self.kept_entries, self.engine_after_reset = 0, True  # and every later engine
            log.info("compiled code of the job's engines so far dropped (Dynamo's recompile limit); "
                     "the next engine may decode slower (docs/measurement.md)")
        self.engine, self.engine_key = engines.cell_engine(spec, self.model, cache_dir=cache_dir), key
        self.engines_made += 1
        _log_memory(self.device, f"engine {self.engines_made} of this process built")
        return self.engine, False


def batch_sizes(n_prompts: int, batch_size: int) -> set[int]:
    """The batch sizes a cell of ``n_prompts`` runs: its batches and the warm-up's."""
    return {min(n_prompts, batch_size)} | ({n_prompts % batch_size} if n_prompts % batch_size else set())


def _log_memory(device: Any, what: str) -> None:
    """What a job's kept engines hold on the GPU, in the rank's log."""
    import torch

    if getattr(device, "type", None) == "cuda":
        log.info("%s: %.2f GiB allocated on %s, %.2f GiB reserved", what,
                 torch.cuda.memory_allocated(device) / 2**30, device, torch.cuda.memory_reserved(device) / 2**30)


def _load(spec: CellSpec, shared: Shared) -> bool:
    """Build the model (first cell) or give it this cell's KV cache; True when built here."""
    import torch

    from llmenergy.inference import model as M
    from llmenergy.inference import weights
    from llmenergy.inference.tokenizer import tokenizer_for

    if shared.model is None:
        # configured, else the checkpoint's (its folder or, as in Meta's release, the parent's), else ours
        shared.tokenizer = tokenizer_for(spec.weights, spec.tokenizer)
        if weight_loads(spec.cell.precision, spec.cell.engine) == 2:
            shared.references = _fp16_references(spec, shared)  # a load of their own, freed first
        shared.model, info = weights.build(
            spec.arch, spec.weights, device=shared.device, dtype=getattr(torch, spec.dtype), seed=spec.seed,
            max_batch_size=spec.cell.batch_size, max_seq_len=spec.max_seq_len)
        shared.load = info.to_dict()
        return True
    M.resize_cache(shared.model, spec.cell.batch_size, spec.max_seq_len)
    log.info("%s: model kept loaded; KV cache %d × %d", spec.cell_id, spec.cell.batch_size, spec.max_seq_len)
    return False


def _prompts(spec: CellSpec, shared: Shared) -> tuple[list[Any], list[list[int]]]:
    from llmenergy.data.prompts import load_prompts

    key = repr(spec.dataset)
    if key not in shared.prompts:
        prompts = load_prompts(spec.dataset)
        tok = shared.tokenizer
        shared.prompts[key] = (prompts, [tok.encode(p.text, bos=True, eos=False)[-spec.max_prompt_len:]
                                         for p in prompts])
    return shared.prompts[key]


def _cell_phases(spec: CellSpec, files: CellFiles, job: CellFiles, shared: Shared, rec: Recorder,
                 stop: StopFlag, is_main: bool, first: bool) -> WorkerStatus:
    """One cell from the ranks' meeting to its last batch; raises what fails it."""
    import torch.distributed as dist

    if first and is_main:
        wait_ready(job, spec.nodes)
    dist.barrier()  # every rank starts the cell together
    t0 = rec.now_ns()
    built = _load(spec, shared)
    prompts, encoded = _prompts(spec, shared)
    if built and spec.cell.precision in NARROW_BYTES:  # before int8/fp8 release the fp16 weights
        shared.references = _references(shared, shared.model)
    dist.barrier()
    rec.event("load", t0, rec.now_ns())
    stop.check()
    # idle: the GPUs with this cell's model and KV cache in memory, after a settle interval,
    # the same for a cell alone and for every cell of a group (docs/measurement.md)
    t0 = rec.now_ns()
    time.sleep(spec.collector.idle_settle_s)
    rec.event("settle", t0, rec.now_ns())
    t0 = rec.now_ns()
    time.sleep(spec.collector.idle_baseline_s)
    rec.event("idle", t0, rec.now_ns())
    stop.check()
    if first and spec.cell.power_cap_w is not None:
        try:
            check_caps(job, spec.nodes)
        except (PowerCapDenied, PowerCapError) as exc:
            shared.cap_error = exc
    if shared.cap_error is not None:
        raise shared.cap_error
    stop.check()
    engine, reused = shared.engine_for(spec, RunLayout.of_cell(files.root).inductor_cache,
                                       batch_sizes(len(encoded), spec.cell.batch_size))
    if reused:
        log.info("%s: the previous cell's %s engine kept (same precision and KV cache): no new compile",
                 spec.cell_id, spec.cell.engine)
    measure(rec, engine, shared.tokenizer, prompts, encoded, spec, stop, is_main)
    stop.check()
    fid = _fidelity(spec, engine, shared)
    provenance = getattr(engine, "load_provenance", None)  # the compiled engine's
    engine_load = provenance(spec.cell.batch_size) if provenance is not None else {}
    if spec.cell.engine == "compiled":  # what this rank ran with, checked against the definition
        engine_load["engine_switches"] = engine_switches()
    return WorkerStatus("ok", load=dict(shared.load or {}, shared_model_load=not built, shared_engine=reused,
                                        engine_index=shared.engines_made - 1,
                                        engine_after_reset=shared.engine_after_reset, **engine_load),
                        fidelity=None if fid is None else fid.to_dict())


def _references(shared: Shared, model: Any) -> dict[str, Any]:
    """The fp16 reference logits, through ``model``, of every dataset the job's bf16, int8
    or fp8 cells run (int8/fp8: the cell's own model, before its engine quantises it)."""
    from llmenergy.inference import fidelity

    wanted: dict[str, list[list[int]]] = {}
    for cell_dir in shared.cell_dirs:
        other = CellSpec.read(CellFiles(cell_dir).spec)
        if other.cell.precision in fidelity.COMPARED and repr(other.dataset) not in wanted:
            encoded = _prompts(other, shared)[1]
            wanted[repr(other.dataset)] = fidelity.fidelity_prompts(encoded, model.max_seq_len)
    return fidelity.references(model, wanted)


def _fp16_references(spec: CellSpec, shared: Shared) -> dict[str, Any]:
    """A bf16 job's references: the weights loaded as fp16 (as the cell's spec says float32,
    on a CPU device, in float32 too), their logits kept, the model freed before the bf16 load."""
    import gc

    import torch

    from llmenergy.inference import weights

    dtype = getattr(torch, spec.dtype if spec.dtype == "float32" else PRECISION_DTYPE["fp16"])
    model, info = weights.build(spec.arch, spec.weights, device=shared.device, dtype=dtype, seed=spec.seed,
                                max_batch_size=spec.cell.batch_size, max_seq_len=spec.max_seq_len)
    log.info("%s: weights loaded as %s for the comparison in %.1f s", spec.cell_id,
             str(dtype).removeprefix("torch."), info.load_duration_s)
    try:
        return _references(shared, model)
    finally:
        del model
        gc.collect()
        if shared.device.type == "cuda":
            torch.cuda.empty_cache()


def _fidelity(spec: CellSpec, engine: Any, shared: Shared) -> Any:
    """The cell's :class:`~llmenergy.cellfiles.Fidelity` (bf16, int8, fp8: against the
    job's fp16 references), or None (fp16). A failed comparison is the record's reason, not the cell's;
    inf/NaN logits from the cell's engine fail the cell."""
    from llmenergy.cellfiles import Fidelity
    from llmenergy.inference import fidelity

    if spec.cell.precision not in fidelity.COMPARED:
        return None  # fp16: the reference itself
    try:
        return fidelity.measure(engine, shared.references.get(repr(spec.dataset)))
    except fidelity.NonFiniteLogits:
        raise  # the cell's tokens came from such logits: the cell fails, with this reason
    except Exception as exc:  # noqa: BLE001 - the energy numbers stand without it
        log.exception("%s: comparing logits with fp16 failed", spec.cell_id)
        return Fidelity(reason=f"comparison failed: {type(exc).__name__}: {exc}")


def run_cell(spec: CellSpec, files: CellFiles, job: CellFiles, shared: Shared, stop: StopFlag, renv: RankEnv,
             position: int) -> tuple[int, bool]:
    """Run one cell on this rank, agree with the others, record it on rank 0.
    Returns the cell's exit code and whether this rank goes on with the next cell."""
    import torch

    is_main = renv.rank == 0
    if is_main:
        CellBegin(spec.cell_id, position, time.time_ns()).write(files.begin)
    rec = Recorder(spec.cell_id, shared.device)
    try:
        status, code = _cell_phases(spec, files, job, shared, rec, stop, is_main, position == 0), 0
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's status (rank.outcome_of)
        status, code = outcome_of(exc, renv.rank)
    if status.status == "oom" and shared.device.type == "cuda":
        torch.cuda.empty_cache()
    if is_main:
        rec.write(files)
    own = RankOutcome(renv.rank, status.status, status.reason, time.time_ns())
    outcomes = agree(files, own, renv.world_size)
    together = in_step(outcomes, renv.world_size)
    if is_main:
        cell_status(status, outcomes, renv.world_size).write(files.worker_status)
    log.info("rank %d: cell %s done: %s", renv.rank, spec.cell_id, status.status)
    if not together:
        missing = sorted(set(range(renv.world_size)) - {o.rank for o in outcomes})
        log.error("rank %d: ranks out of step after %s (missing %s, left %s within %.0f s): leaving the job",
                  renv.rank, spec.cell_id, missing, [o.rank for o in outcomes if o.left], PEER_WAIT_S)
        RankOutcome(renv.rank, status.status, status.reason, own.at_ns, left=True).write(files.outcome(renv.rank))
        return code or EXIT_FAILED, False
    return code, code != EXIT_INTERRUPTED


def run(group_path: Path) -> int:
    """Run a job's cells on this rank; the exit code is the last cell's (that of a cell run alone)."""
    import torch
    import torch.distributed as dist

    group = GroupSpec.read(group_path)
    job = CellFiles(Path(group.job_dir) if group.job_dir else group_path.parent)
    first = CellSpec.read(CellFiles(group.cell_dir(group.cells[0])).spec)
    renv = rank_env()
    dev = select_device(first, renv.local_rank)
    stop = StopFlag(dev)
    start_process(first, renv, dev)
    device_info(dev, renv.node, renv.rank).write(rank_file(job.rank_devices, renv.node, renv.rank))
    clock_handshake(job, dev, renv)
    shared = Shared(device=dev, cell_dirs=[group.cell_dir(cid) for cid in group.cells])
    code = 0
    for i, cid in enumerate(group.cells):
        files = CellFiles(group.cell_dir(cid))
        spec = CellSpec.read(files.spec)  # read as the cell starts (the fakes key on it)
        torch.manual_seed(spec.seed)
        code, go_on = run_cell(spec, files, job, shared, stop, renv, i)
        if not go_on:
            break
    log.info("rank %d: %s done", renv.rank, group.group_id)
    if code == 0:
        with contextlib.suppress(Exception):
            dist.barrier()
    with contextlib.suppress(Exception):  # a broken group cannot always be torn down cleanly
        dist.destroy_process_group()
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if len(args) != 1:
        log.error("usage: python -m %s GROUP_JSON", __name__)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
