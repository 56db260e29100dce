"""Sweep narrow_mm's block configs for a decode step's rows (1: the GEMV; 16: tl.dot) on one GPU.

    python bench/gemv_sweep.py --out bench/results/h200_gemv_sweep.json --rows 1 16

Why: at batch 1 the int8 GEMV reached 1.8-2.6 TB/s on the 7B shapes where cuBLAS reads
fp16 at 2.5-4.0 (bench/results/session8/h200_narrow_mm.json), and int8/fp8 decode was
1.30x/1.33x fp16 (issue 24 wants 1.5x).  fp8 (hardware conversion) was barely faster
than int8 (bit-trick conversion), so the conversion is not what limits it; the suspect is
bytes in flight per SM (each program loads one [BLOCK_N, BLOCK_K] tile, then waits).

What it times, for each config (BLOCK_N, BLOCK_K, warps, stages; BLOCK_M for 16 rows), on
the four projections of a 7B layer (qkv, wo, gate_up, w2) with int8 weights: microseconds per call from a CUDA graph cycling
through enough weight copies to miss the 60-MB L2 (``bench/narrow_mm.py``'s
``time_graph``), GB/s, and the error against the PyTorch expression.  Then the best
``--fp8-top`` configs again with e4m3 weights.  Baselines in the same process: cuBLAS on
the fp16 weight and the current table (``narrow_mm._config``).  The sweep stops taking new
configs after ``--budget-s`` seconds.  A config that fails to compile or gives a wrong
result is reported, not used.

Session 10's first sweep (bench/results/session10/sweep, one H200) found 4 x 1024 with 4
warps at 69 us per layer against the table's 81 and cuBLAS fp16's 113; two other forms of
the GEMV it tried (commit 6ed0ded: a register prefetch of the next tile, 71-76 us at best;
a [BLOCK_N] accumulator reduced per tile, 86 us at best) lost and were taken out.  This
space is the neighbourhood of the winner, and the 16-row GEMM's.

Session 11 changed the GEMV's tile to [BLOCK_N, BLOCK_K / VEC, VEC] (products summed per
thread in registers; ``VEC`` and ``ASM``, the PTX int8 conversion, are its new parameters;
a prefetch of the next tile, ``AHEAD`` in that sweep, lost everywhere and is out); session
10's kernel is kept here as a baseline, timed in the same process (``session10``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from narrow_mm import SHAPES, copies_for, time_graph  # noqa: E402  (bench/narrow_mm.py)

from llmenergy.inference import narrow_mm as nm  # noqa: E402
from llmenergy.inference.quant import quantize  # noqa: E402

log = logging.getLogger("bench.gemv_sweep")

#: largest error against the PyTorch expression, relative to the output's RMS, still right
MAX_REL_ERR = 1e-2


def configs(rows: int) -> list[dict[str, Any]]:
    """The sweep space for ``rows`` rows of x (most likely first: the budget may cut the tail)."""
    if rows == 1:
        main = [{"BLOCK_N": bn, "BLOCK_K": bk, "VEC": 8, "ASM": 1, "num_warps": w, "num_stages": 1}
                for bn, bk, w in itertools.product((4, 2, 8), (1024, 512, 2048), (4, 2, 8))]
        other = [{"BLOCK_N": bn, "BLOCK_K": 1024, "VEC": vec, "ASM": asm, "num_warps": w,
                  "num_stages": 1}
                 for bn, w in ((4, 4), (2, 2), (4, 2)) for vec, asm in ((8, 0), (16, 1))]
        return main + other
    return [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
            for bn, bk, w, st in itertools.product((32, 16, 64), (512, 256, 128), (4, 8), (3, 2, 4))]


def wide_configs() -> list[dict[str, Any]]:
    """The one-row space for 16-bit weights (``--wide``): one stage first, then two and three."""
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "VEC": 8, "ASM": 0, "num_warps": w, "num_stages": st}
            for st, bn, bk, w in itertools.product((1, 2, 3), (4, 2, 8, 1), (1024, 512, 2048),
                                                   (4, 2, 8))]


def load_configs() -> list[dict[str, Any]]:
    """Session 14's one-row space (``--space load``): the weight loads' cache policy
    (``LOAD``), 16 bytes a thread over longer K tiles, one or two stages."""
    shapes = [(2, 1024, 16, 2), (2, 1024, 8, 2), (4, 1024, 8, 4), (4, 1024, 8, 8),
              (2, 2048, 16, 2), (2, 2048, 16, 4), (1, 2048, 16, 2), (4, 2048, 16, 4),
              (1, 1024, 16, 1), (1, 1024, 8, 1)]
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "VEC": vec, "ASM": 1, "LOAD": load, "num_warps": w,
             "num_stages": st}
            for st, load, (bn, bk, vec, w) in itertools.product((1, 2), (0, 1, 2), shapes)]


def key(cfg: dict[str, Any]) -> str:
    m = f"m{cfg['BLOCK_M']}_" if "BLOCK_M" in cfg else ""
    gemv = f"_v{cfg['VEC']}_asm{cfg['ASM']}" if "VEC" in cfg else ""
    gemv += f"_l{cfg['LOAD']}" if cfg.get("LOAD") else ""
    return f"{m}n{cfg['BLOCK_N']}_k{cfg['BLOCK_K']}_w{cfg['num_warps']}_s{cfg['num_stages']}{gemv}"


if nm.triton is not None:
    tl = nm.tl

    @nm.triton.jit
    def _session10_gemv(x_ptr, q_ptr, s_ptr, out_ptr, N, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Session 10's GEMV (a [BLOCK_N, BLOCK_K] fp32 accumulator, x through shared memory),
        kept here as the baseline the new kernel is timed against in the same process."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K
            xv = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(q_ptr + rn[:, None] * K + kk[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if w.dtype == tl.int8:
                acc += nm._int8_f32(w) * xv[None, :]
            else:
                acc += w.to(tl.float32) * xv[None, :]
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def session10(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Session 10's table config (4 x 1024, 4 warps) of its kernel, one row."""
    _session10_gemv[(nm.triton.cdiv(q.shape[0], 4),)](x, q, scale, out, q.shape[0], q.shape[1],
                                                      BLOCK_N=4, BLOCK_K=1024, num_warps=4,
                                                      num_stages=1)


class Shape:
    """One projection's weights (rotated copies) for one weight dtype, and its input row."""

    def __init__(self, name: str, precision: str, rotate_mb: float, rows: int) -> None:
        n, k = SHAPES[name]
        dev = torch.device("cuda")
        g = torch.Generator(dev).manual_seed(0)
        self.name, self.n, self.k = name, n, k
        w16 = (torch.randn(n, k, device=dev, generator=g) * k ** -0.5).half()
        # "fp16": the 16-bit weight itself through the same kernel (scale 1), against cuBLAS
        q, s = (w16, torch.ones(n, device=dev)) if precision == "fp16" else quantize(w16, precision)
        self.nbytes = n * k * q.element_size() + 2 * n
        copies = copies_for(self.nbytes, rotate_mb)
        self.ws = [(q, s.half())] + [(q.clone(), s.half().clone()) for _ in range(copies - 1)]
        self.x = torch.randn(rows, k, device=dev, generator=g).half()
        self.out = torch.empty((rows, n), device=dev, dtype=torch.float16)
        self.want = nm.reference(self.x, q, s.half()).float()
        self.w16 = w16 if precision in ("int8", "fp16") else None

    def time(self, cfg: dict[str, Any] | str | None, iters: int,
             graph_calls: int) -> tuple[float, float]:
        """(median us per call, error of the first call relative to the output's RMS);
        ``cfg`` None: the table, ``"session10"``: session 10's kernel."""
        def call(w: tuple[torch.Tensor, torch.Tensor]) -> None:
            if cfg == "session10":
                session10(self.x, w[0], w[1], self.out)
            else:
                nm.launch(self.x, w[0], w[1], self.out, config=cfg)
        calls = [(lambda w=self.ws[i % len(self.ws)]: call(w))
                 for i in range(max(graph_calls, len(self.ws)))]
        us = time_graph(calls, iters)
        calls[0]()
        torch.cuda.synchronize()
        err = float((self.out.float() - self.want).abs().max() / self.want.pow(2).mean().sqrt())
        return us, err

    def time_fp16(self, iters: int, graph_calls: int, rotate_mb: float) -> float:
        copies = copies_for(self.n * self.k * 2, rotate_mb)
        ws = [self.w16] + [self.w16.clone() for _ in range(copies - 1)]
        calls = [(lambda w=ws[i % copies]: F.linear(self.x, w)) for i in range(max(graph_calls, copies))]
        return time_graph(calls, iters)


def sweep(shapes: list[Shape], cfgs: list[dict[str, Any] | None], args: argparse.Namespace,
          deadline: float, label: str) -> list[dict[str, Any]]:
    rows = []
    for cfg in cfgs:
        if cfg is not None and time.monotonic() > deadline:
            log.info("%s: budget spent, %d config(s) not tried", label, len(cfgs) - len(rows))
            break
        name = "table" if cfg is None else cfg if isinstance(cfg, str) else key(cfg)
        row: dict[str, Any] = {"precision": label, "config": name, "params": cfg, "us": {}, "err": {}}
        try:
            for sh in shapes:
                us, err = sh.time(cfg, args.iters, args.graph_calls)
                row["us"][sh.name], row["err"][sh.name] = us, err
        except Exception as exc:  # noqa: BLE001 - out of resources, compile errors: report, go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.info("%s %s: %s", label, name, row["error"])
            rows.append(row)
            continue
        row["layer_us"] = sum(row["us"].values())
        row["layer_gbs"] = sum(sh.nbytes for sh in shapes) / (row["layer_us"] * 1e-6) / 1e9
        row["ok"] = max(row["err"].values()) <= MAX_REL_ERR
        log.info("%s %-34s layer %6.1f us %6.0f GB/s %s", label, name, row["layer_us"],
                 row["layer_gbs"], " ".join(f"{s}={u:.1f}" for s, u in row["us"].items()))
        rows.append(row)
    return rows


def best(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    good = [r for r in rows if r.get("ok") and isinstance(r["params"], dict)]
    return sorted(good, key=lambda r: r["layer_us"])[:n]


def per_shape_best(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    good = [r for r in rows if r.get("ok") and isinstance(r["params"], dict)]
    out = {}
    for name in SHAPES:
        r = min(good, key=lambda r: r["us"][name], default=None)
        if r is not None:
            out[name] = {"config": r["config"], "params": r["params"], "us": r["us"][name]}
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="rows of x (batch size)")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop trying new int8 configs after")
    p.add_argument("--fp8-top", type=int, default=8, help="best int8 configs timed again with fp8")
    p.add_argument("--space", choices=("sweep", "load"), default="sweep",
                   help="one-row space: sessions 10-11's, or session 14's cache policies")
    p.add_argument("--wide", action="store_true",
                   help="one row, 16-bit weights through the GEMV against cuBLAS (no int8/fp8)")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays")
    p.add_argument("--graph-calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="weight bytes cycled per graph")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if not torch.cuda.is_available() or nm.triton is None:
        log.error("bench/gemv_sweep.py needs a CUDA device and triton")
        return 2
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": nm.triton.__version__, "python": platform.python_version(),
                 "args": {k: str(v) for k, v in vars(args).items()}}, "rows": {}}
    if args.wide:
        wide = [Shape(name, "fp16", args.rotate_mb, 1) for name in SHAPES]
        fp16 = {sh.name: sh.time_fp16(args.iters, args.graph_calls, args.rotate_mb) for sh in wide}
        log.info("wide: fp16 cuBLAS %s (layer %.1f us)", fp16, sum(fp16.values()))
        rows = sweep(wide, [None, *wide_configs()], args, time.monotonic() + args.budget_s, "fp16 m1")
        fp16_after = {sh.name: sh.time_fp16(args.iters, args.graph_calls, args.rotate_mb)
                      for sh in wide}
        for r in best(rows, 8):
            log.info("wide best %-34s layer %6.1f us (cuBLAS %.1f before, %.1f after)", r["config"],
                     r["layer_us"], sum(fp16.values()), sum(fp16_after.values()))
        result["wide"] = {"fp16_us": fp16, "fp16_us_after": fp16_after, "rows": rows,
                          "best": [r["config"] for r in best(rows, 8)],
                          "per_shape": per_shape_best(rows)}
        args.rows = []
    for m in args.rows:
        int8 = [Shape(name, "int8", args.rotate_mb, m) for name in SHAPES]
        fp16 = {sh.name: sh.time_fp16(args.iters, args.graph_calls, args.rotate_mb) for sh in int8}
        log.info("rows %d: fp16 cuBLAS %s (layer %.1f us)", m, fp16, sum(fp16.values()))
        base = [None, "session10"] if m == 1 else [None]
        space = load_configs() if m == 1 and args.space == "load" else configs(m)
        rows = sweep(int8, [*base, *space], args, time.monotonic() + args.budget_s, f"int8 m{m}")
        top = best(rows, args.fp8_top)
        del int8
        torch.cuda.empty_cache()
        fp8 = [Shape(name, "fp8", args.rotate_mb, m) for name in SHAPES]
        rows8 = sweep(fp8, [*base, *(r["params"] for r in top)], args, float("inf"), f"fp8 m{m}")
        del fp8
        torch.cuda.empty_cache()
        result["rows"][m] = {
            "fp16_us": fp16, "fp16_layer_us": sum(fp16.values()), "int8": rows, "fp8": rows8,
            "int8_best": [r["config"] for r in top], "int8_per_shape": per_shape_best(rows),
            "fp8_best": [r["config"] for r in best(rows8, args.fp8_top)],
            "fp8_per_shape": per_shape_best(rows8)}
        for label, rs in (("int8", rows), ("fp8", rows8)):
            table = next((r for r in rs if r["params"] is None and "layer_us" in r), None)
            for r in best(rs, 5):
                log.info("rows %d %s best %-34s layer %6.1f us (table %s, fp16 %.1f)", m, label,
                         r["config"], r["layer_us"], f"{table['layer_us']:.1f}" if table else "-",
                         sum(fp16.values()))
    result["meta"]["wall_s"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s in %.0f s", args.out, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
