"""Collector overhead on decode throughput, measured inside one process.

    python bench/collector_overhead.py --arch llama-7b --batch 16 --gen 256 --rounds 5 --out OUT.json

The model is built once and one real collector process (``llmenergy.power.collector``,
NVML) watches this GPU per poll rate.  Rounds alternate "collector off" (the
process stopped with SIGSTOP, so it makes no NVML call and uses no CPU) and
"collector on" (SIGCONT), swapping the order every round (ABBA) so drift does
not favour one side; each side of a round is ``--reps`` generations.  Reports,
per instant-power poll rate, the median tokens/s of each side, the overhead of
the medians and the median of the paired (same-round) differences.  With
``--pin`` the worker is pinned to one CPU and the collector to another.
Read-only on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmenergy import entrypoints


def _collector(tmp: Path, uuid: str, power_interval_ms: int) -> subprocess.Popen[bytes]:
    node = socket.gethostname()
    for d in ("uuids", "ready", "power"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "uuids" / f"{node}.0.json").write_text(json.dumps({"node": node, "rank": 0, "uuid": uuid}))
    for f in (tmp / "ready").glob("*"):
        f.unlink()
    proc = subprocess.Popen([sys.executable, "-m", entrypoints.COLLECTOR, "--backend", "nvml",
                             "--interval-ms", "100", "--power-interval-ms", str(power_interval_ms),
                             "--out", str(tmp / "power"), "--node", node, "--uuid-dir", str(tmp / "uuids"),
                             "--ready-dir", str(tmp / "ready"), "--expect-devices", "1"])
    deadline = time.monotonic() + 60
    while not list((tmp / "ready").glob("*.json")):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("collector did not become ready")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--poll-ms", type=int, nargs="+", default=[20, 40])
    p.add_argument("--reps", type=int, default=1, help="generations per side of a round")
    p.add_argument("--pin", action="store_true", help="pin worker and collector to separate CPUs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from _single_gpu import build, init_rank

    from llmenergy.inference import generate
    from llmenergy.power.collector import merge_node_files

    dev, uuid = init_rank(29533)
    model, prompts = build(args.arch, args.batch, args.prompt, args.gen, dev)

    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0]})

    def tok_s() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(args.reps):
            tokens += generate.generate(model, prompts, args.gen, eos_id=None, stop_at_eos=False).tokens_out
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t0)

    tok_s()  # warm-up
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "arch": args.arch, "batch": args.batch,
                              "gen": args.gen, "rounds": args.rounds, "reps": args.reps, "pinned": args.pin,
                              "by_poll_ms": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        for poll in args.poll_ms:
            proc = _collector(Path(tmpdir) / f"p{poll}", uuid, poll)
            if args.pin and len(cpus) >= 2:
                os.sched_setaffinity(proc.pid, {cpus[1]})
            proc.send_signal(signal.SIGSTOP)
            runs: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    proc.send_signal(signal.SIGCONT if mode == "on" else signal.SIGSTOP)
                    runs[mode].append(tok_s())
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGUSR1)
            proc.wait(timeout=30)
            off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
            paired = [(a - b) / a * 100 for a, b in zip(runs["off"], runs["on"])]
            samples = merge_node_files(Path(tmpdir) / f"p{poll}" / "power").num_rows
            result["by_poll_ms"][poll] = {"runs": runs, "median_off": off, "median_on": on,
                                          "overhead_pct": (off - on) / off * 100,
                                          "paired_overhead_pct_median": statistics.median(paired),
                                          "collector_rows": samples}
            print(json.dumps({poll: result["by_poll_ms"][poll]}), flush=True)
    args.out.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
