"""Power caps and their guaranteed restore, against FAKE NVML/DCGM bindings only (tests/fakes).

No test here can touch a real GPU: in-process tests patch ``llmenergy.power.backends.nvml_lib.pynvml``
(where llmenergy imports NVML) with the fake, and every subprocess gets ``tests/fakes`` first on
PYTHONPATH (its ``pynvml`` is the fake) and ``DCGM_PYTHON_PATH`` pointing at the fake DCGM bindings.
The fakes log every call; the tests assert the exact sequence of set calls.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import FAKES, fake_nvml

import llmenergy.power.caps as powercap
from llmenergy import entrypoints
from llmenergy.power.backends import nvml_lib
from llmenergy.errors import ConfigError, PowerCapDenied, PowerCapError
from llmenergy.power.caps import (
    CapState,
    apply_caps,
    load_state,
    read_cap_report,
    restore_caps,
    validate_cap,
)
from llmenergy.power.guard import main as guard_main

SRC = Path(powercap.__file__).resolve().parents[2]
GPU_A, GPU_B = "GPU-fake-aaaa", "GPU-fake-bbbb"
SET_FNS = ("nvmlDeviceSetPowerManagementLimit", "dcgmConfigSet")




class FakeNode:
    """Simulated GPUs in a JSON file shared by every process, plus the fakes' call log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "fake_gpus.json"
        self.log_file = root / "fake_calls.jsonl"
        self.uuid_dir, self.ready_dir, self.state_dir = root / "uuids", root / "ready", root / "capstate"
        self.uuid_dir.mkdir()
        self.nvml = fake_nvml.FakeNvml(self.state_file, log_path=self.log_file)  # this process's view

    def write(self, gpus: list[dict[str, Any]], **flags: Any) -> None:
        self.state_file.write_text(json.dumps({"gpus": gpus, **flags}))

    def update(self, **flags: Any) -> None:
        data = json.loads(self.state_file.read_text())
        data.update(flags)
        self.write(data.pop("gpus"), **data)

    def limits_w(self) -> dict[str, float]:
        return {g["uuid"]: g["limit_mw"] / 1000 for g in json.loads(self.state_file.read_text())["gpus"]}

    def calls(self) -> list[dict[str, Any]]:
        return fake_nvml.read_log(self.log_file)

    def sets(self) -> list[tuple[str, float, bool]]:
        """(uuid, watts, ok) of every set call, in order, from every process."""
        out = []
        for c in self.calls():
            if c["fn"] == "nvmlDeviceSetPowerManagementLimit":
                out.append((c["uuid"], c["args"]["limit_mw"] / 1000, c["ok"]))
            elif c["fn"] == "dcgmConfigSet":
                out.append((c["uuid"], float(c["args"]["power_w"]), c["ok"]))
        return out

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(FAKES), str(SRC), env.get("PYTHONPATH", "")])
        env.update(FAKE_NVML_STATE=str(self.state_file), FAKE_NVML_LOG=str(self.log_file),
                   DCGM_PYTHON_PATH=str(FAKES / "dcgm"))
        return env

    def write_uuid(self, node: str, rank: int, uuid: str) -> None:
        tmp = self.uuid_dir / f".{node}.{rank}.tmp"
        tmp.write_text(json.dumps({"node": node, "rank": rank, "uuid": uuid}))
        tmp.rename(self.uuid_dir / f"{node}.{rank}.json")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    fake = FakeNode(tmp_path)
    fake.write([fake_nvml.make_gpu(GPU_A), fake_nvml.make_gpu(GPU_B, limit_w=650)])
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_file))
    monkeypatch.setenv("FAKE_NVML_LOG", str(fake.log_file))
    monkeypatch.setattr(nvml_lib, "pynvml", fake.nvml.module())
    return fake


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # only the processes this test started, by their own handle
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_guard(node: FakeNode, procs: list, *extra: str, cap_w: float = 250, expect: int = 2,
                name: str = "n0", stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", entrypoints.POWERCAP_GUARD, "--cap-w", str(cap_w),
           "--uuid-dir", str(node.uuid_dir), "--ready-dir", str(node.ready_dir),
           "--state-dir", str(node.state_dir), "--node", name, "--expect-devices", str(expect), *extra]
    with open(node.root / f"guard.{len(procs)}.log", "wb") as stderr:
        proc = subprocess.Popen(cmd, env=node.env(), stdin=stdin, stderr=stderr)
    procs.append(proc)
    return proc


def wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_ready(node: FakeNode, proc: subprocess.Popen[bytes] | None = None, name: str = "n0") -> dict[str, Any]:
    path = node.ready_dir / f"{name}.json"

    def ready() -> bool:
        if proc is not None and proc.poll() is not None and not path.exists():
            logs = "".join(p.read_text() for p in node.root.glob("guard.*.log"))
            raise AssertionError(f"guard exited {proc.returncode} before its ready file:\n{logs}")
        return path.exists()

    wait_for(ready, "the guard's ready file")
    return json.loads(path.read_text())


def applied_guard(node: FakeNode, procs: list, *extra: str, **kw: Any) -> subprocess.Popen[bytes]:
    proc = start_guard(node, procs, *extra, **kw)
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    ready = wait_ready(node, proc)
    assert ready["status"] == "applied", ready
    assert node.limits_w() == {GPU_A: 250, GPU_B: 250}
    return proc


CAP_THEN_RESTORE = [(GPU_A, 250, True), (GPU_B, 250, True), (GPU_A, 700, True), (GPU_B, 650, True)]


# -- validation ------------------------------------------------------------------
def test_validate_cap_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        validate_cap(90, 200, 700, "config.yaml: matrix[0].power_cap_w")
    assert str(err.value) == "config.yaml: matrix[0].power_cap_w: 90 W is outside the GPU's range 200–700 W"
    with pytest.raises(ConfigError, match=r"^k: 701 W is outside"):
        validate_cap(701, 200, 700, "k")
    assert validate_cap(200, 200, 700, "k") == 200.0 and validate_cap("450", 200, 700, "k") == 450.0


def test_out_of_range_changes_nothing(node: FakeNode) -> None:
    with powercap.NvmlCapBackend() as backend, pytest.raises(ConfigError, match="matrix.3..power_cap_w: 90 W"):
        apply_caps(backend, [GPU_A, GPU_B], 90, path=node.state_dir / "n0.json", key="matrix[3].power_cap_w")
    assert node.sets() == [] and not (node.state_dir / "n0.json").exists()


def test_guard_out_of_range_reports_error_with_key(node: FakeNode, procs: list) -> None:
    proc = start_guard(node, procs, "--key", "config.yaml: matrix[0].power_cap_w", cap_w=90)
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    ready = wait_ready(node, proc)
    assert proc.wait(20) == ConfigError.exit_code
    assert ready["status"] == "error"
    assert ready["reason"] == "config.yaml: matrix[0].power_cap_w: 90 W is outside the GPU's range 200–700 W"
    assert node.sets() == [] and node.limits_w() == {GPU_A: 700, GPU_B: 650}


# -- in-process apply / restore ----------------------------------------------------
def test_state_file_is_written_before_the_first_change(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, float]] = []
    real_set = node.nvml.nvmlDeviceSetPowerManagementLimit

    def spying_set(handle: Any, limit: int) -> None:
        saved = json.loads((node.state_dir / "n0.json").read_text())  # must already exist
        seen.append({g["uuid"]: g["previous_w"] for g in saved["gpus"]})
        real_set(handle, limit)

    monkeypatch.setattr(node.nvml.module(), "nvmlDeviceSetPowerManagementLimit", spying_set)
    with powercap.NvmlCapBackend() as backend:
        state = apply_caps(backend, [GPU_A, GPU_B], 250, node="n0", path=node.state_dir / "n0.json")
    assert seen == [{GPU_A: 700, GPU_B: 650}] * 2
    assert [(g.previous_w, g.requested_w, g.enforced_w) for g in state.gpus] == [(700, 250, 250), (650, 250, 250)]
    assert load_state(node.state_dir / "n0.json").status == "applied"


def test_restore_is_idempotent(node: FakeNode) -> None:
    path = node.state_dir / "n0.json"
    with powercap.NvmlCapBackend() as backend:
        state = apply_caps(backend, [GPU_A, GPU_B], 250, node="n0", path=path)
        first = restore_caps(backend, state, reason="test")
        second = restore_caps(backend, state, reason="again")
        third = restore_caps(backend, load_state(path), reason="from file")
    assert node.sets() == CAP_THEN_RESTORE
    assert [r["ok"] for r in first] == [True, True] and not any(r["already"] for r in first)
    assert all(r["already"] for r in second + third)
    saved = load_state(path)
    assert saved.restored and saved.restore_reason == "test"
    assert [g.restored_w for g in saved.gpus] == [700, 650]
    assert node.limits_w() == {GPU_A: 700, GPU_B: 650}


def test_enforced_limit_is_read_back_and_setting_restored(node: FakeNode) -> None:
    # Another limiter holds GPU B at 230 W: enforced differs from requested and from the setting.
    node.write([fake_nvml.make_gpu(GPU_A), fake_nvml.make_gpu(GPU_B, other_limit_mw=230_000)])
    with powercap.NvmlCapBackend() as backend:
        state = apply_caps(backend, [GPU_A, GPU_B], 250)
        restore_caps(backend, state)
    assert [g.enforced_w for g in state.gpus] == [250, 230]
    assert [g.previous_w for g in state.gpus] == [700, 700]
    assert [g.previous_enforced_w for g in state.gpus] == [700, 230]
    assert node.sets() == [(GPU_A, 250, True), (GPU_B, 250, True), (GPU_A, 700, True), (GPU_B, 700, True)]


def test_partial_denial_rolls_back_the_changed_gpu(node: FakeNode) -> None:
    node.update(deny_set=[GPU_B])
    with powercap.NvmlCapBackend() as backend, pytest.raises(PowerCapDenied, match="no permission") as err:
        apply_caps(backend, [GPU_A, GPU_B], 250, path=node.state_dir / "n0.json")
    assert node.sets() == [(GPU_A, 250, True), (GPU_B, 250, False), (GPU_A, 700, True)]
    saved = load_state(node.state_dir / "n0.json")
    assert saved.status == "denied" and saved.restored and err.value.cap_state.restored
    assert node.limits_w() == {GPU_A: 700, GPU_B: 650}


def test_other_vendor_errors_are_power_cap_errors(node: FakeNode) -> None:
    node.update(set_error=fake_nvml.NVML_ERROR_UNKNOWN)
    with powercap.NvmlCapBackend() as backend, pytest.raises(PowerCapError) as err:
        apply_caps(backend, [GPU_A], 250)
    assert not isinstance(err.value, PowerCapDenied)
    # the failed GPU's state is uncertain, so a restore was attempted (and failed too, as recorded)
    assert node.sets() == [(GPU_A, 250, False), (GPU_A, 700, False)]
    assert err.value.cap_state.status == "error" and not err.value.cap_state.restored
    assert "NVML error 999" in err.value.cap_state.gpus[0].restore_error


def test_throttle_reports_sw_power_cap_and_violation_time(node: FakeNode) -> None:
    node.write([fake_nvml.make_gpu(GPU_A, event_reasons=0x4 | 0x1, violation_ns=123_000)])
    with powercap.NvmlCapBackend() as backend:
        assert backend.throttle(GPU_A) == {"clock_event_reasons": 5, "sw_power_cap": True,
                                           "power_violation_ns": 123_000}
        assert backend.limits_w(GPU_A) == (200, 700, 700)


# -- the guard process: real processes, real signals ------------------------------------
def test_guard_sets_then_restores_on_normal_stop(node: FakeNode, procs: list) -> None:
    proc = applied_guard(node, procs)
    ready = json.loads((node.ready_dir / "n0.json").read_text())
    assert ready["gpus"] == [
        {"uuid": GPU_A, "previous_w": 700, "requested_w": 250, "enforced_w": 250},
        {"uuid": GPU_B, "previous_w": 650, "requested_w": 250, "enforced_w": 250}]
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(20) == 0
    assert node.sets() == CAP_THEN_RESTORE
    saved = load_state(node.state_dir / "n0.json")
    assert saved.restored and saved.restore_reason == "SIGUSR1" and saved.restored_at_ns >= saved.applied_at_ns


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP])
def test_guard_restores_on_signal(node: FakeNode, procs: list, sig: signal.Signals) -> None:
    proc = applied_guard(node, procs)
    proc.send_signal(sig)
    assert proc.wait(20) == 0
    assert node.sets() == CAP_THEN_RESTORE
    assert load_state(node.state_dir / "n0.json").restore_reason == sig.name


def test_worker_sigkill_then_guard_restores_when_stopped(node: FakeNode, procs: list) -> None:
    worker_code = textwrap.dedent(f"""
        import json, os, sys, time
        d = sys.argv[1]
        for rank, uuid in enumerate([{GPU_A!r}, {GPU_B!r}]):
            tmp = os.path.join(d, f".n0.{{rank}}.tmp")
            open(tmp, "w").write(json.dumps({{"uuid": uuid, "rank": rank}}))
            os.rename(tmp, os.path.join(d, f"n0.{{rank}}.json"))
        time.sleep(120)  # "decoding"
    """)
    guard = start_guard(node, procs)
    worker = subprocess.Popen([sys.executable, "-c", worker_code, str(node.uuid_dir)], env=node.env())
    procs.append(worker)
    assert wait_ready(node, guard)["status"] == "applied"
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(20) == -signal.SIGKILL
    time.sleep(0.3)
    assert guard.poll() is None and node.limits_w() == {GPU_A: 250, GPU_B: 250}  # still capped, guard alive
    guard.send_signal(signal.SIGUSR1)
    assert guard.wait(20) == 0
    assert node.sets() == CAP_THEN_RESTORE and node.limits_w() == {GPU_A: 700, GPU_B: 650}


def test_guard_restores_when_its_parent_dies(node: FakeNode, procs: list) -> None:
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        guard = subprocess.Popen(sys.argv[2:])
        open(sys.argv[1], "w").write(str(guard.pid))
        time.sleep(120)
    """)
    cmd = [sys.executable, "-m", entrypoints.POWERCAP_GUARD, "--cap-w", "250", "--uuid-dir", str(node.uuid_dir),
           "--ready-dir", str(node.ready_dir), "--state-dir", str(node.state_dir), "--node", "n0",
           "--expect-devices", "2"]
    pid_file = node.root / "guard.pid"
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(pid_file), *cmd], env=node.env(),
                              stdin=subprocess.DEVNULL)
    procs.append(parent)
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    assert wait_ready(node)["status"] == "applied"
    guard_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(20)
    try:
        wait_for(lambda: load_state(node.state_dir / "n0.json").restored, "the orphaned guard's restore")
        wait_for(lambda: not _running(guard_pid), "the orphaned guard to exit")
    finally:
        if _running(guard_pid):
            os.kill(guard_pid, signal.SIGKILL)
    assert node.sets() == CAP_THEN_RESTORE
    assert load_state(node.state_dir / "n0.json").restore_reason == "parent-exit"


def test_guard_restores_on_stdin_eof(node: FakeNode, procs: list) -> None:
    proc = applied_guard(node, procs, "--watch-stdin", stdin=subprocess.PIPE)
    proc.stdin.close()
    assert proc.wait(20) == 0
    assert node.sets() == CAP_THEN_RESTORE
    assert load_state(node.state_dir / "n0.json").restore_reason == "stdin-eof"


def test_guard_denied_changes_nothing(node: FakeNode, procs: list) -> None:
    node.update(deny_set=True)
    proc = start_guard(node, procs, "--on-denied", "skip")
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    ready = wait_ready(node, proc)
    assert proc.wait(20) == 0
    assert ready["status"] == "denied" and ready["on_denied"] == "skip" and "no permission" in ready["reason"]
    # the one refused attempt is all: nothing succeeded, nothing needed restoring
    assert node.sets() == [(GPU_A, 250, False)]
    assert node.limits_w() == {GPU_A: 700, GPU_B: 650}
    assert read_cap_report(node.state_dir)["status"] == "denied"


def test_cap_already_set_by_site_prolog_is_accepted_untouched(node: FakeNode, procs: list) -> None:
    # A root prolog capped the GPUs; this process may not set limits itself.
    node.write([fake_nvml.make_gpu(GPU_A, limit_w=250), fake_nvml.make_gpu(GPU_B, limit_w=250)], deny_set=True)
    proc = start_guard(node, procs)
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    ready = wait_ready(node, proc)
    assert ready["status"] == "applied" and [g["enforced_w"] for g in ready["gpus"]] == [250, 250]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert node.sets() == []  # nothing set, nothing restored: the site's epilog owns the restore
    report = read_cap_report(node.state_dir)
    assert report["restored"] and all(g["unchanged"] for g in report["gpus"])


def test_guard_sigkill_then_restore_command(node: FakeNode, procs: list) -> None:
    proc = applied_guard(node, procs)
    proc.send_signal(signal.SIGKILL)  # nothing in-process survives this ...
    proc.wait(20)
    assert node.limits_w() == {GPU_A: 250, GPU_B: 250}
    restore = [sys.executable, "-m", entrypoints.POWERCAP_GUARD, "--restore", "--state-dir", str(node.state_dir),
               "--node", "n0"]
    for _ in range(2):  # ... so the launcher or an epilog runs --restore; twice changes nothing more
        assert subprocess.run(restore, env=node.env(), timeout=60).returncode == 0
    assert node.sets() == CAP_THEN_RESTORE and load_state(node.state_dir / "n0.json").restored


def test_guard_with_fake_dcgm_sets_and_restores(node: FakeNode, procs: list) -> None:
    proc = applied_guard(node, procs, "--backend", "dcgm")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert node.sets() == CAP_THEN_RESTORE
    dcgm_sets = [c for c in node.calls() if c["fn"] == "dcgmConfigSet"]
    assert len(dcgm_sets) == 4 and all("not_blank" not in c["args"] for c in dcgm_sets)
    assert not any(c["fn"] == "nvmlDeviceSetPowerManagementLimit" for c in node.calls())


def test_guard_with_fake_dcgm_denied(node: FakeNode, procs: list) -> None:
    node.update(deny_set=True)
    proc = start_guard(node, procs, "--backend", "dcgm")
    node.write_uuid("n0", 0, GPU_A)
    node.write_uuid("n0", 1, GPU_B)
    ready = wait_ready(node, proc)
    assert proc.wait(20) == 0 and ready["status"] == "denied" and "root" in ready["reason"]
    assert node.sets() == [(GPU_A, 250, False)] and node.limits_w() == {GPU_A: 700, GPU_B: 650}


def test_cap_report_shows_throttle_time_and_restore(node: FakeNode, procs: list) -> None:
    proc = applied_guard(node, procs)
    data = json.loads(node.state_file.read_text())
    data["gpus"][0]["violation_ns"] = 4_000_000_000  # the cap bit on GPU A only
    node.write(data.pop("gpus"), **data)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(20) == 0
    report = read_cap_report(node.state_dir)
    assert report["status"] == "applied" and report["restored"] and report["cap_bit"] is True
    assert report["requested_w"] == 250
    assert [(g["uuid"], g["enforced_w"], g["restored_w"], g["power_cap_throttle_ns"]) for g in report["gpus"]] == [
        (GPU_A, 250, 700, 4_000_000_000), (GPU_B, 250, 650, 0)]
    assert read_cap_report(node.root / "absent")["status"] == "missing"


def test_guard_stopped_before_devices_changes_nothing(node: FakeNode, procs: list) -> None:
    proc = start_guard(node, procs)
    # stopped once it handles signals (its imports take > 1 s on a loaded machine), before any device
    wait_for(lambda: _catches(proc.pid, signal.SIGTERM), "the guard's signal handlers")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert json.loads((node.ready_dir / "n0.json").read_text())["status"] == "error"
    assert node.sets() == []


def test_main_requires_cap_unless_restoring(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        guard_main(["--state-dir", str(tmp_path)])
    assert guard_main(["--restore", "--state-dir", str(tmp_path), "--node", "nowhere"]) == PowerCapError.exit_code


def test_state_round_trips(tmp_path: Path) -> None:
    state = CapState(node="n", backend="nvml", requested_w=300, gpus=[powercap.GpuCap(
        uuid="u", previous_w=700, requested_w=300, min_w=200, max_w=700, default_w=700)],
        path=str(tmp_path / "n.json"))
    state.save()
    again = load_state(tmp_path / "n.json")
    assert again.to_json() == state.to_json() and again.gpus[0].uuid == "u"


def _catches(pid: int, sig: signal.Signals) -> bool:
    """True when process ``pid`` has a handler for ``sig`` (``SigCgt`` of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (int(sig) - 1) & 1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
