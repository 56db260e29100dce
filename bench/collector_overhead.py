"""Collector overhead on decode throughput, measured inside one process.

    python bench/collector_overhead.py --arch llama-7b --batch 16 --gen 256 --rounds 5 --out OUT.json

The model is built once; rounds alternate "collector off" and "collector on"
(the real `llmenergy collect` process watching this GPU), swapping the order
every round so drift does not favour one side. Reports the median tokens/s of
each side, per instant-power poll rate. Read-only on the GPU.
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


def _collector(tmp: Path, uuid: str, power_interval_ms: int) -> subprocess.Popen[bytes]:
    node = socket.gethostname()
    for d in ("uuids", "ready", "power"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "uuids" / f"{node}.0.json").write_text(json.dumps({"node": node, "rank": 0, "uuid": uuid}))
    for f in (tmp / "ready").glob("*"):
        f.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "llmenergy.collector.process", "--backend", "nvml",
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
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from llmenergy import generate, tp, weights

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    tp.init_model_parallel(1)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    model, _ = weights.build(args.arch, "synthetic", device=dev, dtype=torch.float16, seed=0,
                             max_batch_size=args.batch, max_seq_len=args.prompt + args.gen)
    uuid = str(torch.cuda.get_device_properties(dev).uuid)
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]

    def tok_s() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate.generate(model, prompts, args.gen, eos_id=None, stop_at_eos=False)
        torch.cuda.synchronize()
        return res.tokens_out / (time.perf_counter() - t0)

    tok_s()  # warm-up
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "arch": args.arch, "batch": args.batch,
                              "gen": args.gen, "rounds": args.rounds, "by_poll_ms": {}}
    with tempfile.TemporaryDirectory() as tmpdir:
        for poll in args.poll_ms:
            runs: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    proc = _collector(Path(tmpdir) / f"p{poll}r{r}", uuid, poll) if mode == "on" else None
                    runs[mode].append(tok_s())
                    if proc is not None:
                        proc.send_signal(signal.SIGUSR1)
                        proc.wait(timeout=30)
            off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
            result["by_poll_ms"][poll] = {"runs": runs, "median_off": off, "median_on": on,
                                          "overhead_pct": (off - on) / off * 100}
            print(json.dumps({poll: result["by_poll_ms"][poll]}), flush=True)
    args.out.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
