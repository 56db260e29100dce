"""The per-node collector process (``llmenergy collect``) and the merge of its files.

Handshake (docs/internals.md): wait for ``{uuid_dir}/{node}.{rank}.json`` files
(``--expect-devices`` of them, bounded by ``--wait-s``), build the backend for
exactly those UUIDs (``"cpu"`` → CPU-side backends), write
``{ready_dir}/{node}.json`` = ``{"node", "backend", "devices", "error"}``, then
sample every ``--interval-ms``.  Backends with cheap instant power (NVML) are
also polled every ``--power-interval-ms`` (default 20 ms ≈ 50 Hz) for
energy + power only, between full samples.  Rows go to
``{out}/{node}.part-NNNN.parquet`` every ``--flush-s`` seconds (atomic).  On
SIGUSR1/SIGINT/SIGTERM the process flushes, writes ``{out}/{node}.parquet``
(atomic; the merge of its parts), removes its parts and exits 0.  A crash
leaves part files only, never the final name; :func:`merge_node_files`
recovers from them.

If the backend cannot be built, the ready file is still written, with
``"backend": null`` and the one-line ``"error"``, so rank 0 and the launcher
fail the job at once; the process then exits with the error's exit code. A
collector that gives up sampling later rewrites its ready file with the error
(and its node agent does, for a collector that dies).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy.atomic import write_parquet
from llmenergy.config import DEFAULT_POWER_INTERVAL_MS, CollectorSpec
from llmenergy.errors import LLMEnergyError, RecordError, SensorError
from llmenergy.handshake import CollectorReady, RankDevice
from llmenergy.layout import node_file, rank_of_file
from llmenergy.power.backends.base import (
    POWER_SCHEMA,
    PowerBackend,
    empty_table,
    rows_to_table,
)
from llmenergy.power.backends.factory import BACKEND_NAMES, select_backend
from llmenergy.slurm import STOP_SIGNALS

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^(?P<node>.+)\.part-(?P<number>\d{4,})\.parquet$")
RECOVERED_KEY = b"llmenergy.recovered_nodes"
MAX_CONSECUTIVE_ERRORS = 50


def part_path(out_dir: Path, node: str, number: int) -> Path:
    return out_dir / f"{node}.part-{number:04d}.parquet"


def final_path(out_dir: Path, node: str) -> Path:
    return out_dir / f"{node}.parquet"


def read_uuid_files(uuid_dir: Path, node: str) -> list[dict[str, Any]]:
    """The ranks' :class:`~llmenergy.handshake.RankDevice` files of one node, sorted by rank;
    unreadable ones skipped (being written: the next poll sees them)."""
    found = []
    if not uuid_dir.is_dir():
        return found
    for path in uuid_dir.iterdir():
        rank = rank_of_file(path, node)
        if rank is None:
            continue
        try:
            entry = RankDevice.read(path)
        except RecordError:
            continue
        if entry.uuid:
            found.append({**entry.to_dict(), "rank": rank})
    return sorted(found, key=lambda e: e["rank"])


class NodeCollector:
    """One node's collector: handshake, sampling loop, part files, final file."""

    def __init__(
        self,
        *,
        backend: str,
        interval_ms: int,
        out_dir: Path,
        node: str,
        uuid_dir: Path,
        ready_dir: Path,
        expect_devices: int,
        flush_s: float = 2.0,
        power_interval_ms: int = DEFAULT_POWER_INTERVAL_MS,
        wait_s: float = 600.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.backend_name = backend
        self.interval_ms = interval_ms
        self.out_dir = out_dir
        self.node = node
        self.uuid_dir = uuid_dir
        self.ready_dir = ready_dir
        self.expect_devices = expect_devices
        self.flush_s = flush_s
        self.power_interval_ms = power_interval_ms
        self.wait_s = wait_s
        self.options = {**(options or {}), "node": node}
        self.stop_requested = False
        self._rows: list[dict[str, Any]] = []
        self._parts: list[Path] = []
        self._next_part = self._first_free_part()

    # -- signals -----------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stop_requested:
            log.info("collector %s: %s received; stopping", self.node, signal.Signals(signum).name)
        self.stop_requested = True

    def request_stop(self) -> None:
        """Ask the loop to stop (what the signal handlers do)."""
        self.stop_requested = True

    def install_signal_handlers(self) -> dict[int, Any]:
        """Install stop handlers; returns the previous ones (for :meth:`restore_signal_handlers`)."""
        previous = {}
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _sleep(self, duration_s: float) -> None:
        # Short naps so a stop signal is honoured within ~50 ms.
        if duration_s > 0 and not self.stop_requested:
            time.sleep(min(duration_s, 0.05))

    # -- handshake ---------------------------------------------------------
    def wait_for_devices(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.wait_s
        entries: list[dict[str, Any]] = []
        while not self.stop_requested:
            entries = read_uuid_files(self.uuid_dir, self.node)
            if len(entries) >= self.expect_devices or time.monotonic() >= deadline:
                break
            self._sleep(0.05)
        if 0 < len(entries) < self.expect_devices:
            log.warning("collector %s: only %d of %d device files after %.0f s; watching those",
                        self.node, len(entries), self.expect_devices, self.wait_s)
        return entries

    def write_ready(self, backend: PowerBackend | None, error: str | None = None) -> None:
        CollectorReady(node=self.node, backend=None if backend is None else backend.name,
                       devices=[] if backend is None else [d.to_json() for d in backend.devices()],
                       interval_ms=self.interval_ms, error=error).write(node_file(self.ready_dir, self.node))

    # -- part files --------------------------------------------------------
    def _first_free_part(self) -> int:
        numbers = [-1]
        if self.out_dir.is_dir():
            for path in self.out_dir.iterdir():
                match = PART_RE.match(path.name)
                if match and match.group("node") == self.node:
                    numbers.append(int(match.group("number")))
        return max(numbers) + 1

    def flush(self) -> None:
        if not self._rows:
            return
        path = part_path(self.out_dir, self.node, self._next_part)
        write_parquet(path, rows_to_table(self._rows))
        self._parts.append(path)
        self._next_part += 1
        log.debug("collector %s: wrote %s (%d rows)", self.node, path.name, len(self._rows))
        self._rows = []

    def finalize(self) -> Path:
        """Flush, write the final file (merge of this run's parts), remove the parts."""
        self.flush()
        tables = [pq.read_table(p) for p in self._parts]
        table = _concat_sorted(tables) if tables else empty_table()
        target = final_path(self.out_dir, self.node)
        write_parquet(target, table)
        for path in self._parts:
            path.unlink(missing_ok=True)
        log.info("collector %s: wrote %s (%d rows)", self.node, target, table.num_rows)
        return target

    # -- main loop ---------------------------------------------------------
    def sample_loop(self, backend: PowerBackend) -> int:
        interval_s = self.interval_ms / 1000.0
        fast_s = self.power_interval_ms / 1000.0
        fast = backend.fast_power and 0 < self.power_interval_ms < self.interval_ms
        now = time.monotonic()
        next_full, next_fast, next_flush = now, now + fast_s, now + self.flush_s
        errors = 0
        while not self.stop_requested:
            now = time.monotonic()
            try:
                if now >= next_full:
                    self._rows.extend(backend.sample(time.time_ns()))
                    next_full = max(next_full + interval_s, now)
                    next_fast = now + fast_s
                elif fast and now >= next_fast:
                    self._rows.extend(backend.sample_power(time.time_ns()))
                    next_fast = max(next_fast + fast_s, now)
                errors = 0
            except SensorError as exc:
                errors += 1
                log.warning("collector %s: sample failed (%d in a row): %s", self.node, errors, exc)
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    log.error("collector %s: giving up after %d failed samples", self.node, errors)
                    self.write_ready(backend, error=f"gave up after {errors} failed samples: {exc}")
                    return exc.exit_code
                next_full = now + interval_s
            if now >= next_flush:
                self.flush()
                next_flush = now + self.flush_s
            wake = min(next_full, next_flush, next_fast if fast else next_full)
            self._sleep(wake - time.monotonic())
        return 0

    def run(self) -> int:
        previous = self.install_signal_handlers()
        try:
            return self._run()
        finally:
            self.restore_signal_handlers(previous)

    def _run(self) -> int:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        entries = self.wait_for_devices()
        if self.stop_requested:
            self.finalize()
            return 0
        uuid_list = [str(e["uuid"]) for e in entries]
        try:
            if not uuid_list:
                raise SensorError(f"collector {self.node}: no device files {self.node}.*.json in "
                                  f"{self.uuid_dir} after {self.wait_s:.0f} s")
            backend = select_backend(self.backend_name, uuid_list=list(dict.fromkeys(uuid_list)),
                                     interval_ms=self.interval_ms, options=self.options)
            backend.own_pids = frozenset(e["pid"] for e in entries if isinstance(e.get("pid"), int) and e["pid"] > 0)
        except LLMEnergyError as exc:
            log.error("%s", exc)
            self.write_ready(None, error=str(exc))
            self.finalize()
            return exc.exit_code
        rc = 0
        try:
            self.write_ready(backend)
            log.info("collector %s: ready (%s, %d devices, every %d ms)", self.node, backend.name,
                     len(backend.devices()), self.interval_ms)
            rc = self.sample_loop(backend)
        finally:
            backend.close()
            self.finalize()
        return rc


#: Columns added to :data:`POWER_SCHEMA` after the first release: a node file of an earlier
#: version lacks them (read as nulls); any other column missing makes it not a power file.
LATER_COLUMNS = ("other_processes",)


def _read_node_file(path: Path) -> pa.Table | None:
    """A node's power file, or None (logged) when it lacks a column this schema has had from the
    start: not a collector's file (a stray parquet file beside them), so its rows are not used."""
    table = pq.read_table(path)
    missing = [n for n in POWER_SCHEMA.names if n not in table.column_names and n not in LATER_COLUMNS]
    if missing:
        log.error("power: %s is not a collector's file (no column %s): left out", path, ", ".join(missing))
        return None
    return table


def _in_schema(t: pa.Table) -> pa.Table:
    """``t`` with :data:`POWER_SCHEMA`'s columns: a column a node file of an earlier version did
    not write (:data:`LATER_COLUMNS`) comes as nulls; what is unknown is not invented."""
    for name in LATER_COLUMNS:
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(t.num_rows, POWER_SCHEMA.field(name).type))
    return t.select(list(POWER_SCHEMA.names)).cast(POWER_SCHEMA)


def _concat_sorted(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables([_in_schema(t) for t in tables])
    return table.sort_by([("node", "ascending"), ("timestamp_ns", "ascending"),
                          ("device_index", "ascending")])


def merge_node_files(directory: str | Path) -> pa.Table:
    """Merge every node's final file in ``directory`` into one power table.

    A node without a final file (its collector crashed) is recovered from its
    part files; such nodes are listed in the schema metadata
    (:func:`recovered_nodes`).  Returns an empty table of the schema if there is
    nothing.  A final file wins over leftover parts of the same node.
    """
    directory = Path(directory)
    finals: dict[str, Path] = {}
    parts: dict[str, list[Path]] = {}
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            name = path.name
            if name.startswith(".") or not name.endswith(".parquet"):
                continue
            match = PART_RE.match(name)
            if match:
                parts.setdefault(match.group("node"), []).append(path)
            else:
                finals[name[: -len(".parquet")]] = path
    tables = []
    recovered = []
    for node in sorted(set(finals) | set(parts)):
        if node in finals:
            tables.append(_read_node_file(finals[node]))
        else:
            log.warning("power: node %s has no final file; recovering from %d part files",
                        node, len(parts[node]))
            recovered.append(node)
            tables.extend(_read_node_file(p) for p in parts[node])
    read = [t for t in tables if t is not None]
    table = _concat_sorted(read) if read else empty_table()
    return table.replace_schema_metadata({RECOVERED_KEY: json.dumps(recovered).encode()})


def recovered_nodes(table: pa.Table) -> list[str]:
    """Nodes whose rows :func:`merge_node_files` recovered from part files."""
    raw = (table.schema.metadata or {}).get(RECOVERED_KEY)
    return [] if raw is None else list(json.loads(raw))


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmenergy collect", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    parser.add_argument("--interval-ms", type=int, default=CollectorSpec.interval_ms, help="full sample period")
    parser.add_argument("--power-interval-ms", type=int, default=DEFAULT_POWER_INTERVAL_MS,
                        help="instant-power poll period for backends that allow it (0 = off)")
    parser.add_argument("--out", type=Path, required=True, help="folder for part and final files")
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--uuid-dir", type=Path, required=True)
    parser.add_argument("--ready-dir", type=Path, required=True)
    parser.add_argument("--expect-devices", type=int, default=1)
    parser.add_argument("--flush-s", type=float, default=2.0)
    parser.add_argument("--wait-s", type=float, default=600.0, help="bound on waiting for device files")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="backend option (dcgm_host, dcgm_profiling, rapl_root, tdp_w, "
                             "proc_stat, replay_path, replay_loop); VALUE is JSON or a string")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    collector = NodeCollector(
        backend=args.backend,
        interval_ms=args.interval_ms,
        out_dir=args.out,
        node=args.node,
        uuid_dir=args.uuid_dir,
        ready_dir=args.ready_dir,
        expect_devices=max(1, args.expect_devices),
        flush_s=args.flush_s,
        power_interval_ms=args.power_interval_ms,
        wait_s=args.wait_s,
        options=dict(args.option),
    )
    return collector.run()


if __name__ == "__main__":
    sys.exit(main())
