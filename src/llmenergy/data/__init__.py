"""Datasets: loaders for Alpaca and GSM8K files, templates, synthetic generators,
download (``llmenergy data fetch``) and answer scoring.

Entry points: :class:`DatasetSpec`, :class:`Prompt`, :func:`load_prompts`,
:func:`check_dataset`; :func:`extract_answer` and :func:`is_correct` for GSM8K accuracy.
"""
from __future__ import annotations

from llmenergy.data.accuracy import extract_answer, is_correct
from llmenergy.data.prompts import (
    SYNTHETIC,
    DatasetSpec,
    Prompt,
    check_dataset,
    default_cache_dir,
    load_prompts,
)

__all__ = [
    "SYNTHETIC",
    "DatasetSpec",
    "Prompt",
    "check_dataset",
    "default_cache_dir",
    "extract_answer",
    "is_correct",
    "load_prompts",
]
