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
at least ``weight_bytes / --bandwidth`` (default by the GPU's name, from the
datasheets: H200 4.8e12 B/s, H100 SXM 3.35e12, H100 PCIe 2.0e12; else 4.8e12) and the
bound is ``batch / step_time`` tokens/s; ``bound_fraction`` is the decode
tokens/s over that bound.  For every other engine (``compiled``, ``hf``)
against ``reference``: the relative difference (L2) of the prefill and
first-decode-step logits (every engine's first step fed the same token: the first run's
greedy one), the fraction of rows whose first token (the prefill's argmax) is the same,
and the fraction of generated positions with the same greedy token.  ``hf``
(transformers' generate, static cache, its own compile on CUDA) needs
``pip install llmenergy[hf]``; its ``compile_s`` is the warm-up generation that
triggers transformers' compile.

    python bench/engines.py --engines reference compiled hf --out bench/results/h200_engines_hf.json

Precisions (docs/precision.md): ``--precision fp16 bf16 int8 fp8`` builds one model per
precision and runs each engine that supports it (int8/fp8: compiled only; reference and
hf only the ``--anchor-precisions``, default fp16), batches 1 and 16 unless given; the
bound uses each run's own weight bytes (one byte per block linear weight under
int8/fp8); every precision is compared with fp16's reference; a closing table gives the
speed-up over fp16.  ``--tiny`` is a CPU smoke run on ``llama-tiny``:

    python bench/engines.py --engines reference compiled hf --precision fp16 bf16 int8 fp8 --out o.json
    python bench/engines.py --tiny --engines reference compiled hf --precision fp16 bf16 int8 fp8 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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


#: memory bandwidth by a part of the GPU's name (datasheets), first match; else the H200's
BANDWIDTHS = (("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12))

def _prompts(n: int, longest: int, vocab: int, shortest: int | None = None) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lo = max(1, min(longest, longest // 2 if shortest is None else shortest))
    lengths = torch.randint(lo, longest + 1, (n,), generator=g).tolist()
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


def _same_argmax(a: Any, b: Any) -> float:
    """The fraction of rows of logits ``a`` and ``b`` [B, V] with the same argmax."""
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def _first_logits(engine: Any, prompts: list[list[int]], first_token: Any) -> list[Any]:
    """[prefill logits, first-step logits, whether the step was fed ``first_token``].

    Each engine's first decode step is fed the same token (the first run's greedy one):
    fed its own, a weight format that flips a near-tie in the prefill's argmax would show
    a first-step difference of the order of the logits themselves (issue 24, H200: int8
    0.62 against 0.024 at prefill), which says nothing about the decode step's numerics.
    ``hf`` takes no given token: its step is fed its own.
    """
    import inspect

    if first_token is not None and "first_token" in inspect.signature(engine.first_logits).parameters:
        pre, step = engine.first_logits(prompts, first_token=first_token)
        return [pre.float().cpu(), step.float().cpu(), True]
    pre, step = engine.first_logits(prompts)
    fed = first_token is None or bool((pre.argmax(-1).cpu() == first_token.cpu()).all())
    return [pre.float().cpu(), step.float().cpu(), fed]


def _agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, float]:
    same = total = 0
    prefix = []
    for g, w in zip(got, want, strict=True):
        same += sum(x == y for x, y in zip(g, w, strict=True))
        total += len(w)
        prefix.append(next((i for i, (x, y) in enumerate(zip(g, w)) if x != y), len(w)))
    return {"same_token_fraction": same / total, "mean_identical_prefix": sum(prefix) / len(prefix)}


def _dtype(precision: str, device: str, override: str | None) -> str:
    """The model's dtype: --dtype, else float32 on CPU (bfloat16 for bf16), else the precision's."""
    from llmenergy.arch import PRECISION_DTYPE

    if override:
        return override
    if device == "cpu":
        return "bfloat16" if precision == "bf16" else "float32"
    return PRECISION_DTYPE[precision]


def _weight_bytes(model: Any, engine: Any) -> int:
    """Bytes a decode step reads of the weights: the model's parameters, plus the compiled
    engine's narrow linears when it quantised them (the model's 16-bit copies are released)."""
    from llmenergy.inference import quant
    from llmenergy.inference.model import num_bytes

    linears = getattr(engine, "linears", None)
    if linears is None or getattr(engine, "quant_backend", "dense") == "dense":
        return num_bytes(model)
    return num_bytes(model) + quant.linear_bytes(linears)


#: ``--sdpa-off`` names: the torch.backends.cuda switch of each attention backend
SDPA_SWITCHES = {"cudnn": "enable_cudnn_sdp", "flash": "enable_flash_sdp",
                 "efficient": "enable_mem_efficient_sdp", "math": "enable_math_sdp"}


def _inductor_config(pairs: list[str]) -> dict[str, Any]:
    """Set ``torch._inductor.config`` from ``KEY=VALUE`` (VALUE as JSON; else a string)."""
    import torch._inductor.config as config

    done: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        *path, name = key.split(".")  # triton.cudagraphs: config.triton's cudagraphs
        owner: Any = config
        for part in path:
            owner = getattr(owner, part, None)
        if not sep or owner is None or not hasattr(owner, name):
            raise SystemExit(f"--inductor {pair!r}: expected KEY=VALUE with KEY in torch._inductor.config")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(owner, name, value)
        done[key] = value
    return done


def _write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


def _table(results: dict[str, Any]) -> str:
    """One line per (precision, engine, batch): tok/s, share of the bound, J/token, and the
    speed-up over fp16 of the same engine and batch, in all and in decode alone (the prefill
    of an eager engine is bound by the host: docs/precision.md)."""
    fp16 = {(r["engine"], r["batch"]): r for r in results["runs"] if r["precision"] == "fp16"}
    lines = ["precision engine     batch    tok/s  bound  J/token  vs fp16  decode vs fp16  backend"]
    for r in results["runs"]:
        base = fp16.get((r["engine"], r["batch"]))
        speed = "-" if base is None else f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
        dec = ("-" if base is None or not base.get("decode_tokens_per_s")
               or r.get("decode_tokens_per_s") is None
               else f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x")
        jpt = "-" if r["j_per_token"] is None else f"{r['j_per_token']:.4f}"
        frac = "-" if r["bound_fraction"] is None else f"{r['bound_fraction']:.2f}"
        lines.append(f"{r['precision']:9s} {r['engine']:10s} {r['batch']:5d} {r['tokens_per_s']:8.1f}  "
                     f"{frac:>5s}  {jpt:>7s}  {speed:>7s}  {dec:>14s}  {r['quant_backend']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llmenergy.arch import ENGINES, PRECISIONS, precision_problem

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama-7b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true",
                   help="llama-tiny on the CPU, batches 1 4, 16 generated, short windows (a smoke run)")
    p.add_argument("--dtype", default=None,
                   help="the model's dtype; default: the precision's on cuda, float32 on cpu (bf16: bfloat16)")
    p.add_argument("--engines", nargs="+", default=["reference", "compiled"], choices=list(ENGINES))
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=list(PRECISIONS),
                   help="one model per precision; int8/fp8 run on the compiled engine only")
    p.add_argument("--anchor-precisions", nargs="+", default=["fp16"], choices=list(PRECISIONS),
                   help="the precisions that reference and hf run (compiled runs all): each hf "
                        "precision costs a compile per batch size")
    p.add_argument("--quant-backend", choices=["auto", "triton", "torchao", "torch"], default="auto",
                   help="int8/fp8 kernels (llmenergy.inference.quant); auto: on CUDA our Triton kernel "
                        "when triton imports, else torchao when it imports")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="default 1 16 64; 1 16 with more than one precision")
    p.add_argument("--prompt", type=int, default=64, help="longest prompt (lengths in [P/2, P])")
    p.add_argument("--shortest-prompt", type=int, default=None,
                   help="shortest prompt (default P/2; P: every prompt P tokens, as a cell's cut prompts)")
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--min-window-s", type=float, default=5.0)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bandwidth, B/s (default: the GPU's datasheet figure, BANDWIDTHS)")
    p.add_argument("--cache-dir", default="/tmp/llmenergy-inductor", help="TORCHINDUCTOR_CACHE_DIR")
    p.add_argument("--port", type=int, default=29513)
    p.add_argument("--barrier", action="store_true",
                   help="an NCCL barrier after the process group starts, as a cell's rank does "
                        "(session 16: the dense cells ran ~160 us a step slower through run-group)")
    p.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config KEY for every compile of this run (an A/B "
                        "experiment), e.g. coordinate_descent_tuning=true; VALUE is JSON")
    p.add_argument("--sdpa-off", nargs="+", default=[], choices=list(SDPA_SWITCHES),
                   help="turn these attention backends off process-wide before anything compiles "
                        "(the compiled decode step's attention; the prefill names its own)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.device, args.gen, args.prompt = "llama-tiny", "cpu", 16, 16
        args.min_window_s, args.max_reps = 0.2, 3
        args.batches = args.batches or [1, 4]
    if args.batches is None:
        args.batches = [1, 16] if len(args.precision) > 1 else [1, 16, 64]
    if args.quant_backend != "auto":
        os.environ["LLMENERGY_QUANT_BACKEND"] = args.quant_backend

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmenergy").setLevel(logging.INFO)  # compile times, tuned kernels
    inductor = _inductor_config(args.inductor)
    for name in args.sdpa_off:
        getattr(torch.backends.cuda, SDPA_SWITCHES[name])(False)

    from llmenergy.arch import engine_switches
    from llmenergy.inference import tp, weights
    from llmenergy.inference.engines import kept_with, make_engine, room_for

    uuid = None
    if args.device == "cuda":
        from _single_gpu import init_rank

        dev, uuid = init_rank(args.port)
        if args.barrier:
            import torch.distributed as dist

            dist.barrier()
    else:
        dev = torch.device("cpu")
        tp.init_model_parallel(1)
    nvml = Nvml(uuid)
    out = Path(args.out)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    if args.bandwidth is None:
        args.bandwidth = next((bw for key, bw in BANDWIDTHS if key in gpu), 4.8e12)
    results: dict[str, Any] = {
        "arch": args.arch, "device": str(dev), "precisions": args.precision,
        "gpu": gpu,
        "torch": torch.__version__, "python": platform.python_version(), "gen": args.gen,
        "bandwidth_b_per_s": args.bandwidth, "inductor": inductor, "sdpa_off": args.sdpa_off,
        "engine_switches": engine_switches(),
        "runs": [], "comparison": [], "skipped": [], "models": [],
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - recorded, the fallback runs
        results["triton"] = f"unavailable: {exc}"
    try:
        import torchao

        results["torchao"] = torchao.__version__
    except Exception as exc:  # noqa: BLE001 - recorded, the fallback runs
        results["torchao"] = f"unavailable: {exc}"
    if "hf" in args.engines:
        import transformers

        results["transformers"] = transformers.__version__
    tokens: dict[tuple[str, str, int], Any] = {}
    logits: dict[tuple[str, str, int], Any] = {}
    first: dict[int, Any] = {}  # per batch: the first run's first token, fed to every engine's first step
    pool: list[list[int]] = []
    built = 0  # engines made in this process so far
    # Dynamo entries kept per engine kind since the last reset, as the worker counts them: an
    # engine built after a reset decoded ~3.5 % slower on an H200 (sessions 20-21), so reset
    # only where the next engine has no room (hf: unknown, so a reset before each later one)
    kept: dict[str, int | None] = {}
    resets = 0
    for precision in args.precision:
        names = [e for e in args.engines if e == "compiled" or precision in args.anchor_precisions]
        for name in args.engines:
            why = precision_problem(precision, name, "cpu")
            if why is None and name not in names:
                why = f"{precision} not in --anchor-precisions"
            if why is not None:
                results["skipped"].append({"precision": precision, "engine": name, "reason": why})
                print(f"skip {precision} {name}: {why}", flush=True)
        names = [e for e in names if precision_problem(precision, e, "cpu") is None]
        if not names:
            continue
        dtype = getattr(torch, _dtype(precision, args.device, args.dtype))
        model, info = weights.build(args.arch, "synthetic", device=dev, dtype=dtype, seed=0,
                                    max_batch_size=max(args.batches),
                                    max_seq_len=args.prompt + args.gen)
        pool = pool or _prompts(max(args.batches), args.prompt, model.args.vocab_size, args.shortest_prompt)
        results["prompt_lengths"] = [len(q) for q in pool]
        results["models"].append({"precision": precision, "dtype": str(dtype).removeprefix("torch."),
                                  "load_s": info.load_duration_s})
        # compiled last: int8/fp8 release the model's 16-bit weights
        for name in sorted(names, key=lambda e: e == "compiled"):
            if name in kept and not room_for(kept[name], len(args.batches)):
                torch._dynamo.reset()
                kept, resets = {}, resets + 1
            engine = make_engine(name, model, cache_dir=args.cache_dir, precision=precision)
            built += 1
            wbytes = _weight_bytes(model, engine)
            backend = getattr(engine, "quant_backend", "dense")
            for bsz in args.batches:
                prompts = pool[:bsz]
                row = _measure(engine, prompts, args, nvml, dev, wbytes)
                tokens[precision, name, bsz] = row.pop("_tokens")
                logits[precision, name, bsz] = _first_logits(engine, prompts, first.get(bsz))
                first.setdefault(bsz, logits[precision, name, bsz][0].argmax(-1))
                results["runs"].append({"precision": precision, "engine": name, "quant_backend": backend,
                                        "weight_bytes": wbytes, "engines_before": built - 1,
                                        "resets_before": resets, **row,
                                        # what a cell of this engine records as provenance.load
                                        "load": (engine.load_provenance(bsz)
                                                 if hasattr(engine, "load_provenance") else None)})
                _fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                print(f"{precision:4s} {name:9s} bs{bsz:<3d} {row['tokens_per_s']:9.1f} tok/s  "
                      f"{_fmt(row['j_per_token'], '.4f')} J/tok  busy {_fmt(row['gpu_util_pct'], '.0f')}%  "
                      f"bound {_fmt(row['bound_fraction'], '.2f')}  decode {row['decode_s'] * 1e3:.2f} ms  "
                      f"{_fmt(row['mean_power_w'], '.0f')} W  compile {row['compile_s']:.1f} s  "
                      f"reps {row['reps']}  {backend}", flush=True)
                _write(out, results)
            kept[name] = kept_with(kept.get(name, 0), engine)
            del engine
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for (precision, name, bsz), got in sorted(logits.items()):
        # against the same precision's reference; int8/fp8/bf16 also against fp16's
        for base in {(precision, "reference"), ("fp16", "reference"), ("fp16", "compiled")}:
            key = (*base, bsz)
            if key not in logits or key == (precision, name, bsz) or (base[1] == "compiled" and
                                                                      ("fp16", "reference", bsz) in logits):
                continue
            want = logits[key]
            cmp = {"precision": precision, "engine": name, "batch": bsz,
                   "against": f"{base[0]} {base[1]}",
                   "prefill_logits_rel_diff": _rel(got[0], want[0]),
                   "first_token_same_fraction": _same_argmax(got[0], want[0]),
                   "first_step_logits_rel_diff": _rel(got[1], want[1]),
                   "first_step_same_input": got[2] and want[2],
                   **_agreement(tokens[precision, name, bsz], tokens[key])}
            results["comparison"].append(cmp)
            print(f"{precision} {name} vs {cmp['against']} bs{bsz}: logits rel diff prefill "
                  f"{cmp['prefill_logits_rel_diff']:.2e} "
                  f"(first token same {cmp['first_token_same_fraction']:.2f}), "
                  f"first step {cmp['first_step_logits_rel_diff']:.2e}"
                  f"{'' if cmp['first_step_same_input'] else ' (own first token)'}; "
                  f"same tokens {cmp['same_token_fraction']:.3f}, identical prefix "
                  f"{cmp['mean_identical_prefix']:.1f}", flush=True)
    _write(out, results)
    print(_table(results))
    print(f"wrote {out}")
    tp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
