"""The modules that run as processes of their own (``python -m MODULE``), named once.

Launchers, the CLI's delegated subcommands and the tests spawn them through these
constants, so that moving a module cannot leave a stale module string behind
(``tests/test_layout.py`` imports each one and checks it has ``main``).
"""
from __future__ import annotations

CLI = "llmenergy.cli"
WORKER = "llmenergy.inference.worker"
NODE_AGENT = "llmenergy.power.agent"
COLLECTOR = "llmenergy.power.collector"
POWERCAP_GUARD = "llmenergy.power.guard"
SUBMIT = "llmenergy.orchestrate.submit"
DATA_FETCH = "llmenergy.data.fetch"

ALL: dict[str, str] = {
    "CLI": CLI, "WORKER": WORKER, "NODE_AGENT": NODE_AGENT, "COLLECTOR": COLLECTOR,
    "POWERCAP_GUARD": POWERCAP_GUARD, "SUBMIT": SUBMIT, "DATA_FETCH": DATA_FETCH,
}
