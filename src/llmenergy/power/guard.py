"""The per-node power-cap guard process (``llmenergy powercap-guard``).

It lives outside the worker ranks, so a rank killed outright (SIGKILL, OOM
killer) cannot leave a GPU capped.  Handshake, like the collector's
(docs/internals.md): wait for ``{uuid_dir}/{node}.{rank}.json`` files
(``--expect-devices`` of them, bounded by ``--wait-s``), validate the cap
against each GPU's constraints, apply it (the state file
``{state_dir}/{node}.json`` is written before any change), then write
``{ready_dir}/{node}.json`` = ``{"node", "status": "applied"|"denied"|"error",
"reason", "backend", "requested_w", "on_denied", "gpus": [{"uuid",
"previous_w", "requested_w", "enforced_w"}]}`` and wait.

It restores the previous limits, and records that in the state file, on the
first of: SIGUSR1, SIGTERM, SIGINT, SIGUSR2, SIGHUP; EOF on stdin (with
``--watch-stdin``: only when the launcher holds a pipe to it, since under
``srun ... &`` stdin is /dev/null and would read EOF at once); the parent
process changing (the parent died) or ``--parent-pid`` ending; an exception;
and ``atexit``.  Nothing in a process survives SIGKILL of the guard itself:
``--restore`` (run by the launcher after the guard ended, or by a Slurm epilog)
restores from the state file, and does nothing when the guard already did.

A refused permission writes status ``denied`` and exits 0 having changed
nothing; the launcher turns that into ``power_cap_denied`` or a skip per
``policies.on_power_cap_denied`` (passed as ``--on-denied`` and echoed in the
ready file).  An out-of-range cap writes status ``error`` with the one-line
ConfigError naming ``--key`` and exits 2.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from llmenergy.errors import LLMEnergyError, PowerCapDenied, PowerCapError
from llmenergy.handshake import CapReady
from llmenergy.layout import node_file
from llmenergy.power.caps import (
    CapBackend,
    CapState,
    apply_caps,
    load_state,
    make_backend,
    restore_caps,
    state_path,
)
from llmenergy.power.collector import read_uuid_files
from llmenergy.slurm import STOP_SIGNALS

log = logging.getLogger(__name__)

#: The cell's stop signals, and SIGHUP (a closed terminal): the guard restores caps on each.
GUARD_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
POLL_S = 0.05


class _StoppedEarly(PowerCapError):
    """Stopped before anything was applied: nothing to restore, not a failure."""

    exit_code = 0


class PowerCapGuard:
    """One node's guard: handshake, apply, wait for a stop trigger, restore."""

    def __init__(self, *, cap_w: float, uuid_dir: Path, ready_dir: Path, state_dir: Path, node: str,
                 expect_devices: int, backend: str = "nvml", on_denied: str = "fail",
                 key: str = "power_cap_w", wait_s: float = 600.0, watch_stdin: bool = False,
                 parent_pid: int | None = None, dcgm_host: str | None = None) -> None:
        self.cap_w = cap_w
        self.uuid_dir = uuid_dir
        self.ready_dir = ready_dir
        self.state_dir = state_dir
        self.node = node
        self.expect_devices = expect_devices
        self.backend_name = backend
        self.on_denied = on_denied
        self.key = key
        self.wait_s = wait_s
        self.watch_stdin = watch_stdin
        self.parent_pid = parent_pid
        self.dcgm_host = dcgm_host
        self.stop_reason: str | None = None
        self.backend: CapBackend | None = None
        self.state: CapState | None = None
        self._start_ppid = os.getppid()
        self._restore_lock = threading.Lock()

    # -- stop triggers ---------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name

    def install_triggers(self) -> None:
        for sig in GUARD_STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        atexit.register(self.restore, "atexit")
        if self.watch_stdin:
            threading.Thread(target=self._read_stdin, name="stdin-eof", daemon=True).start()

    def _read_stdin(self) -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        if self.stop_reason is None:
            self.stop_reason = "stdin-eof"

    def _check_parents(self) -> None:
        if self.stop_reason is not None:
            return
        if os.getppid() != self._start_ppid:
            self.stop_reason = "parent-exit"
        elif self.parent_pid is not None and not _alive(self.parent_pid):
            self.stop_reason = f"pid {self.parent_pid} exited"

    def _wait(self) -> None:
        while True:
            self._check_parents()
            if self.stop_reason is not None:
                return
            time.sleep(POLL_S)

    # -- handshake -------------------------------------------------------------
    def wait_for_devices(self) -> list[str]:
        deadline = time.monotonic() + self.wait_s
        entries: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self._check_parents()
            if self.stop_reason is not None:
                raise _StoppedEarly(f"powercap {self.node}: stopped ({self.stop_reason}) before applying")
            entries = read_uuid_files(self.uuid_dir, self.node)
            if len(entries) >= self.expect_devices:
                break
            time.sleep(POLL_S)
        uuid_list = list(dict.fromkeys(e["uuid"] for e in entries if e["uuid"] != "cpu"))
        if len(entries) < self.expect_devices:
            raise PowerCapError(f"powercap {self.node}: only {len(entries)} of {self.expect_devices} "
                                f"device files in {self.uuid_dir} after {self.wait_s:g} s")
        if not uuid_list:
            raise PowerCapError(f"powercap {self.node}: no GPU among this node's devices; nothing to cap")
        return uuid_list

    def write_ready(self, status: str, reason: str | None = None) -> None:
        gpus = [] if self.state is None else [
            {"uuid": g.uuid, "previous_w": g.previous_w, "requested_w": g.requested_w, "enforced_w": g.enforced_w}
            for g in self.state.gpus]
        CapReady(node=self.node, status=status, reason=reason, backend=self.backend_name,
                 requested_w=self.cap_w, on_denied=self.on_denied, gpus=gpus).write(
            node_file(self.ready_dir, self.node))

    # -- apply / restore -------------------------------------------------------
    def restore(self, reason: str | None = None) -> bool:
        """Restore once (thread- and re-entry-safe); True when nothing is left capped."""
        with self._restore_lock:
            state, backend = self.state, self.backend
            if state is None or backend is None or not state.changed:
                return True
            if not state.restored:
                results = restore_caps(backend, state, reason=reason or self.stop_reason or "stop")
                log.info("powercap %s: restored (%s): %s", self.node, state.restore_reason,
                         ", ".join(f"{r['uuid']}={r['restored_w']}" for r in results))
            return state.restored

    def run(self) -> int:
        self.install_triggers()
        try:
            uuid_list = self.wait_for_devices()
            self.backend = make_backend(self.backend_name, dcgm_host=self.dcgm_host)
            self.state = apply_caps(self.backend, uuid_list, self.cap_w, node=self.node,
                                    path=state_path(self.state_dir, self.node), key=self.key)
        except PowerCapDenied as exc:
            self.state = getattr(exc, "cap_state", None)
            self.restore("apply denied")
            log.log(logging.ERROR if self.on_denied == "fail" else logging.WARNING,
                    "powercap %s: %s (on_denied=%s)", self.node, exc, self.on_denied)
            self.write_ready("denied", str(exc))
            self._close()
            return 0
        except LLMEnergyError as exc:
            self.state = getattr(exc, "cap_state", self.state)
            self.restore("apply failed")
            log.error("powercap %s: %s", self.node, exc)
            self.write_ready("error", str(exc))
            self._close()
            return exc.exit_code
        except Exception as exc:
            self.state = getattr(exc, "cap_state", self.state)
            self.restore("apply crashed")
            self.write_ready("error", f"{type(exc).__name__}: {exc}")
            self._close()
            raise
        try:
            self.write_ready("applied")
            log.info("powercap %s: %g W applied on %s; waiting", self.node, self.cap_w,
                     ", ".join(f"{g.uuid} (was {g.previous_w:g} W, enforced {g.enforced_w} W)"
                               for g in self.state.gpus))
            self._wait()
            log.info("powercap %s: %s; restoring", self.node, self.stop_reason)
        finally:
            ok = self.restore(self.stop_reason or "exception")
            self._close()
        return 0 if ok else PowerCapError.exit_code

    def _close(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            except LLMEnergyError as exc:
                log.warning("powercap %s: closing backend: %s", self.node, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited even though kill(0) succeeds
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def restore_from_state(state_dir: Path, node: str, backend_name: str | None = None,
                       dcgm_host: str | None = None, reason: str = "restore command") -> CapState:
    """Restore a node's caps from its state file (for a launcher or a Slurm epilog); idempotent."""
    state = load_state(state_path(state_dir, node))
    if not state.changed or state.restored:
        log.info("powercap %s: nothing to restore", node)
        return state
    with make_backend(backend_name or state.backend, dcgm_host=dcgm_host) as backend:
        restore_caps(backend, state, reason=reason)
    return state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmenergy powercap-guard",
                                description="Apply a GPU power cap for one node and restore it when stopped.")
    p.add_argument("--cap-w", type=float, help="power cap in watts (required unless --restore)")
    p.add_argument("--uuid-dir", type=Path, help="folder of the ranks' {node}.{rank}.json files")
    p.add_argument("--ready-dir", type=Path, help="folder for {node}.json once applied/denied/failed")
    p.add_argument("--state-dir", type=Path, required=True, help="folder for the {node}.json state file")
    p.add_argument("--node", default=socket.gethostname())
    p.add_argument("--expect-devices", type=int, default=1)
    p.add_argument("--backend", choices=("nvml", "dcgm"), default=None, help="default nvml (restore: as applied)")
    p.add_argument("--dcgm-host", default=None, help="nv-hostengine address; default embedded")
    p.add_argument("--on-denied", choices=("fail", "skip"), default="fail")
    p.add_argument("--key", default="power_cap_w", help="config key named in range errors")
    p.add_argument("--wait-s", type=float, default=600.0, help="bound on waiting for the device files")
    p.add_argument("--watch-stdin", action="store_true", help="also restore on EOF of stdin (a pipe)")
    p.add_argument("--parent-pid", type=int, default=None, help="also restore when this process ends")
    p.add_argument("--restore", action="store_true", help="only restore from the state file, then exit")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.restore:
        try:
            state = restore_from_state(args.state_dir, args.node, args.backend, args.dcgm_host)
        except LLMEnergyError as exc:
            log.error("%s", exc)
            return exc.exit_code
        return 0 if state.restored or not state.changed else PowerCapError.exit_code
    missing = [name for name in ("cap_w", "uuid_dir", "ready_dir") if getattr(args, name) is None]
    if missing:
        build_parser().error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    guard = PowerCapGuard(cap_w=args.cap_w, uuid_dir=args.uuid_dir, ready_dir=args.ready_dir,
                          state_dir=args.state_dir, node=args.node, expect_devices=args.expect_devices,
                          backend=args.backend or "nvml", on_denied=args.on_denied, key=args.key,
                          wait_s=args.wait_s, watch_stdin=args.watch_stdin, parent_pid=args.parent_pid,
                          dcgm_host=args.dcgm_host)
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
