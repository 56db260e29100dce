"""Runs narrow_mm's Triton kernels under TRITON_INTERPRET=1 on CPU tensors and prints, as
JSON, each case's largest error over its bound (test_narrow_mm.py runs this in a subprocess:
the variable must be set before triton is imported)."""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from llmenergy.inference import narrow_mm as nm  # noqa: E402
from llmenergy.inference.quant import quantize  # noqa: E402

#: relative error of the final fp32 -> activation rounding: half an ulp for fp16 (11
#: significant bits); a whole ulp for bf16 (8 bits) because the interpreter truncates
#: fp32 -> bf16 (triton 3.9.0; a GPU rounds to nearest, half an ulp)
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7}


def case(weight: str, act: torch.dtype, m: int, n: int, k: int, seed: int,
         config: dict[str, int] | None = None) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    if weight == "16":  # a 16-bit weight of x's dtype, scale 1 (the fp16/bf16 decode GEMV)
        q = (torch.randn(n, k, generator=g) * k ** -0.5).to(act)
        scale = torch.ones(n)
    elif weight == "int8":  # every int8 value, -128 included (the bit-trick conversion)
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
        scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    else:
        q, scale = quantize(torch.randn(n, k, generator=g), weight)
    scale = scale.to(act)
    x = torch.randn(m, k, generator=g).to(act)
    out = torch.full((m, n), float("nan"), dtype=act)
    nm.launch(x, q, scale, out, config=config)
    xd, qd, sd = x.double(), q.double(), scale.double()
    ref = (xd @ qd.T) * sd
    # fp32 accumulation of exact products (|error| <= (K+2) 2^-24 sum|x q| |s|) plus
    # the final rounding to the activation dtype
    bound = (k + 2) * 2.0 ** -24 * (xd.abs() @ qd.abs().T) * sd.abs() + ROUNDING[act] * ref.abs()
    ratio = float(((out.double() - ref).abs() / (bound + 1e-30)).max())
    return {"weight": weight, "act": str(act), "m": m, "n": n, "k": k, "ratio": ratio,
            "config": config}


def main() -> int:
    cases = []
    for weight in ("int8", "fp8"):
        for m in (1, 3, 16, 40):
            cases.append(case(weight, torch.float16, m, 203, 328, m))
        # bf16: the GEMV only; the interpreter's tl.dot gives wrong bf16 products
        # (triton 3.9.0), the GPU run of bench/narrow_mm.py covers bf16 there
        cases.append(case(weight, torch.bfloat16, 1, 203, 328, 7))
        cases.append(case(weight, torch.float16, 1, 37, 1100, 8))  # several K blocks + tail
        cases.append(case(weight, torch.float16, 5, 37, 1100, 9))
        # GEMV configs of bench/gemv_sweep.py's space other than the table's, K a few tiles:
        # 16 bytes per thread, and 4
        cases.append(case(weight, torch.float16, 1, 37, 1100, 10,
                          {"BLOCK_N": 2, "BLOCK_K": 256, "VEC": 16, "num_warps": 2,
                           "num_stages": 1}))
        cases.append(case(weight, torch.float16, 1, 37, 1100, 11,
                          {"BLOCK_N": 8, "BLOCK_K": 128, "VEC": 4, "num_warps": 4,
                           "num_stages": 1}))
    for load, seed in ((1, 15), (2, 16)):  # the weight loads evict-first, then L2 only
        cases.append(case("int8", torch.float16, 1, 37, 1100, seed,
                          {"BLOCK_N": 2, "BLOCK_K": 256, "VEC": 16, "LOAD": load,
                           "num_warps": 2, "num_stages": 1}))
    for act, seed in ((torch.float16, 12), (torch.bfloat16, 13)):  # 16-bit weights: one row
        cases.append(case("16", act, 1, 37, 1100, seed))
    cases.append(case("16", torch.float16, 1, 203, 328, 14,
                      {"BLOCK_N": 2, "BLOCK_K": 256, "VEC": 8, "num_warps": 2, "num_stages": 1}))
    print(json.dumps(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
