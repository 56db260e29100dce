"""Change what a rank does between two engines of a packed group, from outside the code
(a bench diagnostic, ``bench/gpu_session.sh reset``).

Session 20 (H200, fp16, 7B): the batch-16 compiled cell decoded a batch in 623.5 and 623.4 ms
when it ran after the batch-1 cell in the same job, and in 603.1 ms alone, beside the bench's
602.2-603.0 ms: ~160 µs a CUDA-graph step more for the job's second engine, which the worker
builds after ``engines.forget_compiled`` (``torch._dynamo.reset``, which also shuts down
Inductor's CUDA-graph trees). To tell whether the reset is what costs, run a group with this
folder first on PYTHONPATH and ``LLMENERGY_BENCH_FORGET`` set:

- ``keep``: ``forget_compiled`` does nothing (safe for a job of fewer than 8 KV-cache shapes:
  Dynamo's recompile limit);
- ``gc``: ``gc.collect()`` first (the dropped engine's graphs freed now, not at some later
  collection), then the reset, then ``torch.cuda.synchronize()`` and ``empty_cache()``;
- ``share``: the model's KV cache built for the largest batch of the job's cells of the same
  sequence length, and never made smaller, so those cells keep one engine (the worker keys
  it on the cache's shape) and compile each batch size into it, as ``bench/engines.py``
  does: no second engine, no reset (the job's first cell compiles for the largest batch).

Session 21 ran it on an H200 (bench/results/session21): ``keep`` and ``share`` decoded at the
alone figure, ``gc`` did not, so the reset itself costs. The worker now resets only where
Dynamo's recompile limit has no room (``engines.room_for``), so for a job of two shapes
``plain`` now runs as ``keep`` did. ``reset`` brings the old behaviour back (a reset at every
engine swap: ``room_for`` always false), to compare with it.

Python imports ``sitecustomize`` at start-up in every process; only a rank (``RANK`` set) is
changed. The worker looks ``engines.forget_compiled`` up when it calls it, so replacing the
module's attribute is enough.
"""
from __future__ import annotations

import gc
import logging
import os
import sys

_MODE = os.environ.get("LLMENERGY_BENCH_FORGET", "")
log = logging.getLogger("llmenergy.bench.engine_reset")


def _job_batch(max_seq_len: int, asked: int) -> int:
    """The largest batch of this job's cells whose sequence length is ``max_seq_len``."""
    from pathlib import Path

    from llmenergy.cellfiles import CellFiles, CellSpec, GroupSpec

    group = GroupSpec.read(Path(sys.argv[-1]))  # the worker's one argument: group.json
    specs = [CellSpec.read(CellFiles(group.cell_dir(c)).spec) for c in group.cells]
    return max([asked, *(s.cell.batch_size for s in specs if s.max_seq_len == max_seq_len)])


def _share() -> None:
    from llmenergy.inference import model, weights

    build, resize = weights.build, model.resize_cache

    def shared_build(*args, max_batch_size: int, max_seq_len: int, **kwargs):  # type: ignore[no-untyped-def]
        size = _job_batch(max_seq_len, max_batch_size)
        log.warning("weights.build: KV cache for batch %d, not %d (bench/engine_reset share)", size, max_batch_size)
        return build(*args, max_batch_size=size, max_seq_len=max_seq_len, **kwargs)

    def shared_resize(m, max_batch_size: int, max_seq_len: int) -> None:  # type: ignore[no-untyped-def]
        if max_seq_len == m.max_seq_len and max_batch_size <= m.max_batch_size:
            log.warning("resize_cache: batch %d kept for %d (bench/engine_reset share)", m.max_batch_size, max_batch_size)
            return
        resize(m, _job_batch(max_seq_len, max_batch_size), max_seq_len)

    weights.build, model.resize_cache = shared_build, shared_resize


def _install(mode: str) -> None:
    if mode == "share":
        _share()
        return
    from llmenergy.inference import engines

    if mode == "reset":
        engines.room_for = lambda entries, more: False
        log.warning("room_for: always false, a reset at every engine swap (bench/engine_reset)")
        return
    plain = engines.forget_compiled

    def forget_compiled() -> None:
        log.warning("forget_compiled: %s (bench/engine_reset)", mode)
        if mode == "keep":
            return
        import torch

        gc.collect()
        plain()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    engines.forget_compiled = forget_compiled


if _MODE in ("keep", "gc", "share", "reset") and "RANK" in os.environ:
    _install(_MODE)
