"""The eager prefill of the compiled engine, int8 through our kernel or the PyTorch expression.

    python bench/prefill_paths.py --out $OUT/h200_prefill_paths.json    # GPU

Why: on the H200 (session 11) a 7B int8 prefill of 64 tokens at batch 1 took 41-45 ms of
wall time against fp16's 23-36 ms, with 9.0 ms of kernels against 7.3 (bench/step_profile.py):
the host's time per narrow linear call (128 per prefill), not the GPU's.  This times, in one
process on one 7B synthetic model: fp16's prefill, then int8's with every prefill row
through the kernel (``narrow_mm.SMALL_M`` 64) and through the PyTorch expression
(``SMALL_M`` set to 1: the weight dequantised to fp16, then cuBLAS), the median of ``--reps`` prefills each
(CUDA synchronised), and the int8 prefill logits of both paths against each other.
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

from llmenergy.inference import narrow_mm as nm  # noqa: E402
from llmenergy.inference import weights  # noqa: E402
from llmenergy.inference.engines import make_engine  # noqa: E402


def _time(engine: Any, prompts: list[list[int]], reps: int) -> float:
    """Median milliseconds of one eager prefill (after two unmeasured ones)."""
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.prefill_only(prompts)
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/prefill_paths.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")

    def build() -> Any:  # one model per precision (a model's linears serve one precision)
        return weights.build(args.arch, "synthetic", device=dev, dtype=torch.float16, seed=0,
                             max_batch_size=args.batch, max_seq_len=args.prompt + 8)[0]

    model = build()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.args.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "python": platform.python_version(), "arch": args.arch,
                           "prompt": args.prompt, "batch": args.batch, "reps": args.reps, "ms": {}}
    with torch.inference_mode():
        e16 = make_engine("compiled", model, precision="fp16")
        out["ms"]["fp16"] = _time(e16, prompts, args.reps)
        print(f"{'fp16':18s} {out['ms']['fp16']:7.2f} ms", flush=True)
        del e16, model
        torch.cuda.empty_cache()
        e8 = make_engine("compiled", build(), precision="int8")
        tokens = torch.tensor(prompts, device=dev)
        logits = {}
        for label, rows in (("int8_kernel", nm.SMALL_M), ("int8_torch", 1), ("int8_kernel_again", nm.SMALL_M)):
            nm.SMALL_M = rows  # read at each call: the eager prefill's rows take the kernel or not
            out["ms"][label] = _time(e8, prompts, args.reps)
            logits[label] = e8.tail_logits(tokens, None, 1).float()
            print(f"{label:18s} {out['ms'][label]:7.2f} ms (fp16 {out['ms']['fp16']:.2f})", flush=True)
        a, b = logits["int8_kernel"], logits["int8_torch"]
        out["logits_rel_diff_kernel_vs_torch"] = float((a - b).norm() / a.norm())
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
