"""The compiled engine's prefill, eager against compiled (one graph for every block), per precision.

    python bench/prefill_paths.py --out $OUT/h200_prefill_paths.json    # GPU

Why: an eager 7B prefill is bound by the host (session 11, H200: 64 tokens at batch 1 took
41.8 ms with 7.3 ms of kernels for fp16, and int8's 128 narrow linears cost the host more
still: 41-45 ms against fp16's 23-36).  The engine now compiles one transformer block with
the prompt length symbolic and runs it for every layer (``compile_prefill``).  This times,
per precision and batch size, in one process on one 7B synthetic model per precision: the
eager prefill, the block's compile, then the compiled prefill (the median of ``--reps``
prefills each, CUDA synchronised), and the compiled prefill's logits against the eager one's.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from llmenergy.inference import weights  # noqa: E402
from llmenergy.inference.compiled import CompiledEngine  # noqa: E402


def _time(engine: CompiledEngine, prompts: list[list[int]], reps: int) -> float:
    """Median milliseconds of one prefill (after two unmeasured ones)."""
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.prefill_only(prompts)
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _logits(engine: CompiledEngine, prompts: list[list[int]]) -> torch.Tensor:
    bsz = len(prompts)
    tokens = torch.tensor(prompts, device=engine.device)
    return engine._prefill(tokens, None, engine.caches(bsz)).float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--precision", nargs="+", default=["fp16", "int8", "fp8"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/prefill_paths.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "python": platform.python_version(), "arch": args.arch,
                           "prompt": args.prompt, "reps": args.reps, "rows": []}
    g = torch.Generator().manual_seed(0)
    for precision in args.precision:
        model = weights.build(args.arch, "synthetic", device=dev, dtype=torch.float16, seed=0,
                              max_batch_size=max(args.batches), max_seq_len=args.prompt + 8)[0]
        pool = torch.randint(3, model.args.vocab_size, (max(args.batches), args.prompt), generator=g).tolist()
        with torch.inference_mode():
            engine = CompiledEngine(model, precision=precision, compile_prefill=True)
            for bsz in args.batches:
                prompts = pool[:bsz]
                eager_ms = _time(engine, prompts, args.reps)  # not warmed: the eager prefill
                eager = _logits(engine, prompts)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine._warm_prefill(bsz, engine.caches(bsz))
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                row = {"precision": precision, "batch": bsz, "eager_ms": eager_ms,
                       "compile_s": compile_s, "compiled": bsz in engine._prefill_ready}
                row["compiled_ms"] = _time(engine, prompts, args.reps)
                got = _logits(engine, prompts)
                row["logits_rel_diff"] = float((got - eager).norm() / eager.norm())
                out["rows"].append(row)
                print(f"{precision:5s} b{bsz:<3d} eager {eager_ms:7.2f} ms  compiled {row['compiled_ms']:7.2f} ms"
                      f"  compile {compile_s:5.1f} s  logits rel diff {row['logits_rel_diff']:.2e}"
                      f"{'' if row['compiled'] else '  (compile FAILED: eager)'}", flush=True)
        del engine, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
