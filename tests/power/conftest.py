"""Fixtures of the collector tests: fake NVML, fake DCGM bindings, fake powercap tree."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FAKE_DCGM_DIR = Path(__file__).parent / "fake_dcgm"
DCGM_MODULES = ("pydcgm", "dcgm_fields", "dcgm_structs", "DcgmReader", "fake_dcgm_engine")


@pytest.fixture
def fake_dcgm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Makes the fake DCGM bindings findable through $DCGM_PYTHON_PATH only; yields the engine state.

    The bindings are *not* on sys.path at the start, so the backend's own search
    is exercised; sys.path and sys.modules are restored afterwards.
    """
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p) != FAKE_DCGM_DIR])
    monkeypatch.setenv("DCGM_PYTHON_PATH", str(FAKE_DCGM_DIR))
    for name in DCGM_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(FAKE_DCGM_DIR))
    import fake_dcgm_engine

    sys.path.remove(str(FAKE_DCGM_DIR))
    yield fake_dcgm_engine
    for name in DCGM_MODULES:
        sys.modules.pop(name, None)
