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
  collection), then the reset, then ``torch.cuda.synchronize()`` and ``empty_cache()``.

Python imports ``sitecustomize`` at start-up in every process; only a rank (``RANK`` set) is
changed. The worker looks ``engines.forget_compiled`` up when it calls it, so replacing the
module's attribute is enough.
"""
from __future__ import annotations

import gc
import logging
import os

_MODE = os.environ.get("LLMENERGY_BENCH_FORGET", "")
log = logging.getLogger("llmenergy.bench.engine_reset")


def _install(mode: str) -> None:
    from llmenergy.inference import engines

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


if _MODE in ("keep", "gc") and "RANK" in os.environ:
    _install(_MODE)
