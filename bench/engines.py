"""Engines side by side on one GPU: tokens/s, J/token, GPU busy, share of the memory bound.

    python bench/engines.py --out bench/results/h200_engines.json            # GPU: 7B fp16
    python bench/engines.py --arch llama-tiny --device cpu --batches 1 4 --gen 16 --out /tmp/e.json

One model (synthetic weights) is built once for the largest batch and every
engine runs on it (no second copy of the weights).  Per engine and batch size:
a short warm-up generation (which compiles the ``compiled`` engine; its
``"compile"`` phases are reported as ``compile_s``), then measured generations
of ``--gen`` tokens with EOS ignored, repeated until the window lasts at least
``--min-window-s`` (the NVML energy counter moves every ~100 ms).  Energy is the
NVML total-energy counter read before and after that window (after a device
synchronize); GPU busy is ``nvmlDeviceGetUtilizationRates`` sampled by a
thread.  Only read-only NVML calls are made.  Without NVML (CPU) the energy and
utilisation columns are null.

Memory-traffic bound: a decode step must read every weight once, so it lasts
at least ``weight_bytes / --bandwidth`` (4.8e12 B/s, H200 datasheet) and the
bound is ``batch / step_time`` tokens/s; ``bound_fraction`` is the decode
tokens/s over that bound.  For every other engine (``compiled``, ``hf``)
against ``reference``: the relative difference (L2) of the prefill and
first-decode-step logits, and the fraction of generated positions with the same
greedy token.  ``hf`` (transformers' generate, static cache, its own compile on
CUDA) needs ``pip install llmenergy[hf]``; its ``compile_s`` is the warm-up
generation that triggers transformers' compile.

    python bench/engines.py --engines reference compiled hf --out bench/results/h200_engines_hf.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Nvml:
    """Read-only NVML: the energy counter (J) and a utilisation sampler."""

    def __init__(self, uuid: str | None) -> None:
        self.handle: Any = None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if uuid is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception as exc:  # noqa: BLE001 - no NVML: the energy columns stay null
            print(f"NVML unavailable ({exc}); energy and utilisation will be null")
            self.handle = None

    def energy_j(self) -> float | None:
        if self.handle is None:
            return None
        return self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0

    def start(self, interval_s: float = 0.02) -> None:
        self.samples = []
        if self.handle is None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                self.samples.append((time.monotonic(), int(util)))
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """Mean GPU utilisation (%) over the samples since :meth:`start`."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return sum(u for _, u in self.samples) / len(self.samples) if self.samples else None


def _prompts(n: int, longest: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, longest // 2), longest + 1, (n,), generator=g).tolist()
    return [torch.randint(3, min(vocab, 1000), (k,), generator=g).tolist() for k in lengths]


def _measure(engine: Any, prompts: list[list[int]], args: argparse.Namespace, nvml: Nvml,
             device: Any, weight_bytes: int) -> dict[str, Any]:
    import torch

    bsz = len(prompts)
    compile_s = 0.0

    def on_compile(phase: str, s: int, e: int) -> None:
        nonlocal compile_s
        if phase == "compile":
            compile_s += (e - s) / 1e9

    t = time.perf_counter()
    engine.generate(prompts, min(args.gen, 8), eos_id=None, stop_at_eos=False, on_phase=on_compile)
    warmup_s = time.perf_counter() - t
    runs, tokens = [], None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nvml.start()
    e0, t0 = nvml.energy_j(), time.perf_counter()
    while not runs or (time.perf_counter() - t0 < args.min_window_s and len(runs) < args.max_reps):
        r = engine.generate(prompts, args.gen, eos_id=None, stop_at_eos=False)
        tokens = tokens or r.tokens
        runs.append(r)
    wall_s = time.perf_counter() - t0  # generate() ends with a device synchronize
    e1 = nvml.energy_j()
    util = nvml.stop()
    out_tokens = sum(r.tokens_out for r in runs)
    decode_tokens = sum(bsz * r.decode_steps for r in runs)
    decode_s = sum(r.decode_duration_s for r in runs)
    prefill_s = sum(r.prefill_duration_s for r in runs)
    energy = None if e0 is None or e1 is None else e1 - e0
    decode_tok_s = decode_tokens / decode_s if decode_s > 0 else None
    bound_tok_s = bsz / (weight_bytes / args.bandwidth)
    return {
        "batch": bsz, "reps": len(runs), "window_s": wall_s, "tokens_out": out_tokens,
        "tokens_per_s": out_tokens / (prefill_s + decode_s), "decode_tokens_per_s": decode_tok_s,
        "prefill_s": prefill_s / len(runs), "decode_s": decode_s / len(runs),
        "energy_j": energy, "j_per_token": None if energy is None else energy / out_tokens,
        "mean_power_w": None if energy is None else energy / wall_s,
        "gpu_util_pct": util, "util_samples": len(nvml.samples),
        "bound_tokens_per_s": bound_tok_s,
        "bound_fraction": None if decode_tok_s is None else decode_tok_s / bound_tok_s,
        "compile_s": compile_s, "warmup_s": warmup_s, "short_window": wall_s < 5.0,
        "_tokens": tokens,
    }


def _rel(a: Any, b: Any) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, float]:
    same = total = 0
    prefix = []
    for g, w in zip(got, want, strict=True):
        same += sum(x == y for x, y in zip(g, w, strict=True))
        total += len(w)
        prefix.append(next((i for i, (x, y) in enumerate(zip(g, w)) if x != y), len(w)))
    return {"same_token_fraction": same / total, "mean_identical_prefix": sum(prefix) / len(prefix)}


def main(argv: list[str] | None = None) -> int:
    from llmenergy.arch import ENGINES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default float16 on cuda, float32 on cpu")
    p.add_argument("--engines", nargs="+", default=["reference", "compiled"], choices=list(ENGINES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=64, help="longest prompt (lengths in [P/2, P])")
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--min-window-s", type=float, default=5.0)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth, B/s")
    p.add_argument("--cache-dir", default="/tmp/llmenergy-inductor", help="TORCHINDUCTOR_CACHE_DIR")
    p.add_argument("--port", type=int, default=29513)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from llmenergy.inference import tp, weights
    from llmenergy.inference.engines import make_engine
    from llmenergy.inference.model import num_bytes

    uuid = None
    if args.device == "cuda":
        from _single_gpu import init_rank

        dev, uuid = init_rank(args.port)
    else:
        dev = torch.device("cpu")
        tp.init_model_parallel(1)
    dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
    model, info = weights.build(args.arch, "synthetic", device=dev, dtype=dtype, seed=0,
                                max_batch_size=max(args.batches), max_seq_len=args.prompt + args.gen)
    wbytes = num_bytes(model)
    pool = _prompts(max(args.batches), args.prompt, model.args.vocab_size)
    nvml = Nvml(uuid)
    results: dict[str, Any] = {
        "arch": args.arch, "device": str(dev), "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(), "weight_bytes": wbytes,
        "prompt_lengths": [len(q) for q in pool], "gen": args.gen, "load_s": info.load_duration_s,
        "bandwidth_b_per_s": args.bandwidth, "runs": [], "comparison": [],
    }
    if "hf" in args.engines:
        import transformers

        results["transformers"] = transformers.__version__
    tokens: dict[tuple[str, int], Any] = {}
    logits: dict[tuple[str, int], Any] = {}
    for name in args.engines:
        engine = make_engine(name, model, cache_dir=args.cache_dir)
        for bsz in args.batches:
            prompts = pool[:bsz]
            row = _measure(engine, prompts, args, nvml, dev, wbytes)
            tokens[name, bsz] = row.pop("_tokens")
            logits[name, bsz] = [t.float().cpu() for t in engine.first_logits(prompts)]
            results["runs"].append({"engine": name, **row})
            _fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"{name:9s} bs{bsz:<3d} {row['tokens_per_s']:9.1f} tok/s  "
                  f"{_fmt(row['j_per_token'], '.4f')} J/tok  busy {_fmt(row['gpu_util_pct'], '.0f')}%  "
                  f"bound {row['bound_fraction']:.2f}  compile {row['compile_s']:.1f} s  "
                  f"reps {row['reps']}", flush=True)
        del engine
    for name in args.engines:
        if name == "reference" or "reference" not in args.engines:
            continue
        for bsz in args.batches:
            ref_logits, got_logits = logits["reference", bsz], logits[name, bsz]
            cmp = {"engine": name, "batch": bsz,
                   "prefill_logits_rel_diff": _rel(got_logits[0], ref_logits[0]),
                   "first_step_logits_rel_diff": _rel(got_logits[1], ref_logits[1]),
                   **_agreement(tokens[name, bsz], tokens["reference", bsz])}
            results["comparison"].append(cmp)
            print(f"{name} vs reference bs{bsz}: logits rel diff prefill "
                  f"{cmp['prefill_logits_rel_diff']:.2e}, first step {cmp['first_step_logits_rel_diff']:.2e}; "
                  f"same tokens {cmp['same_token_fraction']:.3f}, identical prefix "
                  f"{cmp['mean_identical_prefix']:.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    tp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
