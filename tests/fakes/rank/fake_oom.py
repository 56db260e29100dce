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

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "llmenergy.inference.generate"
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


def patch(module: ModuleType, at_batch: int) -> None:
    """Replace ``module.generate`` by a wrapper that runs out of memory at ``at_batch``."""
    real = module.generate
    seen = {"batches": 0}

    @functools.wraps(real)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("on_phase") is not None:  # a measured batch, not the warm-up
            batch = seen["batches"]
            seen["batches"] += 1
            if batch == at_batch:
                import torch

                _log(batch)
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (FAKE: injected at batch {batch} "
                    f"by tests/fakes/rank/fake_oom.py)")
        return real(*args, **kwargs)

    module.generate = generate


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then patches the freshly executed module."""

    def __init__(self, real: importlib.abc.Loader, at_batch: int) -> None:
        self.real = real
        self.at_batch = at_batch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        patch(module, self.at_batch)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one module, once; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, self.at_batch)
        return spec


def install() -> None:
    """Arm the injection when ``FAKE_OOM_AT_BATCH`` is set; otherwise do nothing."""
    raw = os.environ.get(ENV_BATCH)
    if raw is None or raw == "":
        return
    if TARGET in sys.modules:
        patch(sys.modules[TARGET], int(raw))
    else:
        sys.meta_path.insert(0, _Finder(int(raw)))
