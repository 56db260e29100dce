"""llmenergy: measure the energy cost of LLM inference on Slurm GPU clusters."""
from __future__ import annotations

__version__ = "0.1.0"
