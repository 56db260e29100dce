"""FAKE bug in the metrics step, for tests: ``compute_cell_metrics`` raises.

With env ``FAKE_METRICS_CRASH=1``, the launcher's ``llmenergy.analysis.metrics.compute_cell_metrics``
raises ``RuntimeError`` once imported, as a bug in the metrics code would. Used
to check that a cell whose metrics cannot be computed is recorded ``failed``,
exits non-zero and keeps its raw data, with no hook in ``src/``.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from fake_import_hook import after_import

TARGET = "llmenergy.analysis.metrics"
ENV = "FAKE_METRICS_CRASH"
MESSAGE = "FAKE metrics failure injected by tests/fakes/rank/fake_metrics_crash.py"


def patch(module: ModuleType) -> None:
    def compute_cell_metrics(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(MESSAGE)

    module.compute_cell_metrics = compute_cell_metrics


def install() -> None:
    if os.environ.get(ENV):
        after_import(TARGET, patch)
