"""FAKE slow decode for tests: a chosen measured batch's decode lasts some seconds longer.

A slow GPU is hardware the test machines lack. With env ``FAKE_SLOW_DECODE_BATCH=N``
(0-based, counting the measured batches of every repeat, not the warm-up) and
``FAKE_SLOW_DECODE_S`` (seconds), :func:`install` arranges that, once
``llmenergy.inference.generate`` is imported, the N-th measured batch sleeps that
long right after its prefill, inside its decode window (``generate`` stamps the
decode's start as the prefill ends). Just before sleeping it creates the file
``FAKE_SLOW_DECODE_MARK`` (if set), so a test sees from outside that the rank is
in that decode and can signal it there.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from fake_import_hook import GENERATE, after_import, at_measured_batch

ENV_BATCH = "FAKE_SLOW_DECODE_BATCH"
ENV_SECONDS = "FAKE_SLOW_DECODE_S"
ENV_MARK = "FAKE_SLOW_DECODE_MARK"


def sleep_after_prefill(batch: int, kwargs: dict[str, Any], sleep_s: float) -> None:
    """Make the batch's decode ``sleep_s`` longer: its ``on_phase`` sleeps once its prefill ends,
    after creating ``FAKE_SLOW_DECODE_MARK`` (if set)."""
    on_phase = kwargs["on_phase"]

    def slow_after_prefill(phase: str, start_ns: int, end_ns: int) -> None:
        on_phase(phase, start_ns, end_ns)
        if phase == "prefill":
            mark = os.environ.get(ENV_MARK)
            if mark:
                Path(mark).write_text(f"{os.getpid()} {time.time_ns()}\n")
            time.sleep(sleep_s)

    kwargs["on_phase"] = slow_after_prefill


def install() -> None:
    """Arm the slow decode when ``FAKE_SLOW_DECODE_BATCH`` is set; otherwise do nothing."""
    raw = os.environ.get(ENV_BATCH)
    if raw is None or raw == "":
        return
    sleep_s = float(os.environ.get(ENV_SECONDS, "5"))
    after_import(GENERATE, at_measured_batch(int(raw), functools.partial(sleep_after_prefill, sleep_s=sleep_s)))
