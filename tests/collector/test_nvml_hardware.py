"""NVML on real hardware (read-only). Runs on a GPU machine; skips elsewhere, saying why.

The raw-sample check below allows 3%: without interpolation the 100 ms counter
steps misalign the window ends. The 1% agreement over decode phases, with
interpolation, is measured by bench/gpu_cells.py.

On the lent H100s: `python -m pytest tests/collector/test_nvml_hardware.py`.
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
    from llmenergy.collector.nvml import NvmlBackend

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
    from llmenergy.collector.nvml import NvmlBackend

    with NvmlBackend() as backend:
        for d in backend.devices():
            energy_mj, power_w = backend.read_energy_and_power(d.index)
            counter_mj = backend.read_energy_mj(d.index)
            assert energy_mj is not None and power_w is not None and 10 < power_w < 1500
            # one ~100 ms counter update may fall between the two reads: at most ~150 J
            assert 0 <= counter_mj - energy_mj <= 150_000


def test_backend_watches_only_the_requested_uuid() -> None:
    from llmenergy.collector.nvml import NvmlBackend

    with NvmlBackend() as everything:
        uuids = [d.uuid for d in everything.devices()]
    with NvmlBackend(uuids=uuids[:1]) as one:
        assert [d.uuid for d in one.devices()] == uuids[:1]


def test_counter_energy_matches_integrated_instant_power_within_3pct_under_load() -> None:
    torch = pytest.importorskip("torch", reason="torch is needed to load the GPU")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from llmenergy.collector.nvml import NvmlBackend

    with NvmlBackend() as backend:
        dev = backend.devices()[0]
        a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.float16)
        samples = []
        e0 = backend.read_energy_mj(dev.index)
        t_end = time.monotonic() + 6.0
        while time.monotonic() < t_end:
            for _ in range(4):
                a = (a @ a).clamp_(-1, 1)
            samples.append((time.time_ns(), backend.read_power_w(dev.index), backend.read_energy_mj(dev.index)))
            time.sleep(0.02)
        torch.cuda.synchronize()
    # Compare over the span between the first and last counter change, integrating instant power.
    ts = [s[0] / 1e9 for s in samples]
    integral_j = sum((ts[i + 1] - ts[i]) * (samples[i][1] + samples[i + 1][1]) / 2 for i in range(len(ts) - 1))
    counter_j = (samples[-1][2] - samples[0][2]) / 1000
    assert e0 is not None and counter_j > 0
    assert abs(integral_j - counter_j) / counter_j < 0.03, (integral_j, counter_j)
