"""FAKE ``dcgm_structs``: a thin shim over tests/fakes/fake_dcgm_impl.py (needs tests/fakes on PYTHONPATH)."""
from fake_dcgm_impl import *  # noqa: F401,F403
from fake_dcgm_impl import FAKE_MODULE as FAKE_MODULE  # noqa: F401
