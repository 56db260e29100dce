"""FAKE ``pynvml`` (tests only): a thin shim over :mod:`fake_nvml_impl`.

Subprocesses that have ``tests/fakes`` first on ``PYTHONPATH`` import this file
instead of nvidia-ml-py, so they can never change a real GPU's settings.
"""
from fake_nvml_impl import *  # noqa: F401,F403
from fake_nvml_impl import FAKE_MODULE as FAKE_MODULE  # noqa: F401
