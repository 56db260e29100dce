"""Where a compiled decode step's time goes: kernels, launches, bytes (issue 24, item 1).

    python bench/step_profile.py --precision fp16 int8 --batches 1 16 --out $OUT/h200_step_profile.json  # GPU
    python bench/step_profile.py --tiny --out /tmp/step_profile.json                                     # CPU smoke

Per precision and batch: the compiled engine (synthetic weights) is warmed up, then
``--steps`` decode steps of one ``generate`` run under ``torch.profiler``. From the
device's kernel records: kernels per step, the kernels' busy time per step against the
step's wall time (the rest is launch gaps and host time), each kernel class's share
(``narrow_mm``/GEMV/GEMM, attention, the rest of Inductor's fused kernels, collectives),
and the bandwidth the weight-reading kernels reach (weight bytes per step over their
time). On a CPU there are no device kernels: the smoke run reports the CPU ops instead.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

#: kernel class by name (first match wins); "other" is the rest (Inductor's fused pointwise/reductions)
CLASSES = (
    ("weights", re.compile(r"narrow|gemv|gemm|cutlass|sm90|xmma|cublas|matmul|addmm|\bmm\b|splitk", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("collective", re.compile(r"nccl|all_?reduce|all_?gather", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy_|index_copy|index_put", re.I)),
)


def _class(name: str) -> str:
    return next((c for c, pat in CLASSES if pat.search(name)), "other")


def _kernels(prof: Any, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of every device kernel (CPU: every leaf op) the profile recorded."""
    out = []
    for e in prof.events():
        if cuda:
            if str(getattr(e, "device_type", "")).endswith("CUDA") and getattr(e, "device_time", 0) > 0:
                out.append((e.name, float(e.device_time)))
        elif not e.cpu_children:
            out.append((e.name, float(e.cpu_time)))
    return out


def profile_one(engine: Any, prompts: list[list[int]], steps: int, weight_bytes: int, cuda: bool) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine.generate(prompts, 8, eos_id=None, stop_at_eos=False)  # compile and warm up
    plain = engine.generate(prompts, steps + 1, eos_id=None, stop_at_eos=False)
    step_s = plain.decode_duration_s / max(plain.decode_steps, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        r = engine.generate(prompts, steps + 1, eos_id=None, stop_at_eos=False)
    # the prefill alone (a run of one token), whose kernels are taken out of the run's: the
    # rest are the decode steps' (an eager prefill launches ~40 kernels per layer)
    with profile(activities=acts) as pre:
        one = engine.generate(prompts, 1, eos_id=None, stop_at_eos=False)
    pre_kernels = _kernels(pre, cuda)
    pre_top: dict[str, float] = defaultdict(float)
    for name, us in pre_kernels:
        pre_top[_class(name) + ": " + name[:70]] += us
    n_steps = max(r.decode_steps, 1)
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    count = 0
    for sign, p in ((1, prof), (-1, pre)):
        for name, us in _kernels(p, cuda):
            by_class[_class(name)] += sign * us
            by_name[name] += sign * us
            count += sign
    kernels = [(name, us) for name, us in by_name.items() if us > 0]
    busy_s = sum(us for _, us in kernels) / 1e6 / n_steps
    weights_s = by_class.get("weights", 0.0) / 1e6 / n_steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "batch": len(prompts), "step_s": step_s, "kernels_per_step": count / n_steps,
        "kernel_busy_s_per_step": busy_s, "busy_share_of_step": busy_s / step_s if step_s else None,
        "class_share": {c: v / 1e6 / n_steps / step_s for c, v in sorted(by_class.items())} if step_s else {},
        "weight_bytes": weight_bytes,
        "weight_kernels_b_per_s": weight_bytes / weights_s if weights_s else None,
        "step_b_per_s": weight_bytes / step_s if step_s else None,
        "top_kernels_us_per_step": [(name[:90], us / n_steps) for name, us in top],
        # the prefill (one run of one token, profiled): its wall time against its kernels' time
        # (an eager prefill far above its kernels is bound by the host's Python)
        "prefill_s": one.prefill_duration_s, "prefill_kernels": len(pre_kernels),
        "prefill_kernel_busy_s": sum(us for _, us in pre_kernels) / 1e6,
        "prefill_top_kernels_us": sorted(pre_top.items(), key=lambda kv: -kv[1])[:8],
        "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--tiny", action="store_true", help="llama-tiny on the CPU (a smoke run)")
    p.add_argument("--precision", nargs="+", default=["fp16", "int8"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from engines import _prompts, _weight_bytes

    from llmenergy.arch import PRECISION_DTYPE
    from llmenergy.inference import tp, weights
    from llmenergy.inference.engines import make_engine

    if args.tiny:
        args.arch, args.batches, args.steps, args.prompt = "llama-tiny", [1, 2], 4, 16
        dev = torch.device("cpu")
        tp.init_model_parallel(1)
    else:
        from _single_gpu import init_rank

        dev, _ = init_rank(args.port)
    cuda = dev.type == "cuda"
    results: dict[str, Any] = {"arch": args.arch, "torch": torch.__version__, "python": platform.python_version(),
                               "gpu": torch.cuda.get_device_name(dev) if cuda else platform.processor(),
                               "steps": args.steps, "runs": []}
    for precision in args.precision:
        dtype = getattr(torch, PRECISION_DTYPE[precision]) if cuda else torch.float32
        model, _ = weights.build(args.arch, "synthetic", device=dev, dtype=dtype, seed=0,
                                 max_batch_size=max(args.batches), max_seq_len=args.prompt + args.steps + 16)
        engine = make_engine("compiled", model, precision=precision)
        wb = _weight_bytes(model, engine)
        for bsz in args.batches:
            prompts = _prompts(bsz, args.prompt, model.args.vocab_size)
            row = {"precision": precision, "quant_backend": getattr(engine, "quant_backend", None),
                   **profile_one(engine, prompts, args.steps, wb, cuda)}
            results["runs"].append(row)
            Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later run is cut
            print(f"{precision:5s} bs{bsz:<3d} step {row['step_s'] * 1e3:7.3f} ms  kernels/step "
                  f"{row['kernels_per_step']:6.1f}  busy {row['busy_share_of_step'] or 0:5.2f}  "
                  + "  ".join(f"{c} {v:.2f}" for c, v in row["class_share"].items())
                  + (f"  weights at {row['weight_kernels_b_per_s'] / 1e12:.2f} TB/s"
                     if row["weight_kernels_b_per_s"] else ""), flush=True)
            print(f"      prefill {row['prefill_s'] * 1e3:7.1f} ms, {row['prefill_kernels']} kernels "
                  f"busy {row['prefill_kernel_busy_s'] * 1e3:.1f} ms: "
                  + "; ".join(f"{n} {us / 1e3:.2f} ms" for n, us in row["prefill_top_kernels_us"][:5]),
                  flush=True)
        del engine, model
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
