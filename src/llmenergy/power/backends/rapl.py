"""RAPL backend: CPU package and DRAM energy from the Linux powercap sysfs tree.

Zones are ``<root>/intel-rapl:<P>`` (name ``package-<P>``) and their sub-zones
``intel-rapl:<P>:<S>`` whose name is ``dram``; core/uncore/psys zones are
skipped.  ``energy_uj`` is a counter that wraps at ``max_energy_range_uj``; we
accumulate deltas (adding the range when the counter goes backwards) into a
monotonic ``energy_mj``.  A wrap is only seen if we read more often than the
counter wraps (minutes at full load), which any sampling interval does.

Newer kernels make ``energy_uj`` readable by root only: that is reported as
SensorUnavailable.  RAPL has no instant power, so ``power_w`` is null.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy.errors import SensorUnavailable
from llmenergy.power.backends.base import (
    DeviceInfo,
    PowerBackend,
    make_row,
    sensor_call,
)

log = logging.getLogger(__name__)

POWERCAP_ROOT = Path("/sys/class/powercap")
_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


@dataclass
class _Zone:
    info: DeviceInfo
    path: Path
    max_range_uj: int
    last_raw_uj: int
    total_uj: int  # monotonic, starts at the first raw reading


class RaplBackend(PowerBackend):
    """CPU package (+ DRAM where exposed) energy counters."""

    name = "rapl"

    def __init__(self, *, root: str | Path = POWERCAP_ROOT, node: str | None = None) -> None:
        super().__init__(node=node)
        self.root = Path(root)
        self._zones: list[_Zone] = self._discover()
        if not self._zones:
            raise SensorUnavailable(f"rapl: no intel-rapl package zones under {self.root}")
        log.info("rapl: watching %s", ", ".join(z.info.uuid for z in self._zones))

    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        return (OSError, ValueError)

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, (PermissionError, FileNotFoundError))

    @sensor_call
    def _discover(self) -> list[_Zone]:
        if not self.root.is_dir():
            raise SensorUnavailable(f"rapl: {self.root} does not exist")
        found: list[tuple[int, int, str, Path]] = []
        for path in self.root.iterdir():
            match = _ZONE_RE.match(path.name)
            if not match:
                continue
            package = int(match.group(1))
            sub = match.group(2)
            zone_name = _read_text(path / "name")
            if sub is None and zone_name.startswith("package"):
                found.append((package, 0, "cpu_package", path))
            elif sub is not None and zone_name == "dram":
                found.append((package, 1 + int(sub), "dram", path))
        zones = []
        for index, (package, _, domain, path) in enumerate(sorted(found)):
            uuid = f"cpu-package-{package}" if domain == "cpu_package" else f"cpu-dram-{package}"
            try:
                raw = _read_int(path / "energy_uj")
                max_range = _read_int(path / "max_energy_range_uj")
            except PermissionError as exc:
                raise SensorUnavailable(
                    f"rapl: {path / 'energy_uj'} is not readable (root only on this kernel)"
                ) from exc
            zones.append(_Zone(
                info=DeviceInfo(index=index, uuid=uuid, name=_read_text(path / "name"), domain=domain),
                path=path,
                max_range_uj=max_range,
                last_raw_uj=raw,
                total_uj=raw,
            ))
        return zones

    def devices(self) -> list[DeviceInfo]:
        return [z.info for z in self._zones]

    def _zone(self, device_index: int) -> _Zone:
        self.device(device_index)
        return self._zones[device_index]

    @sensor_call
    def read_energy_mj(self, device_index: int) -> float | None:
        zone = self._zone(device_index)
        raw = _read_int(zone.path / "energy_uj")
        delta = raw - zone.last_raw_uj
        if delta < 0:  # wrapped
            delta += zone.max_range_uj
            log.debug("rapl: %s wrapped", zone.info.uuid)
        zone.total_uj += delta
        zone.last_raw_uj = raw
        return zone.total_uj / 1000.0

    def read_power_w(self, device_index: int) -> float | None:
        self._zone(device_index)
        return None

    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        return [
            make_row(
                node=self.node,
                device=zone.info,
                timestamp_ns=timestamp_ns,
                source=self.name,
                energy_mj=self.read_energy_mj(zone.info.index),
            )
            for zone in self._zones
        ]


def _read_text(path: Path) -> str:
    return path.read_text().strip()


def _read_int(path: Path) -> int:
    return int(_read_text(path))
