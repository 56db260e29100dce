"""NVML on real hardware (read-only). Runs on a GPU machine; skips elsewhere, saying why.

The load check below allows 3% over one 8 s window of a matmul load near the
power limit: both the counter and instant power update every ~100 ms on H100,
and instant power samples a fluctuating load.  The 1% agreement over a cell's
decode phase is measured by bench/gpu_cells.py.

On the lent H100s: `python -m pytest tests/power/test_nvml_hardware.py`.
"""
from __future__ import annotations

import time

import pytest

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")


def _nvml_ok() -> str | None:
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means no GPU here
        return f"NVML cannot start here ({type(exc).__name__}): no NVIDIA driver/GPU on this machine"
    n = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    return None if n else "NVML reports no GPU"


_WHY = _nvml_ok()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def test_backend_reads_counter_and_instant_power_of_every_gpu() -> None:
    from llmenergy.power.backends.nvml import NvmlBackend

    with NvmlBackend() as backend:
        devices = backend.devices()
        assert devices and all(d.uuid.startswith("GPU-") for d in devices)
        first = {d.index: backend.read_energy_mj(d.index) for d in devices}
        time.sleep(0.5)
        for d in devices:
            later = backend.read_energy_mj(d.index)
            assert later is not None and later >= first[d.index]
            power_w = backend.read_power_w(d.index)
            assert power_w is not None and 10 < power_w < 1500
        rows = backend.sample(time.time_ns())
        assert {r["device"] for r in rows} == {d.uuid for d in devices}
        assert all(r["source"] == "nvml" and r["power_limit_w"] for r in rows)


def test_energy_field_and_counter_function_read_the_same_counter() -> None:
    from llmenergy.power.backends.nvml import NvmlBackend

    with NvmlBackend() as backend:
        for d in backend.devices():
            energy_mj, power_w = backend.read_energy_and_power(d.index)
            counter_mj = backend.read_energy_mj(d.index)
            assert energy_mj is not None and power_w is not None and 10 < power_w < 1500
            # one ~100 ms counter update may fall between the two reads: at most ~150 J
            assert 0 <= counter_mj - energy_mj <= 150_000


def test_backend_watches_only_the_requested_uuid() -> None:
    from llmenergy.power.backends.nvml import NvmlBackend

    with NvmlBackend() as everything:
        uuids = [d.uuid for d in everything.devices()]
    with NvmlBackend(uuid_list=uuids[:1]) as one:
        assert [d.uuid for d in one.devices()] == uuids[:1]


def test_counter_energy_matches_integrated_instant_power_within_3pct_under_load() -> None:
    """A steady matmul load (a thread keeps the GPU busy) sampled at 25 Hz as the
    collector does; the attribution code compares counter and instant power over
    an 8 s window.  (A pulsed load aliases with the 100 ms sensor updates.)"""
    torch = pytest.importorskip("torch", reason="torch is needed to load the GPU")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import threading

    import pandas as pd

    from llmenergy.analysis.energy import attribute_events
    from llmenergy.power.backends.nvml import NvmlBackend

    stop = threading.Event()

    def load() -> None:
        a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.float16)
        while not stop.is_set():
            for _ in range(16):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()

    with NvmlBackend() as backend:
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(1.0)
        rows = []
        t_end = time.monotonic() + 9.0
        while time.monotonic() < t_end:
            rows.extend(backend.sample_power(time.time_ns()))
            time.sleep(0.04)
        stop.set()
        worker.join(timeout=30)
    power = pd.DataFrame(rows)
    power = power[power["device_index"] == power["device_index"].iloc[0]]
    t0 = int(power["timestamp_ns"].min())
    events = pd.DataFrame({"phase": ["load"], "start_ns": [t0 + 500_000_000], "end_ns": [t0 + 8_500_000_000]})
    [row] = attribute_events(events, power).to_dict("records")
    assert row["energy_j"] > 8 * 100  # the GPU is busy: well above 100 W
    assert abs(row["energy_discrepancy_pct"]) < 3, row


def test_a_child_holding_its_own_context_is_the_jobs_and_the_compile_workers_are_listed() -> None:
    """A child of this process (the rank) makes a CUDA context of its own on GPU 0: NVML lists it,
    and with this process as the rank it is not another process. Then torch.compile with a
    worker pool; what NVML lists is printed (``-rP``): whether Inductor's workers hold contexts."""
    torch = pytest.importorskip("torch", reason="torch is needed to make a CUDA context")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llmenergy.power.backends import nvml_lib
    from llmenergy.power.backends.nvml import NvmlBackend
    from llmenergy.power.processes import is_own

    child = subprocess.Popen([sys.executable, "-c", "import time, torch; torch.ones(1, device='cuda:0').sum().item(); "
                              "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        torch.ones(1, device="cuda:0").sum().item()
        with torch._inductor.config.patch(compile_threads=4):  # the worker pool, as on a node with cores to spare
            f = torch.compile(lambda x: (x.sin() + x.cos()).relu().sum())
            f(torch.randn(4096, device="cuda:0")).item()
        with NvmlBackend() as backend:
            handle = nvml_lib.pynvml.nvmlDeviceGetHandleByIndex(0)
            pids = [p.pid for p in nvml_lib.pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            own = {os.getpid()}
            print(f"NVML lists on GPU 0: {pids}; this process {os.getpid()}, the child {child.pid}; "
                  f"other descendants among them (compile workers): "
                  f"{[p for p in pids if p not in (os.getpid(), child.pid) and is_own(p, own)]}")
            if not any(Path(f"/proc/{p}").exists() for p in pids):
                pytest.skip(f"NVML lists {pids}, none in this /proc (another PID namespace): ancestry cannot be read")
            assert {os.getpid(), child.pid} <= set(pids), "a context of this process or its child is not listed"
            backend.own_pids = frozenset(own)
            rows = {r["device_index"]: r for r in backend.sample(time.time_ns())}
        assert rows[0]["other_processes"] == 0, f"counted as other: {pids}"
    finally:
        child.kill()
        child.wait()
