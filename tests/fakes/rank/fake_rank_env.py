"""FAKE launcher that does not pass the job's environment on to its ranks (tests only).

Slurm's ``srun`` passes the job's environment to the tasks it starts unless a site
sets ``SLURM_EXPORT_ENV`` (or ``--export``) otherwise; then a rank runs without
variables the job's own process has. With env ``FAKE_RANK_UNSET_ENV=A,B``,
:func:`install` removes ``A`` and ``B`` from the environment of a rank process (one
started with ``RANK`` set, as the local launcher starts them) at start-up, before
``llmenergy`` is imported; the job's process keeps them.
"""
from __future__ import annotations

import os

ENV_UNSET = "FAKE_RANK_UNSET_ENV"


def install() -> None:
    names = os.environ.get(ENV_UNSET, "")
    if not names or "RANK" not in os.environ:
        return
    for name in names.split(","):
        os.environ.pop(name.strip(), None)
