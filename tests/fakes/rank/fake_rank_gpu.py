"""FAKE GPU identity for a CPU rank (tests only).

A CPU rank announces itself to its node's collector and power-cap guard with a
device file ``.run/uuids/{node}.{rank}.json`` whose UUID is ``cpu``, and the
guard rightly finds no GPU to cap there. With env ``FAKE_RANK_GPU_UUID=U``,
:func:`install` makes the rank announce the GPU ``U`` instead (named
``FAKE GPU``), as a rank on a GPU node would; the fake NVML of ``tests/fakes``
then simulates that GPU for the guard. The rank itself still computes on the
CPU, so nothing real is ever touched.

It patches ``llmenergy.atomic.write_json`` (what the worker writes the device
file with) once that module is imported; other files pass through unchanged.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

TARGET = "llmenergy.atomic"
ENV_UUID = "FAKE_RANK_GPU_UUID"


def patch(module: ModuleType, uuid: str) -> None:
    """Make ``module.write_json`` rewrite a CPU rank's device file to announce GPU ``uuid``."""
    real = module.write_json

    @functools.wraps(real)
    def write_json(path: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent.name == "uuids" and isinstance(obj, dict) and obj.get("uuid") == "cpu":
            obj = {**obj, "uuid": uuid, "name": "FAKE GPU", "index": 0}
        return real(path, obj, *args, **kwargs)

    module.write_json = write_json


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader, uuid: str) -> None:
        self.real = real
        self.uuid = uuid

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        patch(module, self.uuid)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one module, once; keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.uuid)
        return spec


def install() -> None:
    """Arm the fake when ``FAKE_RANK_GPU_UUID`` is set; otherwise do nothing."""
    uuid = os.environ.get(ENV_UUID)
    if not uuid:
        return
    if TARGET in sys.modules:
        patch(sys.modules[TARGET], uuid)
    else:
        sys.meta_path.insert(0, _Finder(uuid))
