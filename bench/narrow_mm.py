"""Weight-only int8/fp8 linear layers on one GPU: fp16, the naive compiled dequant, narrow_mm.

    python bench/narrow_mm.py --out bench/results/h200_narrow_mm.json

For the 7B LLaMA projections (N, K) = (12288, 4096) qkv, (4096, 4096) wo,
(22016, 4096) gate/up, (4096, 11008) w2 and batches M in ``--batches`` (1 16 64), times:

- ``fp16``: ``F.linear(x, w16)`` (cuBLAS);
- ``naive_int8`` / ``naive_fp8``: ``F.linear(x, q.to(fp16)) * scale`` under ``torch.compile``
  (what the compiled engine's ``NarrowLinear`` does);
- ``int8`` / ``fp8``: :func:`llmenergy.inference.narrow_mm.narrow_mm`.

Each variant is captured in a CUDA graph of ``--graph-calls`` back-to-back calls (no
launch overhead); the calls cycle through enough copies of the weight to hold at least
``--rotate-mb`` (more than the 60 MB L2 of an H200), so every call reads its weight from
HBM.  The time of one call is the median over ``--iters`` timed replays (CUDA events,
after warm-up) divided by the calls per graph.  Reported per row: microseconds, GB/s of
weight bytes (weight + scale), the fraction of ``--bandwidth-gbs`` (H200 datasheet 4800),
the speed-up over fp16, and the largest error relative to the output's RMS against the
dequantised fp16 layer (a sanity check, not a numerics test).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmenergy.inference import narrow_mm as nm  # noqa: E402
from llmenergy.inference.narrow_mm import time_graph  # noqa: E402,F401  (gemv_sweep.py imports it here)
from llmenergy.inference.quant import quantize  # noqa: E402

log = logging.getLogger("bench.narrow_mm")

SHAPES = {"qkv": (12288, 4096), "wo": (4096, 4096), "gate_up": (22016, 4096), "w2": (4096, 11008)}
VARIANTS = ("fp16", "naive_int8", "naive_fp8", "int8", "fp8")


def weight_bytes(variant: str, n: int, k: int) -> int:
    """Bytes one call must read from the weight: the matrix plus an fp16 scale per channel."""
    return n * k * 2 if variant == "fp16" else n * k + n * 2


def copies_for(nbytes: int, rotate_mb: float) -> int:
    """Weight copies so that one pass over them holds at least ``rotate_mb`` MB (>= 1)."""
    return max(1, math.ceil(rotate_mb * 1e6 / nbytes))


def row(variant: str, shape: str, n: int, k: int, m: int, us: float, fp16_us: float | None,
        bandwidth_gbs: float, err: float | None) -> dict[str, Any]:
    gbs = weight_bytes(variant, n, k) / (us * 1e-6) / 1e9
    return {"variant": variant, "shape": shape, "N": n, "K": k, "M": m, "us": us,
            "weight_gbs": gbs, "bandwidth_fraction": gbs / bandwidth_gbs,
            "speedup_vs_fp16": (fp16_us / us) if fp16_us else None, "max_rel_err": err}


def bench_shape(shape: str, n: int, k: int, args: argparse.Namespace,
                naive: Callable[..., torch.Tensor]) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    w16 = (torch.randn(n, k, device=dev, generator=g) * k ** -0.5).half()
    narrow = {p: quantize(w16, p) for p in ("int8", "fp8")}
    narrow = {p: (q, s.half()) for p, (q, s) in narrow.items()}
    rows: list[dict[str, Any]] = []
    for m in args.batches:
        x = torch.randn(m, k, device=dev, generator=g).half()
        fp16_us = None
        for variant in VARIANTS:
            prec = variant.removeprefix("naive_")
            copies = copies_for(weight_bytes(variant, n, k), args.rotate_mb)
            if variant == "fp16":
                ws = [w16] + [w16.clone() for _ in range(copies - 1)]
                fn: Callable[..., torch.Tensor] = lambda x, w: F.linear(x, w)  # noqa: E731
            else:
                q, s = narrow[prec]
                ws = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies - 1)]
                fn = naive if variant.startswith("naive") else nm.narrow_mm
            calls = [(lambda w=ws[i % copies]: fn(x, *w) if isinstance(w, tuple) else fn(x, w))
                     for i in range(max(args.graph_calls, copies))]
            us = time_graph(calls, args.iters)
            err = None
            if variant != "fp16":
                want = nm.reference(x, q, s).float()
                got = calls[0]().float()
                err = float((got - want).abs().max() / want.pow(2).mean().sqrt())
            fp16_us = us if variant == "fp16" else fp16_us
            rows.append(row(variant, shape, n, k, m, us, fp16_us, args.bandwidth_gbs, err))
            del ws, calls
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'shape':8} {'M':>3} {'variant':11} {'us':>8} {'GB/s':>7} {'of bw':>6} {'x fp16':>6} {'err':>8}"
    lines = [head]
    for r in rows:
        sp = f"{r['speedup_vs_fp16']:.2f}" if r["speedup_vs_fp16"] else "-"
        err = f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else "-"
        lines.append(f"{r['shape']:8} {r['M']:>3} {r['variant']:11} {r['us']:8.1f} "
                     f"{r['weight_gbs']:7.0f} {r['bandwidth_fraction']:6.2f} {sp:>6} {err:>8}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--iters", type=int, default=50, help="timed graph replays (>= 50)")
    p.add_argument("--graph-calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="weight bytes cycled per graph")
    p.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="HBM bandwidth, GB/s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if not torch.cuda.is_available():
        log.error("bench/narrow_mm.py needs a CUDA device")
        return 2
    # one compiled graph per (shape, batch, weight dtype): more than dynamo's default 8
    torch._dynamo.config.recompile_limit = 256
    naive = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s, dynamic=False)
    rows = [r for name in args.shapes for r in bench_shape(name, *SHAPES[name], args, naive)]
    log.info("%s", table(rows))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": getattr(nm.triton, "__version__", None), "python": platform.python_version(),
            "small_m": nm.SMALL_M, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
