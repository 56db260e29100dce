"""Run a function in N real processes joined by torch.distributed (gloo, CPU).

Each process initialises the default group through a file store, then fairscale
model parallel of size N, calls ``fn(rank, *args)``, and sends back its return
value.  Workers used by several test files live here too (module-level so that
spawned processes can import them).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

# One thread per rank: ranks share the test machine's few cores.
_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _entry(rank: int, world_size: int, workdir: str, fn: Callable[..., Any],
           args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    from llmenergy.inference import tp

    torch.set_num_threads(1)
    out = Path(workdir)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank,
                                world_size=world_size)
        tp.init_model_parallel(world_size)
        result = fn(rank, *args)
        torch.save(result, out / f"result.{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent
        (out / f"error.{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        tp.shutdown()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              timeout_s: float = 120.0) -> list[Any]:
    """``[fn(0, *args), ..., fn(N-1, *args)]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    with tempfile.TemporaryDirectory(prefix="llmenergy-dist-") as workdir:
        try:
            procs = [ctx.Process(target=_entry, args=(r, world_size, workdir, fn, args))
                     for r in range(world_size)]
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = sorted(Path(workdir).glob("error.*.txt"))
        if errors:
            raise AssertionError("rank failed:\n" + errors[0].read_text())
        if any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"ranks exited with {[p.exitcode for p in procs]}")
        return [torch.load(Path(workdir) / f"result.{r}.pt", weights_only=False)
                for r in range(world_size)]


# ------------------------------------------------------------------ workers

def logits_worker(rank: int, arch: Any, weights: str, tokens: torch.Tensor,
                  seed: int = 0) -> torch.Tensor:
    """Build ``arch`` with ``weights`` on CPU fp32 and return logits for ``tokens``."""
    from llmenergy.inference import weights as W

    model, _ = W.build(arch, weights, device="cpu", dtype=torch.float32, seed=seed,
                       max_batch_size=tokens.shape[0], max_seq_len=tokens.shape[1])
    with torch.inference_mode():
        return model(tokens, 0)


def probe_worker(rank: int, arch: Any, weights: str, tokens: torch.Tensor) -> dict[str, Any]:
    """Logits for ``tokens``, the gathered full state dict and the LoadInfo of a model
    built with ``weights`` on N ranks."""
    from llmenergy.inference import checkpoint
    from llmenergy.inference import weights as W

    model, info = W.build(arch, weights, device="cpu", dtype=torch.float32,
                          max_batch_size=tokens.shape[0], max_seq_len=tokens.shape[1])
    with torch.inference_mode():
        logits = model(tokens, 0)
    return {"logits": logits, "state": checkpoint.full_state_dict(model),
            "info": info.to_dict()}


def reshard_worker(rank: int, arch: Any, src: str, dst: str) -> None:
    """Load checkpoint ``src`` on N ranks and write it back as an MP-N checkpoint ``dst``."""
    from llmenergy.inference import checkpoint
    from llmenergy.inference import weights as W

    model, _ = W.build(arch, src, device="cpu", dtype=torch.float32, max_batch_size=1,
                       max_seq_len=8)
    checkpoint.save_sharded(model, dst, rank=rank)


def generate_worker(rank: int, arch: Any, prompts: list[list[int]],
                    max_gen_len: int) -> list[list[int]]:
    """Greedy generation on N ranks with synthetic weights."""
    from llmenergy.inference import generate as G
    from llmenergy.inference import weights as W

    longest = max(len(p) for p in prompts)
    model, _ = W.build(arch, "synthetic", device="cpu", dtype=torch.float32,
                       max_batch_size=len(prompts), max_seq_len=longest + max_gen_len)
    return G.generate(model, prompts, max_gen_len, eos_id=None, stop_at_eos=False).tokens


def engines_worker(rank: int, arch: Any, prompts: list[list[int]], max_gen_len: int,
                   compile: bool = False) -> dict[str, Any]:
    """Both engines on one model (synthetic weights, seed 1): tokens with EOS ignored and
    with ``stop_at_eos`` (EOS = the third token of sequence 0), per engine."""
    from llmenergy.inference import weights as W
    from llmenergy.inference.engines import make_engine

    longest = max(len(p) for p in prompts)
    model, _ = W.build(arch, "synthetic", device="cpu", dtype=torch.float32, seed=1,
                       max_batch_size=len(prompts), max_seq_len=longest + max_gen_len)
    engines = [make_engine("reference", model), make_engine("compiled", model, compile=compile)]
    eos = engines[0].generate(prompts, max_gen_len, eos_id=None, stop_at_eos=False).tokens[0][2]
    out: dict[str, Any] = {"eos": eos}
    for engine in engines:
        engine.prepare()
        free = engine.generate(prompts, max_gen_len, eos_id=eos, stop_at_eos=False)
        stop = engine.generate(prompts, max_gen_len, eos_id=eos, stop_at_eos=True)
        out[engine.name] = {"free": free.tokens, "stop": stop.tokens, "stop_out": stop.tokens_out,
                            "stop_steps": stop.decode_steps, "logits": engine.first_logits(prompts),
                            "prefill_compiled": sorted(getattr(engine, "_prefill_ready", ())),
                            "key_buckets": getattr(engine, "key_buckets", None)}
    return out


def precision_worker(rank: int, arch: Any, prompts: list[list[int]], max_gen_len: int,
                     precisions: tuple[str, ...] = ("int8", "fp8")) -> dict[str, Any]:
    """Per weight-only precision, on N ranks (synthetic weights, seed 1, fp32 activations):
    the compiled engine on quantised weights, the reference on the same model with each
    local weight replaced by its dequantised value, and the reference on the original
    weights: greedy tokens and first logits of each."""
    from llmenergy.inference import quant
    from llmenergy.inference import weights as W
    from llmenergy.inference.engines import make_engine

    longest = max(len(p) for p in prompts)

    def build() -> Any:
        return W.build(arch, "synthetic", device="cpu", dtype=torch.float32, seed=1,
                       max_batch_size=len(prompts), max_seq_len=longest + max_gen_len)[0]

    def run(engine: Any) -> dict[str, Any]:
        tokens = engine.generate(prompts, max_gen_len, eos_id=None, stop_at_eos=False).tokens
        return {"tokens": tokens, "logits": engine.first_logits(prompts)}

    model = build()
    out: dict[str, Any] = {"fp32": run(make_engine("reference", model))}
    for precision in precisions:
        dense = build()
        with torch.no_grad():
            for layer in dense.layers:
                a, ff = layer.attention, layer.feed_forward
                for m in (a.wq, a.wk, a.wv, a.wo, ff.w1, ff.w2, ff.w3):
                    q, scale = quant.quantize(m.weight, precision)
                    m.weight.copy_(quant.dequantize(q, scale, m.weight.dtype))
        narrow = build()
        engine = make_engine("compiled", narrow, precision=precision)
        out[precision] = {"compiled": run(engine), "dequantised": run(make_engine("reference", dense)),
                          "backend": engine.quant_backend,
                          "linear_bytes": quant.linear_bytes(engine.linears)}
    return out


def tune_worker(rank: int, us_by_rank: list[dict[str, float]]) -> dict[str, Any]:
    """:func:`narrow_mm.tune` on N ranks, each timing the candidates as ``us_by_rank[rank]``
    says (a fake timer: no GPU here; configs not named take 10 us), agreeing through
    :func:`tp.slowest` over the model-parallel group: the config chosen and its timings."""
    import functools

    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    from llmenergy.inference import narrow_mm as nm
    from llmenergy.inference import tp

    def fake_rank_timer(pairs: Any, cfg: dict[str, int], dtype: torch.dtype) -> float:
        return us_by_rank[rank].get(nm.config_name(cfg), 10.0)

    q = torch.randint(-127, 128, (48, 72), dtype=torch.int8)
    agree = functools.partial(tp.slowest, group=get_model_parallel_group(), device=torch.device("cpu"))
    report = nm.tune([(q, torch.rand(48))], torch.float16, timer=fake_rank_timer, agree=agree)
    return report["48x72 int8"]

