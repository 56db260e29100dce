"""Run a patch on a module right after it is first imported (for the ``fake_*`` shims here).

Nothing is imported early: a process that never imports the target is left alone.
:func:`at_measured_batch` is the patch of the fakes that act on one measured batch of
``llmenergy.inference.generate``.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then patches the freshly executed module."""

    def __init__(self, real: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.real = real
        self.patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, patch: Callable[[ModuleType], None]) -> None:
        self.target = target
        self.patch = patch

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != self.target:
            return None
        sys.meta_path.remove(self)  # one module, once; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, self.patch)
        return spec


def after_import(target: str, patch: Callable[[ModuleType], None]) -> None:
    """Call ``patch(module)`` once ``target`` is imported (now, if it already is)."""
    if target in sys.modules:
        patch(sys.modules[target])
    else:
        sys.meta_path.insert(0, _Finder(target, patch))


#: The module whose ``generate`` the batch fakes wrap.
GENERATE = "llmenergy.inference.generate"


def at_measured_batch(at_batch: int, act: Callable[[int, dict[str, Any]], None]) -> Callable[[ModuleType], None]:
    """A patch for :func:`after_import` of :data:`GENERATE`: its ``generate`` calls ``act(batch,
    kwargs)`` before running the ``at_batch``-th measured batch (0-based, counting the measured
    batches of every repeat; a warm-up call, told apart by having no ``on_phase`` callback, is
    not counted). ``act`` may raise, or change the keyword arguments the batch runs with."""

    def patch(module: ModuleType) -> None:
        real = module.generate
        seen = {"batches": 0}

        @functools.wraps(real)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("on_phase") is not None:  # a measured batch, not the warm-up
                batch = seen["batches"]
                seen["batches"] += 1
                if batch == at_batch:
                    act(batch, kwargs)
            return real(*args, **kwargs)

        module.generate = generate

    return patch
