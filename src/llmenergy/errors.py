"""Exceptions of llmenergy.

User errors (bad config, missing files) derive from :class:`UserError`; the CLI
prints their one-line message without a traceback and exits with their
``exit_code``.  Vendor/hardware failures are mapped to :class:`SensorError` and
friends by the collector backends.
"""
from __future__ import annotations


class LLMEnergyError(Exception):
    """Base of every llmenergy exception."""

    exit_code = 1


class UserError(LLMEnergyError):
    """Bad input from the user: printed as one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config value is invalid; the message names file and key."""


class CheckpointError(UserError):
    """A checkpoint directory is missing, malformed or does not match the model."""


class DatasetError(UserError):
    """A dataset file is missing or malformed; the message names file, line and field."""


class RecordError(UserError):
    """A cell's record (``spec.json``, ``cell.json``, ...) is unreadable or of another schema version."""


class NetworkError(UserError):
    """A download was needed but the network could not be reached."""


class SensorError(LLMEnergyError):
    """A power sensor failed while reading."""

    exit_code = 3


class SensorUnavailable(SensorError):
    """The requested sensor backend is not present on this machine."""


class PowerCapError(LLMEnergyError):
    """A power cap could not be applied or restored."""

    exit_code = 4


class PowerCapDenied(PowerCapError):
    """Setting the power cap was refused (no permission)."""


class CellInterrupted(LLMEnergyError):
    """The worker was signalled (time limit, preemption) before finishing."""

    exit_code = 5
