#!/usr/bin/env python3
"""Raw NVML power trace under a real decode load, for studying the sensors.

A separate process polls one GPU every ``--poll-ms`` (default 2 ms) for the
energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ) and, in one
``nvmlDeviceGetFieldValues`` call, fields 83 (total energy, mJ), 186 (instant
power, mW) and 185 (average power, mW) with the driver's own timestamps.
Meanwhile this process idles, builds the 7B-shaped model with synthetic
weights, runs ``--batches`` greedy generations and idles again; the decode
windows are recorded.  Everything goes to one ``.npz`` for offline analysis
(``bench/nvml_probe_analyse.py``).  Read-only on the GPU.

    python bench/nvml_probe.py --out OUT.npz --batch 16 --gen 256 --batches 4
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

FIELDS = (83, 186, 185)  # total energy (mJ), instant power (mW), average power (mW)


def _value(field) -> float:  # noqa: ANN001 - pynvml's ctypes struct
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    if field.nvmlReturn != 0:
        return float("nan")
    return float(getattr(field.value, member[field.valueType]))


def poll(uuid: str, poll_ms: float, stop, out: str) -> None:  # noqa: ANN001 - mp.Event
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    rows: list[tuple[float, ...]] = []
    period = poll_ms / 1000.0
    nxt = time.monotonic()
    while not stop.is_set():
        t0 = time.time_ns()
        counter = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        t1 = time.time_ns()
        fields = pynvml.nvmlDeviceGetFieldValues(handle, list(FIELDS))
        t2 = time.time_ns()
        rows.append((t0, counter, t1, t2, *(_value(f) for f in fields), *(float(f.timestamp) for f in fields)))
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()
    pynvml.nvmlShutdown()
    cols = ["t0_ns", "counter_mj", "t1_ns", "t2_ns", "f83_mj", "f186_mw", "f185_mw",
            "f83_ts_us", "f186_ts_us", "f185_ts_us"]
    arr = np.array(rows, dtype=np.float64)
    np.savez(out, **{c: arr[:, i] for i, c in enumerate(cols)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--idle-s", type=float, default=4.0)
    p.add_argument("--poll-ms", type=float, default=2.0)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from _single_gpu import build, init_rank

    from llmenergy.inference import generate

    dev, uuid = init_rank(29537)

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    trace = str(args.out.with_suffix(".trace.npz"))
    poller = ctx.Process(target=poll, args=(uuid, args.poll_ms, stop, trace))
    poller.start()
    windows: list[tuple[str, int, int]] = []
    time.sleep(1.0)
    t = time.time_ns()
    time.sleep(args.idle_s)
    windows.append(("idle", t, time.time_ns()))
    t = time.time_ns()
    model, prompts = build(args.arch, args.batch, args.prompt, args.gen, dev)
    torch.cuda.synchronize()
    windows.append(("load", t, time.time_ns()))
    for _ in range(args.batches):
        generate.generate(model, prompts, args.gen, eos_id=None, stop_at_eos=False,
                          on_phase=lambda ph, a, b: windows.append((ph, a, b)))
    t = time.time_ns()
    time.sleep(args.idle_s)
    windows.append(("idle_after", t, time.time_ns()))
    stop.set()
    poller.join(timeout=60)
    np.savez(args.out, phase=np.array([w[0] for w in windows]),
             start_ns=np.array([w[1] for w in windows], dtype=np.int64),
             end_ns=np.array([w[2] for w in windows], dtype=np.int64),
             device=np.array([torch.cuda.get_device_name(dev)]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
