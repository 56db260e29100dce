"""FAKE ``dcgmvalue``: the fake DCGM of tests/fakes/fake_dcgm.py under the binding's module name."""
from fake_dcgm import *  # noqa: F401,F403
from fake_dcgm import FAKE_MODULE as FAKE_MODULE  # noqa: F401
