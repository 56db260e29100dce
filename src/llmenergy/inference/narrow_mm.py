"""Weight-only int8/fp8 matrix product that reads the narrow weight: ``(x @ q.T) * scale``.

Why: ``F.linear(x, q.to(x.dtype)) * scale`` under ``torch.compile`` makes Inductor
write the dequantised 16-bit weight for every batch above one (more bytes than
fp16: issue 24).  Here a Triton kernel loads the int8 / e4m3 weight tile, converts
it in registers, accumulates in fp32 and applies the per-output-channel scale once at
the end, so a decode step reads one byte per weight.

- :func:`narrow_mm` (and the op ``torch.ops.llmenergy.narrow_mm``): ``x`` [..., K]
  fp16/bf16, ``q`` [N, K] int8 or ``float8_e4m3fn``, ``scale`` [N]; returns [..., N] in
  ``x.dtype``.  The kernel runs on CUDA with Triton importable, ``M`` (rows of ``x``)
  at most :data:`SMALL_M`, a 16-bit ``x`` and ``N * K < 2**31`` (32-bit offsets);
  anything else (CPU, prefill, fp32) is the PyTorch expression, which for large ``M``
  is compute-bound anyway.
- Two forms.  ``M == 1``: a GEMV, each program owns ``BLOCK_N`` output channels and
  walks K in tiles of [BLOCK_K / VEC, VEC]: each thread sums its VEC contiguous products
  in registers, so the fp32 accumulator is [BLOCK_N, BLOCK_K / VEC] (40 registers a
  thread for session 11's config, against 71 for session 10's [BLOCK_N, BLOCK_K] one: more
  programs resident per SM, more bytes in flight), and x is loaded in the weight's layout
  (no shared-memory exchange and no barrier in the loop; both read off the sm_90 SASS).
  Its config per weight shape is chosen on the GPU at load (:func:`tune`).
  ``2..SMALL_M``: ``tl.dot`` with ``BLOCK_M`` 16, 32 or 64 (rows past M masked); the row
  blocks of one column block are adjacent programs, so a weight tile read twice comes
  from L2.
- int8 is converted with a bit trick (the byte into a float's mantissa, one exact
  subtraction), not the int->float instruction, whose throughput on Hopper is below
  what HBM delivers; in the GEMV on the GPU as PTX (one ``prmt`` a byte, one ``xor`` per
  four: 14 % fewer instructions in the loop, 8 % faster); e4m3 uses Triton's conversion.
- No split-K: a small ``BLOCK_N`` (1 for the GEMV, 32 for N <= 8192 in the GEMM) gives
  N=4096 at least 128 programs for the 132 SMs; one kernel, no atomics: deterministic,
  nothing to zero, a single node in a CUDA graph.
- Block configs from a table (:func:`_config`), picked from sweeps on H200s (Triton 3.6),
  rather than ``triton.autotune``, which would benchmark at first call, inside Inductor's
  warm-up or CUDA-graph recording.  The GEMV's config alone is chosen per machine, by
  :func:`tune`, among four in the engine's warm-up (the best differed between two H200s),
  once per shape and process: every graph and cell of a process then runs the same kernel,
  which energy measurements need, and the choice is in the cell's provenance.
  ``bench/narrow_mm.py`` and ``bench/gemv_sweep.py`` measure them.
- The op ``llmenergy::narrow_mm`` is opaque to ``torch.compile``: a plain dispatcher op
  whose kernel is the raw launch (:func:`eager`), with the PyTorch expression as its fake
  (shapes).  A graph calls it without a break and without guarding on the row count, so
  the compiled prefill's one graph serves every prompt length (the kernel-or-expression
  choice is made at run time), and the decode step's CUDA graph captures the launch.  Why
  not a ``triton_op`` that Inductor traces into (sessions 8-12): Inductor generated each
  call site's launch anew, and an int8 decode step compiled in 45 s against 30 s (session
  13, one H200); outside a trace its body went through ``wrap_triton`` (91 ms for a 7B
  int8 prefill against 39, session 12), and a ``custom_op`` costs ~10 us more per call.
  Triton is imported in a guard, so this module imports with the CPU wheel of torch.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: the most rows of ``x`` that take the kernel; above it the product is compute-bound
SMALL_M = 64
OP_NAME = "llmenergy::narrow_mm"
#: weight dtypes the kernel reads, activation dtypes it writes
WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
ACT_DTYPES = (torch.float16, torch.bfloat16)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the CPU wheel of torch ships no triton
    triton = None
    tl = None
    log.debug("triton unavailable (%s): narrow_mm runs the PyTorch expression", exc)


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The PyTorch expression (CPU path, fallback, and what the kernel must equal).

    In float16 the weight is dequantised before the product: ``x @ q.T`` alone overflows
    float16 where the narrow values are large against the weight's (e4m3 reaches 448; on
    the H200 a 7B fp8 prefill of 8 prompts came out inf). In bfloat16 and float32, whose
    range is float32's, the scale comes after, as in the kernel (which accumulates in
    float32): one rounding of the output rather than one of every weight."""
    if q.dtype == x.dtype:  # a 16-bit weight (the one-row GEMV of fp16/bf16; scale 1)
        return F.linear(x, q) * scale.to(x.dtype)
    if x.dtype == torch.float16:
        s = scale.to(x.dtype)[:, None]
        # int8 times float16 promotes in one kernel (the int8 -> float16 conversion is exact:
        # the same values as converting first, 5 bytes moved per weight instead of 9); e4m3
        # does not promote
        return F.linear(x, q * s if q.dtype == torch.int8 else q.to(x.dtype) * s)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


#: the GEMV's block config when :func:`tune` has not picked one for the shape: the best
#: single config of session 14's sweep on an H200, one output channel a program of one
#: warp, 16 bytes a thread, the weight's loads evict-first (int8 60.8 us per 7B layer,
#: session 11's table 73.3, cuBLAS fp16 114.6 in the same process;
#: bench/results/session14/load)
GEMV_TABLE: dict[str, int] = {"BLOCK_N": 1, "BLOCK_K": 1024, "VEC": 16, "LOAD": 1,
                              "num_warps": 1, "num_stages": 1}
#: what :func:`tune` times at load on the GPU, the table first, then the fastest per 7B
#: projection in session 11's sweep (qkv and gate/up 2 x 1024 by 16, 2 warps; wo 2 x 1024
#: by 8; w2 4 x 1024, 8 warps), which :func:`tune` chose on sessions 11-13's H200s
_S11 = {"BLOCK_N": 2, "BLOCK_K": 1024, "VEC": 8, "num_warps": 2, "num_stages": 1}
GEMV_CANDIDATES: tuple[dict[str, int], ...] = (
    GEMV_TABLE,
    {**_S11, "VEC": 16},
    _S11,
    {**_S11, "BLOCK_N": 4, "num_warps": 8},
)
#: a candidate replaces the table for a shape only when it is this much faster than it
TUNE_MARGIN = 0.03
#: ``LLMENERGY_GEMV_TUNE=0``: no timing at load, the table for every shape
TUNE_ENV = "LLMENERGY_GEMV_TUNE"
#: (N, K, weight dtype) -> the GEMV config :func:`tune` chose in this process
_tuned: dict[tuple[int, int, torch.dtype], dict[str, int]] = {}


def _config(m: int, n: int, k: int, wdtype: torch.dtype | None = None) -> dict[str, int]:
    """Block sizes and launch options for an [m, k] x [n, k]^T product (see module doc)."""
    if m == 1:
        return dict(_tuned.get((n, k, wdtype), GEMV_TABLE))
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256 if n > 8192 else 512,
                "num_warps": 4, "num_stages": 3}
    wide = n > 8192
    return {"BLOCK_M": 32 if m <= 32 else 64, "BLOCK_N": 64 if wide else 32,
            "BLOCK_K": 128 if wide else 256, "num_warps": 4, "num_stages": 4}


if triton is not None:

    @triton.jit
    def _int8_f32(w):
        """int8 -> fp32 exactly without the slow I2F conversion: the byte ``q + 128`` goes
        into the low mantissa bits of 2^23, whose unit is 1; subtracting 2^23 + 128 is exact."""
        u = w.to(tl.uint8, bitcast=True) ^ 0x80
        return (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _int8_f16(w):
        """int8 -> fp16 likewise, in the mantissa of 2^10 (unit 1 up to 2048)."""
        u = w.to(tl.uint8, bitcast=True) ^ 0x80
        return (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0

    @triton.jit
    def _int8_f32_asm(w):
        """The same conversion in PTX, four bytes (one register) at a time: one ``xor`` flips the
        four sign bits, one ``prmt`` per byte puts it under 2^23's exponent, one ``sub``."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7650;
            prmt.b32 $1, t, 0x4B000000, 0x7651;
            prmt.b32 $2, t, 0x4B000000, 0x7652;
            prmt.b32 $3, t, 0x4B000000, 0x7653;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r", args=[w], dtype=tl.float32, is_pure=True, pack=4)

    @triton.jit
    def _gemv_kernel(x_ptr, q_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, VEC: tl.constexpr, ASM: tl.constexpr,
                     LOAD: tl.constexpr):
        """out[n] = scale[n] * sum_k x[k] * q[n, k] for one row of x.

        The K tile is [BLOCK_K / VEC, VEC]: each thread sums its VEC contiguous products in
        registers, so the accumulator is [BLOCK_N, BLOCK_K / VEC] (a few registers per
        thread, not one per weight in flight) and x is loaded in the weight's layout (no
        shared-memory shuffle, no barrier in the loop).  ``ASM``: int8 through the PTX
        conversion.  ``LOAD``: the weight's loads plain (0), marked evict-first (1) or
        cached in L2 only (2, ``.cg``).  (Loading the next tile before this one's arithmetic
        lost in every config of session 11's sweep: 92-109 us per 7B layer against 72-80.)"""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (tl.arange(0, BLOCK_K // VEC)[None, :, None] * VEC
              + tl.arange(0, VEC)[None, None, :])  # [1, BLOCK_K / VEC, VEC]
        n_mask = rn[:, None, None] < N
        w_ptrs = q_ptr + rn[:, None, None] * K + rk
        acc = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            if LOAD == 1:
                w = tl.load(w_ptrs + k0, mask=n_mask & (kk < K), other=0.0,
                            eviction_policy="evict_first")
            elif LOAD == 2:
                w = tl.load(w_ptrs + k0, mask=n_mask & (kk < K), other=0.0, cache_modifier=".cg")
            else:
                w = tl.load(w_ptrs + k0, mask=n_mask & (kk < K), other=0.0)
            if w.dtype == tl.int8:
                if ASM:
                    wf = _int8_f32_asm(w)
                else:
                    wf = _int8_f32(w)
            else:
                wf = w.to(tl.float32)
            acc += tl.sum(wf * xv.to(tl.float32), axis=2)
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)

    # M (the rows: prompt length × batch in a prefill) is not specialised on (Triton would
    # compile a variant for M % 16 == 0 and for M == 1): one kernel per block config, all
    # compiled in the engine's warm-up (:func:`warm`), none inside a measured window
    @triton.jit(do_not_specialize=["M"])
    def _gemm_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, n] = scale[n] * sum_k x[m, k] * q[n, k]; rows past M are masked."""
        # row blocks of one column block are adjacent programs: they share weight tiles in L2
        num_m = tl.cdiv(M, BLOCK_M)
        rn = (tl.program_id(0) // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = (tl.program_id(0) % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K
            a = tl.load(x_ptr + rm[:, None] * K + kk[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # [BLOCK_K, BLOCK_N] view of the row-major [N, K] weight: contiguous along K
            b = tl.load(q_ptr + rn[None, :] * K + kk[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if b.dtype == tl.int8:
                if a.dtype == tl.float16:
                    b = _int8_f16(b)
                else:
                    b = _int8_f32(b)
            acc = tl.dot(a, b.to(a.dtype), acc)
        out = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
           config: dict[str, int] | None = None) -> None:
    """Run the kernel for 2-D contiguous ``x`` [M, K], ``q`` [N, K], ``scale`` [N] into
    ``out`` [M, N] (on CPU tensors under ``TRITON_INTERPRET=1`` too)."""
    if triton is None:
        raise RuntimeError("narrow_mm.launch needs triton")
    m, k = x.shape
    n = q.shape[0]
    cfg = dict(config or _config(m, n, k, q.dtype))
    opts = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 3)}
    if m == 1:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
        # the PTX conversion where the kernel is compiled for a GPU (not the CPU interpreter)
        asm = int(cfg.pop("ASM", 1) and q.dtype == torch.int8 and q.is_cuda)
        load = cfg.pop("LOAD", 0)
        _gemv_kernel[grid](x, q, scale, out, n, k, **cfg, ASM=asm, LOAD=load, **opts)
    else:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, cfg["BLOCK_M"]),)
        _gemm_kernel[grid](x, q, scale, out, m, n, k, **cfg, **opts)


Timer = Callable[[list[tuple[torch.Tensor, torch.Tensor]], dict[str, int], torch.dtype], float]


def config_name(cfg: dict[str, int]) -> str:
    """``n4_k1024_v8_w4``: a GEMV config in a word (logs, provenance)."""
    load = f"_l{cfg['LOAD']}" if cfg.get("LOAD") else ""
    return f"n{cfg['BLOCK_N']}_k{cfg['BLOCK_K']}_v{cfg['VEC']}_w{cfg['num_warps']}{load}"


#: the ranks' agreement on timings: each rank's microseconds per candidate in, the same
#: list out on every rank (:func:`llmenergy.inference.tp.slowest`: the slowest rank's)
Agree = Callable[[list[float]], list[float]]


def tune(weights: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, *,
         candidates: tuple[dict[str, int], ...] = GEMV_CANDIDATES,
         timer: Timer | None = None, agree: Agree | None = None) -> dict[str, dict[str, Any]]:
    """Choose the one-row (decode at batch 1) block config per weight shape on this GPU.

    Why: the fastest config differed between two H200s of the same kind (session 10: the
    table's 86 us per 7B layer on one, 69 on the other, another config 74 there).  For each
    (N, K, weight dtype) not tuned yet in this process, every candidate is timed over all
    weights of that shape in turn (``timer``; on CUDA a CUDA graph of one launch per weight,
    so they come from HBM, the median of 5 replays); the fastest replaces the table only
    when it is :data:`TUNE_MARGIN` faster.  Done once per shape and process, in the
    engine's warm-up (its ``compile`` phase): every later graph and every cell of a packed
    group uses the same kernel.  Returns, per shape tuned now, the config chosen and the
    microseconds per call of each candidate.  Nothing with ``LLMENERGY_GEMV_TUNE=0``, nor,
    with the default timer, for weights the kernel does not take (CPU); a given ``timer``
    times every shape.  ``agree`` (the engine's, at two shards or more): the times go through
    it before the choice, so that every rank of a cell picks the same config (the step
    waits for the slowest rank anyway); every rank must tune the same shapes in order.
    """
    if os.environ.get(TUNE_ENV, "1") == "0":
        return {}
    groups: dict[tuple[int, int, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for q, scale in weights:
        groups.setdefault((q.shape[0], q.shape[1], q.dtype), []).append((q, scale))
    report: dict[str, dict[str, Any]] = {}
    for key, pairs in groups.items():
        q0 = pairs[0][0]
        if key in _tuned or (timer is None and not _takes_kernel(
                torch.empty((1, key[1]), device=q0.device, dtype=dtype), q0)):
            continue
        us: dict[int, float] = {}
        for i, cfg in enumerate(candidates):
            try:
                us[i] = (timer or _graph_us)(pairs, cfg, dtype)
            except Exception as exc:  # noqa: BLE001 - out of resources: that config is out
                log.warning("narrow_mm: GEMV config %s failed on %s: %s: %s", config_name(cfg),
                            key[:2], type(exc).__name__, str(exc)[:200])
        if agree is not None:  # a config that failed on one rank is out on all
            times = agree([us.get(i, math.inf) for i in range(len(candidates))])
            us = {i: t for i, t in enumerate(times) if math.isfinite(t)}
        best = min(us, key=us.__getitem__, default=0)
        if 0 in us and us[best] > us[0] * (1 - TUNE_MARGIN):
            best = 0
        _tuned[key] = dict(candidates[best])
        name = f"{key[0]}x{key[1]} {str(key[2]).removeprefix('torch.')}"
        report[name] = {"config": config_name(candidates[best]),
                        "us": {config_name(candidates[i]): round(t, 2) for i, t in us.items()}}
        log.info("narrow_mm: one-row config for %s: %s (%s)", name, report[name]["config"],
                 ", ".join(f"{c} {t:.1f} us" for c, t in report[name]["us"].items()))
    return report


def tuned(wdtype: torch.dtype | None = None) -> dict[str, str]:
    """The one-row configs :func:`tune` chose in this process, by shape (provenance); only
    those of weight dtype ``wdtype`` when given."""
    return {f"{n}x{k} {str(d).removeprefix('torch.')}": config_name(c)
            for (n, k, d), c in sorted(_tuned.items(), key=str) if wdtype in (None, d)}


def time_graph(calls: list[Callable[[], Any]], iters: int) -> float:
    """Median microseconds of one call, from a CUDA graph replaying ``calls`` in turn (GPU
    time only; Triton compiles in the warm-up before the capture).  Also bench/'s timer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        for _ in range(3):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def _graph_us(pairs: list[tuple[torch.Tensor, torch.Tensor]], cfg: dict[str, int],
              dtype: torch.dtype) -> float:
    """Microseconds per launch of ``cfg`` over ``pairs`` (:func:`time_graph`, 5 replays)."""
    q0 = pairs[0][0]
    # a constant row: the time does not depend on the values, and the RNG is left alone
    x = torch.full((1, q0.shape[1]), 0.5, device=q0.device, dtype=dtype)
    out = torch.empty((1, q0.shape[0]), device=q0.device, dtype=dtype)
    return time_graph([(lambda q=q, scale=scale: launch(x, q, scale, out, config=cfg))
                       for q, scale in pairs], 5)


#: one row count per block config of :func:`_config` (1: the GEMV; then BLOCK_M 16, 32, 64)
WARM_ROWS = (1, 2, 17, 33)


def warm(weights: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
         agree: Agree | None = None) -> int:
    """Run the op once per block config for every distinct weight shape and dtype of
    ``weights`` (``(q, scale)`` pairs), so that Triton compiles each kernel variant now and
    not in the first prefill of a prompt length that needs it; returns the launches.
    First :func:`tune` picks the one-row configs (on CUDA; ``agree``: see there)."""
    tune(weights, dtype, agree=agree)
    seen: set[tuple[int, int, torch.dtype]] = set()
    launched = 0
    for q, scale in weights:
        key = (q.shape[0], q.shape[1], q.dtype)
        if key in seen:
            continue
        seen.add(key)
        for m in WARM_ROWS:
            x = torch.zeros((m, q.shape[1]), device=q.device, dtype=dtype)
            if _takes_kernel(x, q):
                narrow_mm(x, q, scale)
                launched += 1
    return launched


def _takes_kernel(x2: torch.Tensor, q: torch.Tensor) -> bool:
    """The kernel applies: narrow weights up to :data:`SMALL_M` rows, a 16-bit weight of
    ``x``'s dtype for one row only (more rows: cuBLAS)."""
    rows = SMALL_M if q.dtype in WEIGHT_DTYPES else 1 if q.dtype == x2.dtype else 0
    return (triton is not None and x2.is_cuda and x2.dtype in ACT_DTYPES
            and 1 <= x2.shape[0] <= rows and q.shape[0] * q.shape[1] < 2 ** 31)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    if q.dim() != 2 or x.shape[-1] != q.shape[1] or scale.shape != (q.shape[0],):
        raise ValueError(f"narrow_mm: x {tuple(x.shape)}, q {tuple(q.shape)}, scale "
                         f"{tuple(scale.shape)}: want x [..., K], q [N, K], scale [N]")


def eager(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`narrow_mm` without the op's dispatch: the kernel where :func:`_takes_kernel`,
    else :func:`reference` (the eager prefill calls it four times a layer; on the H200 a 7B
    int8 64-token prefill took 41 ms against fp16's 23, with 9 ms of kernels against 7: the
    host's time per call)."""
    _check(x, q, scale)
    x2 = x.reshape(-1, x.shape[-1])
    if not _takes_kernel(x2, q):
        return reference(x, q, scale)
    x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], q.shape[0]), device=x.device, dtype=x.dtype)
    launch(x2, q.contiguous(), scale.contiguous(), out)
    return out.reshape(*x.shape[:-1], q.shape[0])


def _register() -> torch.library.Library:
    """``llmenergy::narrow_mm``, opaque to ``torch.compile`` (module doc): kernel :func:`eager`,
    fake :func:`reference`."""
    lib = torch.library.Library(OP_NAME.split("::")[0], "FRAGMENT")
    name = OP_NAME.split("::")[1]
    lib.define(f"{name}(Tensor x, Tensor q, Tensor scale) -> Tensor")
    lib.impl(name, eager, "CompositeExplicitAutograd")
    torch.library.register_fake(OP_NAME, reference, lib=lib)
    return lib


_lib = _register()
_overload = torch.ops.llmenergy.narrow_mm.default


def narrow_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ q.to(x.dtype).T) * scale`` in ``x.dtype`` reading ``q`` narrow where it can,
    through the op (under ``torch.compile``; eagerly :func:`eager` costs less)."""
    return _overload(x, q, scale)
