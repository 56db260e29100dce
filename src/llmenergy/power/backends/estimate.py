"""Estimate backend: a *model*, not a measurement.

power_w = CPU utilisation (from ``/proc/stat``, all CPUs, between two reads)
× a configured TDP in W.  The power is integrated (rectangle rule over the
read intervals) into a cumulative ``energy_mj`` so that attribution works the
same way as for counters.  Rows carry ``domain = "estimate"`` and
``source = "estimate"`` so nothing downstream can mistake them for a sensor.

Chosen only when the config names it (``collector.backend: estimate``); the
``auto`` chain never picks it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from llmenergy.errors import ConfigError, SensorUnavailable
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    sensor_call,
)

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
DEFAULT_TDP_W = 100.0


def read_cpu_times(path: Path = PROC_STAT) -> tuple[int, int]:
    """(busy, total) jiffies of the aggregate ``cpu`` line of /proc/stat."""
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice;
            # guest time is already counted in user/nice.
            values = values[:8]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values)
            return total - idle, total
    raise ValueError(f"{path}: no aggregate 'cpu' line")


class EstimateBackend(PowerBackend):
    """CPU-utilisation × TDP power model, clearly labelled ``estimate``."""

    name = "estimate"

    def __init__(
        self,
        *,
        tdp_w: float = DEFAULT_TDP_W,
        proc_stat: str | Path = PROC_STAT,
        node: str | None = None,
    ) -> None:
        super().__init__(node=node)
        if not isinstance(tdp_w, (int, float)) or isinstance(tdp_w, bool) or tdp_w <= 0:
            raise ConfigError(f"collector.tdp_w: {tdp_w!r} must be a positive number of watts")
        self.tdp_w = float(tdp_w)
        self.proc_stat = Path(proc_stat)
        self._device = DeviceInfo(index=0, uuid="cpu-estimate", name=f"cpu x {self.tdp_w:g} W TDP",
                                  domain="estimate")
        try:
            self._last_busy, self._last_total = read_cpu_times(self.proc_stat)
        except (OSError, ValueError) as exc:
            raise SensorUnavailable(f"estimate: cannot read {self.proc_stat}: {exc}") from exc
        self._last_ns = time.monotonic_ns()
        self._energy_mj = 0.0
        self._power_w = 0.0
        log.warning("estimate: power is MODELLED as CPU utilisation x %.1f W, not measured", self.tdp_w)

    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return (OSError, ValueError)

    def devices(self) -> list[DeviceInfo]:
        return [self._device]

    @sensor_call
    def _update(self) -> None:
        busy, total = read_cpu_times(self.proc_stat)
        now_ns = time.monotonic_ns()
        d_total = total - self._last_total
        if d_total > 0:
            utilisation = min(max((busy - self._last_busy) / d_total, 0.0), 1.0)
            self._power_w = utilisation * self.tdp_w
        # Energy over the interval at the power just measured for it.
        self._energy_mj += self._power_w * (now_ns - self._last_ns) / 1e6
        self._last_busy, self._last_total, self._last_ns = busy, total, now_ns

    def read_energy_mj(self, device_index: int) -> float | None:
        self.device(device_index)
        self._update()
        return self._energy_mj

    def read_power_w(self, device_index: int) -> float | None:
        self.device(device_index)
        return self._power_w

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        self._update()
        return [make_row(
            node=self.node,
            device=self._device,
            timestamp_ns=timestamp_ns,
            source=self.name,
            energy_mj=self._energy_mj,
            power_w=self._power_w,
        )]
