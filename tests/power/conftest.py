"""Fixtures of the power tests: the one fake NVML and the one fake DCGM (tests/fakes), patched where
llmenergy imports them."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from launch_helpers import FAKES, load_fake

from llmenergy.power.backends import nvml_lib

fake_nvml = load_fake("fake_nvml")
fake_dcgm_module = load_fake("fake_dcgm")

FAKE_DCGM_DIR = FAKES / "dcgm"
DCGM_MODULES = ("pydcgm", "dcgm_fields", "dcgm_structs", "dcgmvalue", "DcgmReader")


@pytest.fixture
def make_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``make_nvml(gpus, **flags)``: a fake NVML node in this process, patched in as ``nvml_lib.pynvml``."""

    def make(gpus: list[dict[str, Any]], **flags: Any) -> Any:
        fake = fake_nvml.FakeNvml({"gpus": gpus, **flags})
        monkeypatch.setattr(nvml_lib, "pynvml", fake.module())
        return fake

    return make


@pytest.fixture
def fake_dcgm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake DCGM bindings, findable through $DCGM_PYTHON_PATH only; yields :mod:`fake_dcgm`.

    The binding modules are *not* importable at the start, so the backend's own
    search is exercised; sys.path and sys.modules are restored afterwards.  The
    host engine starts empty (``fake_dcgm.reset(FakeNvml(...))`` gives it GPUs).
    """
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p) != FAKE_DCGM_DIR])
    monkeypatch.setenv("DCGM_PYTHON_PATH", str(FAKE_DCGM_DIR))
    for name in DCGM_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    fake_dcgm_module.reset(fake_nvml.FakeNvml({"gpus": []}))
    yield fake_dcgm_module
    for name in DCGM_MODULES:
        sys.modules.pop(name, None)
