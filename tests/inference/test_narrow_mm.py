"""narrow_mm (inference/narrow_mm.py): the Triton kernels' numerics through Triton's CPU
interpreter (a subprocess), the PyTorch path, and the registered op on CPU and under
torch.compile."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_ranks, tune_worker

from llmenergy.inference import narrow_mm as nm
from llmenergy.inference import quant

HELPER = Path(__file__).with_name("_narrow_interp.py")


def _qweights(precision: str, n: int = 48, k: int = 72) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return quant.quantize(w, precision)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is missing (pip install triton==3.9.0): no interpreter check")
def test_interpreted_kernels_are_within_fp32_accumulation_of_the_exact_product() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 2 * 9 + 5
    assert sum(c["config"] is not None for c in cases) == 7
    assert sorted(c["config"].get("LOAD", 0) for c in cases if c["config"]) == [0] * 5 + [1, 2]
    assert sum(c["weight"] == "16" for c in cases) == 3  # fp16 and bf16 weights, one row
    assert {c["m"] for c in cases} == {1, 3, 5, 16, 40}
    bad = [c for c in cases if not c["ratio"] <= 1.0]  # NaN (an unwritten output) fails too
    assert not bad, bad


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_is_the_dequantised_linear(precision: str, dtype: torch.dtype) -> None:
    q, scale = _qweights(precision)
    scale = scale.to(dtype)
    g = torch.Generator().manual_seed(1)
    for shape, fn in (((2, 5, 72), nm.narrow_mm), ((7, 72), nm.narrow_mm), ((7, 72), nm.eager)):
        x = torch.randn(*shape, generator=g).to(dtype)
        got = fn(x, q, scale)
        assert got.shape == (*shape[:-1], 48) and got.dtype == dtype
        torch.testing.assert_close(got, F.linear(x, q.to(dtype)) * scale, rtol=0, atol=0)
        want = F.linear(x.double(), quant.dequantize(q, scale, torch.float64))
        torch.testing.assert_close(got.double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def _compiled(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, backend: str,
              compile: bool = True) -> torch.Tensor:
    torch._dynamo.reset()
    return torch.compile(f, backend=backend, fullgraph=True)(x) if compile else f(x)


def _op_case() -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    q, scale = _qweights("int8")
    x = torch.randn(3, 4, 72, generator=torch.Generator().manual_seed(2))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(nm.narrow_mm(x, q, scale)) + 1.0

    return f, x, torch.relu(F.linear(x, q.float()) * scale) + 1.0


def test_op_runs_on_cpu_and_under_torch_compile_without_inductor() -> None:
    q, scale = _qweights("int8")
    x = torch.randn(5, 72)
    torch.testing.assert_close(torch.ops.llmenergy.narrow_mm(x, q, scale), F.linear(x, q.float()) * scale)
    f, x, want = _op_case()
    for backend in ("eager", "aot_eager"):  # aot_eager: the op's fake / functional path
        torch.testing.assert_close(_compiled(f, x, backend), want)  # fullgraph: no graph break


def test_op_under_inductor_on_cpu() -> None:
    f, x, want = _op_case()
    torch.testing.assert_close(_compiled(f, x, "inductor", compile=True), want)


def test_op_is_opaque_to_a_graph_with_the_row_count_symbolic() -> None:
    """The compiled prefill's op: one graph serves row counts on both sides of SMALL_M
    (the kernel-or-expression choice is the op's, at run time, not a guard of the graph)."""
    q, scale = _qweights("int8")
    torch._dynamo.reset()
    f = torch.compile(lambda x: nm.narrow_mm(x, q, scale) * 2.0, backend="aot_eager",
                      fullgraph=True, dynamic=False)
    x = torch.randn(1, 8, 72)
    torch._dynamo.mark_dynamic(x, 1, min=2, max=4096)
    torch.testing.assert_close(f(x), (F.linear(x, q.float()) * scale) * 2.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (3, nm.SMALL_M, nm.SMALL_M + 7, 300):
            x = torch.randn(1, rows, 72)
            torch.testing.assert_close(f(x), (F.linear(x, q.float()) * scale) * 2.0)


def test_mismatched_shapes_raise() -> None:
    q, scale = _qweights("fp8")
    with pytest.raises(ValueError, match="want x"):
        nm.narrow_mm(torch.randn(2, 71), q, scale)
    with pytest.raises(ValueError, match="want x"):
        nm.narrow_mm(torch.randn(2, 72), q, scale[:-1])
    with pytest.raises(ValueError, match="want x"):
        nm.eager(torch.randn(2, 71), q, scale)


def test_config_table_covers_small_batches_and_fills_the_gpu() -> None:
    for m in range(1, nm.SMALL_M + 1):
        for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
            cfg = nm._config(m, n, k)
            blocks = [v for key, v in cfg.items() if key.startswith("BLOCK_")]
            assert all(v & (v - 1) == 0 for v in blocks), cfg  # powers of two
            if m == 1:
                assert "BLOCK_M" not in cfg
            else:
                assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16  # tl.dot's minimum
            programs = -(-n // cfg["BLOCK_N"]) * -(-m // cfg.get("BLOCK_M", 1))
            assert programs >= 128, (m, n, cfg)  # an H200 has 132 SMs; no split-K


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fp16_path_does_not_overflow_where_the_narrow_values_outgrow_the_weight(precision: str) -> None:
    """A weight row of small magnitude: its narrow values are up to 127 (448 for e4m3) times
    larger than the weight itself, so ``x @ q.T`` alone passes float16's 65,504 while the
    true product is small (what made a 7B fp8 prefill inf on the H200)."""
    w = torch.full((4, 4096), 2e-3)
    w[:, ::2] = -1e-3
    q, scale = quant.quantize(w, precision)
    x = torch.ones(3, 4096, dtype=torch.float16)  # [1, -0.5, ...]·x: true outputs 1e-3 · 2048 = 2.05
    assert float((x.float() @ q.float().T).abs().max()) > 65504  # the product without the scale
    got = nm.narrow_mm(x, q, scale.to(torch.float16))
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got.float(), x.float() @ w.T, rtol=2e-2, atol=2e-2)


def test_warm_up_rows_reach_every_kernel_config() -> None:
    """The engine's warm-up launches :data:`narrow_mm.WARM_ROWS`: every row count a prefill
    or decode can take (1..SMALL_M) must use a config one of them compiled."""
    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        warmed = [nm._config(m, n, k) for m in nm.WARM_ROWS]
        assert all(nm._config(m, n, k) in warmed for m in range(1, nm.SMALL_M + 1)), (n, k)
        assert len({tuple(sorted(c.items())) for c in warmed}) == len(nm.WARM_ROWS)  # none wasted


def test_warm_launches_nothing_on_cpu() -> None:
    q, scale = _qweights("int8")
    assert nm.warm([(q, scale), (q, scale)], torch.float16) == 0


class FakeTimer:
    """Stands in for the GPU's CUDA-graph timing (no GPU here): microseconds per config
    name and shape, and a log of what was timed."""

    def __init__(self, us: dict[tuple[int, str], float], fail: set[str] = frozenset()) -> None:
        self.us, self.fail, self.calls = us, fail, []

    def __call__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], cfg: dict[str, int],
                 dtype: torch.dtype) -> float:
        name = nm.config_name(cfg)
        self.calls.append((pairs[0][0].shape[0], name, len(pairs)))
        if name in self.fail:
            raise RuntimeError("out of resources: shared memory")
        return self.us.get((pairs[0][0].shape[0], name), 10.0)


def test_tune_replaces_the_table_only_for_a_clearly_faster_config_once_per_shape(monkeypatch) -> None:
    monkeypatch.setattr(nm, "_tuned", {})
    table, c1, c2, c3 = (nm.config_name(c) for c in nm.GEMV_CANDIDATES)
    wide, narrow = _qweights("int8", 48, 72), _qweights("int8", 16, 72)
    fake_timer = FakeTimer({(48, table): 10.0, (48, c2): 8.0,     # 20 % faster: taken
                            (16, table): 10.0, (16, c1): 9.8},    # 2 %: noise, table kept
                           fail={c3})
    report = nm.tune([wide, narrow, wide], torch.float16, timer=fake_timer)
    assert report["48x72 int8"]["config"] == c2
    assert report["16x72 int8"]["config"] == table
    assert c3 not in report["48x72 int8"]["us"]  # the failing config is reported out
    assert {(n, k) for n, _, k in fake_timer.calls} == {(48, 2), (16, 1)}  # every weight of a shape
    assert nm._config(1, 48, 72, torch.int8) == nm.GEMV_CANDIDATES[2]
    assert nm._config(1, 48, 72, torch.float8_e4m3fn) == nm.GEMV_TABLE  # keyed by weight dtype
    assert "BLOCK_M" in nm._config(2, 48, 72, torch.int8)  # more rows: not the GEMV's
    assert nm.tuned() == {"16x72 int8": table, "48x72 int8": c2}
    assert nm.tuned(torch.float8_e4m3fn) == {}  # an fp8 engine lists its own shapes only
    before = len(fake_timer.calls)
    assert nm.tune([wide], torch.float16, timer=fake_timer) == {}  # once per shape and process
    assert len(fake_timer.calls) == before


def test_ranks_agree_on_the_tuned_config_by_their_slowest_time() -> None:
    """Two real ranks (gloo): alone, rank 0 would take candidate 2 and rank 1 candidate 1;
    agreeing on the slowest rank's time per candidate, both keep the table (nothing is 3 %
    faster on both). Then a candidate faster on both is taken by both."""
    table, c1, c2, _ = (nm.config_name(c) for c in nm.GEMV_CANDIDATES)
    split = [{table: 10.0, c2: 8.0}, {table: 10.0, c1: 7.0, c2: 12.0}]
    got = run_ranks(tune_worker, 2, split, timeout_s=120)
    assert [r["config"] for r in got] == [table, table]
    assert got[0]["us"] == got[1]["us"] == {table: 10.0, c1: 10.0, c2: 12.0, nm.config_name(nm.GEMV_CANDIDATES[3]): 10.0}
    both = [{table: 10.0, c1: 8.0}, {table: 9.0, c1: 8.5}]
    assert [r["config"] for r in run_ranks(tune_worker, 2, both, timeout_s=120)] == [c1, c1]


def test_tune_times_nothing_when_turned_off_or_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(nm, "_tuned", {})
    fake_timer = FakeTimer({})
    monkeypatch.setenv(nm.TUNE_ENV, "0")
    assert nm.tune([_qweights("fp8")], torch.float16, timer=fake_timer) == {}
    assert fake_timer.calls == []
    monkeypatch.delenv(nm.TUNE_ENV)
    assert nm.tune([_qweights("fp8")], torch.float16) == {}  # CPU: the kernel is not used
    assert nm.tuned() == {}



def test_compiled_kernel_linear_calls_the_opaque_op() -> None:
    """Under torch.compile our linears call ``llmenergy::narrow_mm`` as one opaque node: no
    Triton kernel traced into the graph (Inductor would generate each call site's launch)."""
    q, scale = _qweights("int8")
    lin = quant.KernelNarrowLinear(q, scale, torch.float32)
    x = torch.randn(1, 72)
    targets: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(lin, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert targets == ["llmenergy.narrow_mm.default"]
    torch.testing.assert_close(got, F.linear(x, q.float()) * scale)


def test_dense_linear_takes_the_op_only_for_one_static_row_when_compiled() -> None:
    """fp16/bf16 with the one-row kernel on (quant.use_gemv): a compiled graph with one row
    (the decode step at batch 1) calls ``llmenergy::narrow_mm`` on the 16-bit weight; more
    rows, a symbolic row count (the compiled prefill) and eager calls are ``F.linear``."""
    w = torch.randn(48, 72, generator=torch.Generator().manual_seed(3))
    lin = quant.DenseLinear(w)
    layers = [quant.Linears(lin, (16, 16, 16), lin, lin, 24, lin)]
    assert quant.use_gemv(layers, torch.device("cpu")) is False and lin.gemv is False
    lin.gemv = True  # as use_gemv turns it on on CUDA
    lin.register_buffer("ones", torch.ones(48), persistent=False)
    seen: list[list[str]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        seen.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    cases = [(torch.randn(1, 1, 72), False), (torch.randn(3, 1, 72), False),
             (torch.randn(1, 9, 72), True)]
    for x, dynamic in cases:
        torch._dynamo.reset()
        if dynamic:
            torch._dynamo.mark_dynamic(x, 1, min=2, max=4096)
        got = torch.compile(lin, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(got, F.linear(x, w))
    torch._dynamo.reset()
    assert ["llmenergy.narrow_mm.default" in targets for targets in seen] == [True, False, False]
