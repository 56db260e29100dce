"""The power-backend interface, the power-sample schema, and vendor-error mapping.

A :class:`PowerBackend` reads one kind of sensor (DCGM, NVML, RAPL, ...) for a
fixed set of devices chosen when it is built.  Units sit in the names:
``read_energy_mj`` returns a cumulative counter in millijoules,
``read_power_w`` an instantaneous power in watts.  ``sample`` returns rows
with exactly the columns of :data:`POWER_COLUMNS` (docs/internals.md, "power
samples"); a metric the backend cannot read is ``None``.

Vendor libraries raise their own exceptions.  Methods decorated with
:func:`sensor_call` (or code under :func:`map_sensor_errors`) turn those into
:class:`~llmenergy.errors.SensorError`, or :class:`~llmenergy.errors.SensorUnavailable`
when the backend says the error means "not present here".
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa

from llmenergy.cellfiles import POWER_COLUMNS, POWER_SCHEMA
from llmenergy.config import COLLECTOR_BACKENDS
from llmenergy.errors import LLMEnergyError, SensorError, SensorUnavailable

log = logging.getLogger(__name__)

#: The ``domain`` values a row may carry.
DOMAINS = frozenset({"gpu", "cpu_package", "dram", "estimate"})
#: The ``source`` values a row may carry.
SOURCES = frozenset((*COLLECTOR_BACKENDS, "replay", "nvml-avg")) - {"auto"}


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """One device a backend watches.

    ``index`` is the backend's own device index (NVML/DCGM GPU index, RAPL
    zone order) and is what ``read_*`` methods take; ``uuid`` is the GPU UUID
    or a CPU-side name such as ``cpu-package-0``.
    """

    index: int
    uuid: str
    name: str
    domain: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_row(
    *,
    node: str,
    device: DeviceInfo,
    timestamp_ns: int,
    source: str,
    **metrics: Any,
) -> dict[str, Any]:
    """A power-sample row with every column of :data:`POWER_COLUMNS`; unknown metrics are ``None``."""
    unknown = set(metrics) - set(POWER_COLUMNS)
    if unknown:
        raise ValueError(f"power sample: unknown columns {sorted(unknown)}")
    row: dict[str, Any] = dict.fromkeys(POWER_COLUMNS)
    row.update(metrics)
    row["node"] = node
    row["device"] = device.uuid
    row["device_index"] = device.index
    row["domain"] = device.domain
    row["timestamp_ns"] = int(timestamp_ns)
    row["source"] = source
    return row


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the power columns) → an Arrow table of :data:`POWER_SCHEMA`."""
    columns = {name: [row.get(name) for row in rows] for name in POWER_COLUMNS}
    return pa.Table.from_pydict(columns, schema=POWER_SCHEMA)


def empty_table() -> pa.Table:
    return POWER_SCHEMA.empty_table()


class PowerBackend(abc.ABC):
    """A source of power samples for a fixed set of devices (Zeus-like device layer)."""

    #: The ``source`` column value of this backend's rows.
    name: str = "none"
    #: True when ``read_power_w`` is cheap enough to poll at ~50 Hz between full samples.
    fast_power: bool = False
    #: PIDs of the job's ranks on this node (the collector sets them from the ranks' device files):
    #: a backend that lists a GPU's processes counts those that are neither these nor their children.
    own_pids: frozenset[int] = frozenset()

    def __init__(self, *, node: str | None = None) -> None:
        self.node = node or socket.gethostname()

    # -- the interface ---------------------------------------------------
    @abc.abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """The devices this backend watches, in a stable order."""

    @abc.abstractmethod
    def read_energy_mj(self, device_index: int) -> float | None:
        """Cumulative energy counter of one device in mJ, or None if it has none."""

    @abc.abstractmethod
    def read_power_w(self, device_index: int) -> float | None:
        """Instantaneous power of one device in W, or None if it has none."""

    @abc.abstractmethod
    def sample(self, timestamp_ns: int) -> list[dict[str, Any]]:
        """One row per device with every metric the backend reads, stamped ``timestamp_ns``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release vendor handles.  Safe to call twice."""

    # -- shared helpers ---------------------------------------------------
    def read_energy_and_power(self, device_index: int) -> tuple[float | None, float | None]:
        """``(read_energy_mj, read_power_w)`` of one device; backends that can read
        both in one vendor call override this."""
        return self.read_energy_mj(device_index), self.read_power_w(device_index)

    def source_of(self, device_index: int) -> str:
        """The ``source`` of a device's rows: the backend's name unless a backend says how a
        device's readings differ (NVML's averaged-power fallback: ``nvml-avg``)."""
        return self.name

    def sample_power(self, timestamp_ns: int) -> list[dict[str, Any]]:
        """A light row per device: energy counter and instant power only.

        The collector calls this between full samples when :attr:`fast_power` is set.
        """
        rows = []
        for dev in self.devices():
            energy_mj, power_w = self.read_energy_and_power(dev.index)
            rows.append(make_row(node=self.node, device=dev, timestamp_ns=timestamp_ns,
                                 source=self.source_of(dev.index), energy_mj=energy_mj, power_w=power_w))
        return rows

    def device(self, device_index: int) -> DeviceInfo:
        for dev in self.devices():
            if dev.index == device_index:
                return dev
        raise SensorError(f"{self.name}: no watched device with index {device_index}")

    def vendor_errors(self) -> tuple[type[BaseException], ...]:
        """Exception types of the vendor library, resolved at call time (tests patch modules)."""
        return ()

    def is_unavailable(self, exc: BaseException) -> bool:
        """True when a vendor error means the sensor is not present (→ SensorUnavailable)."""
        return False

    def __enter__(self) -> PowerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(node={self.node!r}, devices={len(self.devices())})"


@contextlib.contextmanager
def map_sensor_errors(
    source: str,
    errors: tuple[type[BaseException], ...],
    *,
    what: str = "read",
    unavailable: Callable[[BaseException], bool] | None = None,
) -> Iterator[None]:
    """Re-raise vendor exceptions of ``errors`` as SensorError/SensorUnavailable.

    llmenergy's own exceptions pass through untouched.
    """
    try:
        yield
    except LLMEnergyError:
        raise
    except errors as exc:  # type: ignore[misc]
        message = f"{source}: {what} failed: {exc}"
        if unavailable is not None and unavailable(exc):
            raise SensorUnavailable(message) from exc
        raise SensorError(message) from exc


F = TypeVar("F", bound=Callable[..., Any])


def sensor_call(func: F) -> F:
    """Method decorator: map the backend's :meth:`PowerBackend.vendor_errors` to llmenergy errors."""

    @functools.wraps(func)
    def wrapper(self: PowerBackend, *args: Any, **kwargs: Any) -> Any:
        with map_sensor_errors(
            self.name,
            self.vendor_errors(),
            what=func.__name__,
            unavailable=self.is_unavailable,
        ):
            return func(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def vendor_text(value: str | bytes) -> str:
    """A vendor string (NVML and DCGM return bytes in older bindings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def select_devices(found: dict[str, DeviceInfo], uuid_list: list[str] | None, *, missing_what: str) -> list[DeviceInfo]:
    """Exactly the GPUs named by ``uuid_list`` (in that order), or every one found, by index.

    A named UUID that is not in ``found`` raises :class:`SensorUnavailable`:
    ``missing_what`` says who did not see it (e.g. "nvml: GPU UUID(s) not on this node").
    """
    if uuid_list is None:
        return sorted(found.values(), key=lambda d: d.index)
    missing = [u for u in uuid_list if u not in found]
    if missing:
        raise SensorUnavailable(f"{missing_what}: {', '.join(missing)}")
    return [found[u] for u in dict.fromkeys(uuid_list)]
