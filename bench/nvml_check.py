#!/usr/bin/env python3
"""Read-only NVML power check for a real GPU machine.

For each GPU: sample the total-energy counter (mJ) and instant power (NVML
field 186, ``NVML_FI_DEV_POWER_INSTANT``) at ~``--hz`` for ``--seconds`` idle,
then (with ``--load matmul``) as long again under a torch matmul load.  Reports
per phase: how often the counter changes, counter energy vs the trapezoid
integral of instant power (and of ``nvmlDeviceGetPowerUsage``) in percent, mean
power, the sampling rate achieved, and the idle power.

It only *reads*: no clocks, limits, modes or persistence are touched.

    python bench/nvml_check.py out.json --seconds 10 --load matmul
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from typing import Any

import pynvml

FI_POWER_INSTANT = 186


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_instant_mw(handle: Any) -> float | None:
    [field] = pynvml.nvmlDeviceGetFieldValues(handle, [FI_POWER_INSTANT])
    if field.nvmlReturn != 0:
        return None
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(field.value, member[field.valueType]))


def sample_phase(handles: list[Any], seconds: float, hz: float) -> list[list[tuple[int, float, float | None, float]]]:
    """Per GPU, a list of (t_ns, energy_mj, instant_w, usage_w) read at ~hz."""
    period_ns = int(1e9 / hz)
    series: list[list[tuple[int, float, float | None, float]]] = [[] for _ in handles]
    start = time.monotonic_ns()
    next_ns = start
    while True:
        now = time.monotonic_ns()
        if now - start >= seconds * 1e9:
            break
        for i, handle in enumerate(handles):
            t = time.monotonic_ns()
            energy = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            instant = read_instant_mw(handle)
            usage = float(pynvml.nvmlDeviceGetPowerUsage(handle))
            series[i].append((t, energy, None if instant is None else instant / 1000.0, usage / 1000.0))
        next_ns += period_ns
        delay = next_ns - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        else:
            next_ns = time.monotonic_ns()
    return series


def trapezoid_j(times_ns: list[int], watts: list[float]) -> float:
    return sum((t1 - t0) / 1e9 * (w0 + w1) / 2
               for t0, t1, w0, w1 in zip(times_ns, times_ns[1:], watts, watts[1:]))


def analyse(points: list[tuple[int, float, float | None, float]]) -> dict[str, Any]:
    times = [p[0] for p in points]
    energy = [p[1] for p in points]
    changes = [i for i in range(1, len(points)) if energy[i] != energy[i - 1]]
    change_gaps_ms = [(times[b] - times[a]) / 1e6 for a, b in zip(changes, changes[1:])]
    out: dict[str, Any] = {
        "samples": len(points),
        "rate_hz": (len(points) - 1) / ((times[-1] - times[0]) / 1e9) if len(points) > 1 else None,
        "counter_changes": len(changes),
        "counter_update_interval_ms_median": statistics.median(change_gaps_ms) if change_gaps_ms else None,
        "counter_update_interval_ms_p90": (sorted(change_gaps_ms)[int(0.9 * (len(change_gaps_ms) - 1))]
                                           if change_gaps_ms else None),
    }
    if len(changes) < 2:
        out["note"] = "counter changed fewer than twice; no comparison"
        return out
    # Window between the first and the last observed counter change, so both
    # ends of the counter difference are fresh readings.
    a, b = changes[0], changes[-1]
    window_s = (times[b] - times[a]) / 1e9
    counter_j = (energy[b] - energy[a]) / 1000.0
    usage_j = trapezoid_j(times[a:b + 1], [p[3] for p in points[a:b + 1]])
    out.update({
        "window_s": window_s,
        "counter_energy_j": counter_j,
        "counter_mean_power_w": counter_j / window_s,
        "power_usage_integral_j": usage_j,
        "power_usage_vs_counter_pct": 100.0 * (usage_j - counter_j) / counter_j if counter_j else None,
    })
    instant = [p[2] for p in points[a:b + 1]]
    if all(w is not None for w in instant):
        instant_j = trapezoid_j(times[a:b + 1], instant)  # type: ignore[arg-type]
        out.update({
            "instant_integral_j": instant_j,
            "instant_vs_counter_pct": 100.0 * (instant_j - counter_j) / counter_j if counter_j else None,
            "instant_mean_power_w": instant_j / window_s,
        })
    else:
        out["note"] = "field 186 (instant power) not supported"
    return out


def matmul_load(device_index: int, stop: Any, size: int) -> None:
    """Runs in its own process so the sampler never waits for the GIL."""
    import torch

    device = torch.device("cuda", device_index)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(4):
            a @ b
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON output path")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--load", choices=["none", "matmul"], default="none")
    parser.add_argument("--size", type=int, default=8192, help="matmul size")
    parser.add_argument("--gpus", type=int, nargs="*", help="NVML indices (default all)")
    parser.add_argument("--ramp-s", type=float, default=8.0, help="load start-up before measuring")
    args = parser.parse_args(argv)

    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        indices = args.gpus if args.gpus else list(range(count))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        gpus = [{"index": i, "uuid": _text(pynvml.nvmlDeviceGetUUID(h)), "name": _text(pynvml.nvmlDeviceGetName(h)),
                 "enforced_power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0}
                for i, h in zip(indices, handles)]
        report: dict[str, Any] = {
            "host": platform.node(),
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "hz_requested": args.hz,
            "seconds_per_phase": args.seconds,
            "gpus": gpus,
            "phases": {},
        }
        phases = [("idle", False)] + ([("matmul", True)] if args.load == "matmul" else [])
        for phase, loaded in phases:
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            workers = []
            if loaded:
                # torch's device i is assumed to be NVML index i (no CUDA_VISIBLE_DEVICES remap).
                workers = [ctx.Process(target=matmul_load, args=(i, stop, args.size), daemon=True)
                           for i in indices]
                for w in workers:
                    w.start()
                time.sleep(args.ramp_s)  # start-up and ramp before measuring
            series = sample_phase(handles, args.seconds, args.hz)
            stop.set()
            for w in workers:
                w.join()
            report["phases"][phase] = [{"index": g["index"], **analyse(s)} for g, s in zip(gpus, series)]
        for g, idle in zip(gpus, report["phases"]["idle"]):
            g["idle_power_w"] = idle.get("instant_mean_power_w", idle.get("counter_mean_power_w"))
    finally:
        pynvml.nvmlShutdown()
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))  # a CLI script: the report is its output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
