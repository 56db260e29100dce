"""FAKE ``pynvml`` (tests only): the node of ``$FAKE_NVML_STATE`` through :mod:`fake_nvml`.

Subprocesses that have ``tests/fakes`` first on ``PYTHONPATH`` import this file
instead of nvidia-ml-py, so they can never change a real GPU's settings.
"""
import fake_nvml

fake_nvml.export(globals())
