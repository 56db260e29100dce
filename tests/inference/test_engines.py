"""Engines: ``compiled`` gives the reference's greedy tokens (fp32, CPU) at shards 1, 2, 4."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import engines_worker, run_ranks

from llmenergy.arch import ENGINES, engine_problem
from llmenergy.errors import UserError
from llmenergy.inference import generate as G
from llmenergy.inference import weights as W
from llmenergy.inference.engines import make_engine

# different lengths: the batch is left-padded
PROMPTS = [[1, 17, 300, 42, 9, 88, 5], [1, 640, 7], [1, 23, 23, 23, 23], [1, 5, 900, 31]]
GEN = 12


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                   max_batch_size=4, max_seq_len=24)
    return m


@pytest.fixture(scope="module")
def one_rank() -> dict:
    return engines_worker(0, "llama-tiny", PROMPTS, GEN)


def _check_same_answers(out: dict) -> None:
    ref, comp = out["reference"], out["compiled"]
    assert comp["free"] == ref["free"]
    assert all(len(t) == GEN for t in comp["free"])
    assert len(set(map(tuple, ref["free"]))) == len(PROMPTS)  # not a degenerate model
    assert comp["stop"] == ref["stop"] and comp["stop_out"] == ref["stop_out"]
    assert ref["stop"] != ref["free"]  # EOS did cut something
    for got, want in zip(comp["logits"], ref["logits"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_matches_reference_on_one_rank(one_rank: dict) -> None:
    _check_same_answers(one_rank)


@pytest.mark.parametrize("shards", [2, 4])
def test_compiled_matches_reference_on_several_ranks(shards: int, one_rank: dict) -> None:
    ranks = run_ranks(engines_worker, shards, "llama-tiny", PROMPTS, GEN)
    for out in ranks:
        _check_same_answers(out)
        assert out["compiled"]["free"] == one_rank["reference"]["free"]
        assert out["compiled"]["stop"] == one_rank["reference"]["stop"]


def test_batch_smaller_than_the_cache_matches_each_prompt_alone(model: torch.nn.Module) -> None:
    engine = make_engine("compiled", model)
    engine.generate(PROMPTS, GEN, eos_id=None, stop_at_eos=False)  # fill all rows of the cache
    for p in PROMPTS[:2]:
        alone = G.generate(model, [p], GEN, eos_id=None, stop_at_eos=False).tokens
        assert engine.generate([p], GEN, eos_id=None, stop_at_eos=False).tokens == alone


def test_stop_at_eos_ends_early_and_counts_steps(model: torch.nn.Module) -> None:
    engine = make_engine("compiled", model)
    first = engine.generate([PROMPTS[0]], 1, eos_id=None, stop_at_eos=False).tokens[0][0]
    result = engine.generate([PROMPTS[0]], GEN, eos_id=first, stop_at_eos=True)
    assert result.tokens == [[]] and result.decode_steps == 0 and result.tokens_out == 0
    ref = G.generate(model, PROMPTS, GEN, eos_id=None, stop_at_eos=False).tokens
    eos = ref[1][3]  # sequence 1 ends at its 4th token, the others may go on
    got = engine.generate(PROMPTS, GEN, eos_id=eos, stop_at_eos=True)
    want = G.generate(model, PROMPTS, GEN, eos_id=eos, stop_at_eos=True)
    assert got.tokens == want.tokens
    assert want.decode_steps <= got.decode_steps <= GEN - 1


def test_phases_and_counts(model: torch.nn.Module) -> None:
    calls: list[tuple[str, int, int]] = []
    engine = make_engine("compiled", model)
    engine.prepare(lambda *a: calls.append(a))
    assert calls == []  # nothing is compiled on CPU by default
    result = engine.generate(PROMPTS, 5, eos_id=None, stop_at_eos=False,
                             on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["prefill", "decode"]
    (_, p0, p1), (_, d0, d1) = calls
    assert p0 < p1 == d0 < d1
    assert result.decode_steps == 4 and result.tokens_out == 20
    assert result.tokens_in == sum(map(len, PROMPTS))
    assert result.decode_duration_s == pytest.approx((d1 - d0) / 1e9)


def test_engine_uses_the_models_weights_and_cache_in_place() -> None:
    model, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=3,
                       max_batch_size=2, max_seq_len=16)
    engine = make_engine("compiled", model)
    caches = engine.caches(2)
    assert caches[0].data_ptr() == model.layers[0].attention.cache_k.data_ptr()
    assert caches[-1].data_ptr() == model.layers[-1].attention.cache_v.data_ptr()
    before = engine.first_logits([[1, 2, 3]])[0]
    with torch.no_grad():
        model.output.weight.mul_(2.0)  # the engine must see the change: no copy of the weights
    after = engine.first_logits([[1, 2, 3]])[0]
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_first_step_fed_a_given_token(model: torch.nn.Module) -> None:
    """Both engines' first decode step can be fed a token other than their own greedy one
    (the bench compares precisions on the same input); they agree on it."""
    ref, comp = make_engine("reference", model), make_engine("compiled", model)
    pre, own = ref.first_logits(PROMPTS)
    other = pre.argmin(-1)  # surely not the greedy token
    want = ref.first_logits(PROMPTS, first_token=other)
    got = comp.first_logits(PROMPTS, first_token=other)
    torch.testing.assert_close(got[0], pre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    assert float((want[1] - own).norm() / own.norm()) > 0.3  # the token was used
    torch.testing.assert_close(comp.first_logits(PROMPTS, first_token=pre.argmax(-1))[1], own,
                               rtol=1e-4, atol=1e-4)


def test_limits_and_errors(model: torch.nn.Module) -> None:
    engine = make_engine("compiled", model)
    with pytest.raises(ValueError, match="exceed the model cache"):
        engine.generate(PROMPTS, 20, eos_id=None, stop_at_eos=False)
    with pytest.raises(ValueError, match="exceed the model cache"):
        engine.generate(PROMPTS + [[1]], 2, eos_id=None, stop_at_eos=False)
    with pytest.raises(ValueError, match="no empty prompt"):
        engine.generate([[]], 2, eos_id=None, stop_at_eos=False)
    with pytest.raises(UserError, match="unknown engine 'fast'"):
        make_engine("fast", model)
    with pytest.raises(UserError, match="dtype torch.float16 differs"):
        make_engine("compiled", model, dtype=torch.float16)
    with pytest.raises(UserError, match="max_batch_size 8 differs"):
        make_engine("reference", model, max_batch_size=8)
    assert make_engine("reference", model, max_batch_size=4, max_seq_len=24, device="cpu",
                       dtype=torch.float32).name == "reference"


def test_engine_problem_is_torch_free_and_names_the_reason() -> None:
    assert ENGINES == ("reference", "compiled", "hf")
    assert engine_problem("compiled", 4) is None and engine_problem("reference", 1, "cpu") is None
    assert engine_problem("vllm", 1) == "unknown engine 'vllm' (known: reference, compiled, hf)"
    assert "one rank only" in engine_problem("hf", 2)
    assert "positive" in engine_problem("compiled", 0)
    import ast

    import llmenergy.arch as arch

    tree = ast.parse(Path(arch.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


def _ran_compiled_graph(fn) -> bool:  # noqa: ANN001
    """Whether ``fn()`` called an Inductor graph (its record function names the graph)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any("CompiledFxGraph" in e.name for e in prof.events())


@pytest.mark.slow
def test_torch_compile_on_cpu_gives_the_same_tokens(model: torch.nn.Module, tmp_path: Path) -> None:
    """Inductor (default mode, C++ on CPU), the decode step and the opt-in compiled prefill:
    ~30 s for a batch size on two cores."""
    from llmenergy.inference.compiled import CompiledEngine

    calls: list[tuple[str, int, int]] = []
    engine = CompiledEngine(model, compile=True, compile_prefill=True, cache_dir=tmp_path / "inductor")
    engine.prepare(lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["compile"]
    assert engine._prefill_ready == {model.max_batch_size}
    assert (engine.prefill_mode(model.max_batch_size), engine.prefill_mode(2)) == ("compiled", "eager")
    got = engine.generate(PROMPTS, GEN, eos_id=None, stop_at_eos=False,
                          on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["compile", "prefill", "decode"]
    assert got.tokens == G.generate(model, PROMPTS, GEN, eos_id=None, stop_at_eos=False).tokens
    assert any((tmp_path / "inductor").iterdir())
    other = [p + [11, 12, 13] for p in PROMPTS]  # another prompt length: the same graph
    with torch._dynamo.config.patch(error_on_recompile=True):  # neither loop recompiles
        again = engine.generate(PROMPTS, GEN - 3, eos_id=None, stop_at_eos=False)
        assert _ran_compiled_graph(lambda: engine.prefill_only(other))
    assert again.tokens == [t[: GEN - 3] for t in got.tokens]
    # what the graph does not cover runs eagerly, compiling nothing: a batch size not warmed,
    # and (in a warmed one) a shape whose guard fails, here a one-token prompt
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert not _ran_compiled_graph(lambda: engine.prefill_only(other[:2]))
        assert not _ran_compiled_graph(lambda: engine.prefill_only([[1]] * len(PROMPTS)))
    assert engine.generate(other, 4, eos_id=None, stop_at_eos=False).tokens == \
        G.generate(model, other, 4, eos_id=None, stop_at_eos=False).tokens


def test_key_buckets_cover_the_cache_in_at_most_eight_lengths() -> None:
    from llmenergy.inference.compiled import key_buckets

    assert key_buckets(24) == [24]  # a short cache: one length, the whole cache
    assert key_buckets(192) == [64, 128, 192]
    assert key_buckets(320) == [64, 128, 192, 256, 320]
    assert key_buckets(2048) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert key_buckets(4097)[-2:] == [4032, 4097] and len(key_buckets(4097)) == 8  # 576 apart
    assert key_buckets(2048, on=False) == [2048]


#: a cache long enough for three key lengths (64, 128, 136), prompts of 3-7 tokens and
#: generations that cross both boundaries
LONG_CACHE, LONG_GEN = 136, 129


@pytest.fixture(scope="module")
def long_model() -> torch.nn.Module:
    m, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                   max_batch_size=4, max_seq_len=LONG_CACHE)
    return m


def test_decode_over_key_lengths_gives_the_reference_tokens(
        long_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attending over the keys written so far, rounded up to a key length, instead of the
    whole cache: the same tokens as the reference engine and as the whole cache; the key
    length of each step's position is the smallest that covers it."""
    from llmenergy.inference.compiled import BUCKETS_ENV, CompiledEngine

    engine = CompiledEngine(long_model)
    assert engine.key_buckets == [64, 128, 136]
    assert [engine._keys_for(p).shape[0] for p in (0, 63, 64, 127, 128, 135)] == [64, 64, 128, 128, 136, 136]
    want = G.generate(long_model, PROMPTS, LONG_GEN, eos_id=None, stop_at_eos=False).tokens
    assert engine.generate(PROMPTS, LONG_GEN, eos_id=None, stop_at_eos=False).tokens == want
    assert engine.load_provenance(4)["decode_key_buckets"] == [64, 128, 136]
    assert engine.load_provenance(4)["dense_gemv"] is False  # cuBLAS's path (F.linear on CPU)
    monkeypatch.setenv(BUCKETS_ENV, "0")
    whole = CompiledEngine(long_model)
    assert whole.key_buckets == [LONG_CACHE]
    assert whole.generate(PROMPTS, LONG_GEN, eos_id=None, stop_at_eos=False).tokens == want


@pytest.mark.slow
def test_torch_compile_over_key_lengths_compiles_once(long_model: torch.nn.Module, tmp_path: Path) -> None:
    """The key length is symbolic in the one compiled decode graph: prepare compiles it once
    and runs every length; generating across all of them recompiles nothing (~40 s)."""
    from llmenergy.inference.compiled import CompiledEngine

    torch._dynamo.reset()  # the compiled code of other tests' engines (one code cache per function)
    engine = CompiledEngine(long_model, compile=True, compile_prefill=False,
                            cache_dir=tmp_path / "inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):  # a length per graph would fall
        engine.prepare()                                         # back to the whole cache
        got = engine.generate(PROMPTS, LONG_GEN, eos_id=None, stop_at_eos=False)
    assert engine.key_buckets == [64, 128, 136]
    assert got.tokens == G.generate(long_model, PROMPTS, LONG_GEN, eos_id=None, stop_at_eos=False).tokens


@pytest.mark.parametrize(("env", "compile", "want"), [
    (None, True, False),  # on CPU the prefill stays eager unless asked (on CUDA it compiles)
    ("1", True, True), ("0", True, False),
    ("1", False, False),  # nothing compiles without compile
])
def test_compiled_prefill_follows_the_environment_where_the_caller_does_not_say(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, env: str | None, compile: bool,
        want: bool) -> None:
    from llmenergy.inference.compiled import PREFILL_ENV, CompiledEngine

    if env is None:
        monkeypatch.delenv(PREFILL_ENV, raising=False)
    else:
        monkeypatch.setenv(PREFILL_ENV, env)
    assert CompiledEngine(model, compile=compile).compile_prefill is want
    assert CompiledEngine(model, compile=compile, compile_prefill=False).compile_prefill is False


@pytest.mark.slow
def test_torch_compile_with_functional_collectives_on_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-reduces and all-gathers inside the compiled graphs, the decode step's (over two
    key lengths: 70 generated after 7 prompt tokens cross 64) and the prefill's block (gloo):
    ~70 s on two cores."""
    from llmenergy.inference.compiled import PREFILL_ENV

    monkeypatch.setenv(PREFILL_ENV, "1")  # the ranks inherit it: the prefill compiles on CPU too
    for out in run_ranks(engines_worker, 2, "llama-tiny", PROMPTS[:2], 70, True, timeout_s=400):
        assert out["compiled"]["prefill_compiled"] == [2]
        assert out["compiled"]["key_buckets"] == [64, 77]
        assert out["compiled"]["free"] == out["reference"]["free"]
        assert out["compiled"]["stop"] == out["reference"]["stop"]


def _caches(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for layer in model.layers for t in (layer.attention.cache_k, layer.attention.cache_v)]


def _clear(model: torch.nn.Module) -> None:
    for layer in model.layers:
        layer.attention.cache_k.zero_()
        layer.attention.cache_v.zero_()


def test_prefill_only_is_the_prefill_of_generate(model: torch.nn.Module) -> None:
    """The prefill-only loop's call does the work of generate's prefill: the same KV cache,
    on either engine, and no compile for a batch size not seen before."""
    written = {}
    for name in ("reference", "compiled"):
        engine = make_engine(name, model)
        _clear(model)
        assert engine.prefill_only(PROMPTS[:3]) is None
        alone = _caches(model)
        _clear(model)
        engine.generate(PROMPTS[:3], 1, eos_id=None, stop_at_eos=False)  # prefill, no decode step
        for got, want in zip(alone, _caches(model), strict=True):
            torch.testing.assert_close(got, want)
        assert any(bool(c.abs().sum() > 0) for c in alone)
        written[name] = alone
    for got, want in zip(written["compiled"], written["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="exceed the model cache"):
        make_engine("reference", model).prefill_only([[1] * 30])


def test_dynamo_keeps_an_entry_per_batch_size_of_every_compiled_engine_as_the_worker_counts() -> None:
    """The worker keeps a job's compiled code while Dynamo has room (``engines.room_for``),
    counting an entry per batch size each compiled engine warmed (``compiled_entries``).
    Checked against Dynamo's own cache on CPU (~15 s of Inductor): the decode step's and the
    prefill block's entries are the sum over the engines, alive or dropped, and generating
    other prompt lengths adds none."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries

    from llmenergy.inference import model as M
    from llmenergy.inference.compiled import CompiledEngine
    from llmenergy.inference.engines import compiled_entries, new_entries

    def counts() -> tuple[int, int]:
        return len(entries(CompiledEngine._decode.__code__)), len(entries(CompiledEngine._block.__code__))

    torch._dynamo.reset()
    model, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                       max_batch_size=2, max_seq_len=16)
    first = CompiledEngine(model, compile=True, compile_prefill=True)
    first.warm(2)
    first.warm(1)
    first.generate([[1, 2, 3], [4, 5]], 3, eos_id=None, stop_at_eos=False)
    first.generate([[1, 2, 3, 4, 5]], 3, eos_id=None, stop_at_eos=False)
    assert compiled_entries(first) == 2 and counts() == (2, 2)
    del first
    M.resize_cache(model, 3, 16)
    second = CompiledEngine(model, compile=True, compile_prefill=True)
    assert new_entries(second, {3, 1}) == 2
    second.warm(3)
    second.generate([[1, 2, 3], [4, 5], [6]], 3, eos_id=None, stop_at_eos=False)
    assert compiled_entries(second) == 1 and counts() == (3, 3)  # the dropped engine's stay
    torch._dynamo.reset()
    assert counts() == (0, 0)
