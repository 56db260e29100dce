"""Tests only: the Slurm executor's status checks at most every N seconds.

snakemake-executor-plugin-slurm (2.8) waits 10 s longer after every status check
that finds no finished job, up to 180 s: right for hour-long cells, but most of
the wall time of a test whose cells last 10-60 s. With ``TEST_STATUS_CHECK_MAX_S``
set, the interval a Snakemake process sleeps between checks is capped at that many
seconds (Snakemake's remote-executor property that the plugin sets). Nothing else
of Snakemake or the plugin changes: the same squeue queries, states and errors.
"""
from __future__ import annotations

import os
from types import ModuleType

from fake_import_hook import after_import

ENV = "TEST_STATUS_CHECK_MAX_S"
TARGET = "snakemake_interface_executor_plugins.executors.remote"


def patch(module: ModuleType, cap_s: float) -> None:
    prop = module.RemoteExecutor.next_seconds_between_status_checks

    def capped(self: object, value: float | None) -> None:
        prop.fset(self, None if value is None else min(value, cap_s))

    module.RemoteExecutor.next_seconds_between_status_checks = property(prop.fget, capped)


def install() -> None:
    """Arm the cap in this process when ``TEST_STATUS_CHECK_MAX_S`` is set."""
    value = os.environ.get(ENV)
    if value:
        after_import(TARGET, lambda module: patch(module, float(value)))
