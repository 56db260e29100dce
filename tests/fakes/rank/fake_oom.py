"""FAKE GPU memory exhaustion for tests: ``torch.OutOfMemoryError`` at a chosen batch.

GPU memory is hardware the test machines lack, so this fake stands in for it.
With env ``FAKE_OOM_AT_BATCH=N`` (0-based, counting the measured batches of
every repeat, not the warm-up), :func:`install` arranges that, once
``llmenergy.inference.generate`` is imported, its ``generate`` raises
``torch.OutOfMemoryError`` on the N-th measured batch, as the CUDA caching
allocator would.  A warm-up call is told apart by having no ``on_phase``
callback.  Every injected error is appended to ``FAKE_OOM_LOG`` (if set) as one
JSON line ``{"batch", "pid"}``.

Nothing is imported or patched in a process that never imports
``llmenergy.inference.generate`` (the launcher, collector, guard), so torch is not loaded
there.
"""
from __future__ import annotations

import json
import os
from typing import Any

from fake_import_hook import GENERATE, after_import, at_measured_batch

ENV_BATCH = "FAKE_OOM_AT_BATCH"
ENV_LOG = "FAKE_OOM_LOG"


def _log(batch: int) -> None:
    target = os.environ.get(ENV_LOG)
    if not target:
        return
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"batch": batch, "pid": os.getpid()}) + "\n").encode())
    finally:
        os.close(fd)


def run_out_of_memory(batch: int, kwargs: dict[str, Any]) -> None:
    """Raise ``torch.OutOfMemoryError`` for measured batch ``batch``, as the CUDA caching allocator would."""
    import torch

    _log(batch)
    raise torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB (FAKE: injected at batch {batch} "
        f"by tests/fakes/rank/fake_oom.py)")


def install() -> None:
    """Arm the injection when ``FAKE_OOM_AT_BATCH`` is set; otherwise do nothing."""
    raw = os.environ.get(ENV_BATCH)
    if raw is None or raw == "":
        return
    after_import(GENERATE, at_measured_batch(int(raw), run_out_of_memory))
