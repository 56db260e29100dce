"""Engine ``hf`` (transformers' generate): the reference's greedy tokens (fp32, CPU, one rank)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from llmenergy.arch import LOGIT_ENGINES, ModelArgs, engine_problem
from llmenergy.errors import UserError
from llmenergy.inference import checkpoint
from llmenergy.inference import generate as G
from llmenergy.inference import hf as H
from llmenergy.inference import weights as W
from llmenergy.inference.engines import make_engine

pytest.importorskip("transformers")

# different lengths: the batch is left-padded
PROMPTS = [[1, 17, 300, 42, 9, 88, 5], [1, 640, 7], [1, 23, 23, 23, 23], [1, 5, 900, 31]]
GEN = 12


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                   max_batch_size=4, max_seq_len=24)
    return m


@pytest.fixture(scope="module")
def engine(model: torch.nn.Module) -> H.HFEngine:
    return make_engine("hf", model)


def test_same_tokens_as_reference_padded_batch(model: torch.nn.Module, engine: H.HFEngine) -> None:
    want = G.generate(model, PROMPTS, GEN, eos_id=None, stop_at_eos=False)
    got = engine.generate(PROMPTS, GEN, eos_id=want.tokens[0][2], stop_at_eos=False)
    assert len(set(map(tuple, want.tokens))) == len(PROMPTS)  # not a degenerate model
    assert got.tokens == want.tokens
    assert got.decode_steps == GEN - 1 and got.tokens_out == GEN * len(PROMPTS)
    for p, row in zip(PROMPTS[:2], want.tokens, strict=False):  # a batch of one, no padding
        assert engine.generate([p], GEN, eos_id=None, stop_at_eos=False).tokens == [row]


def test_stop_at_eos_matches_reference(model: torch.nn.Module, engine: H.HFEngine) -> None:
    free = G.generate(model, PROMPTS, GEN, eos_id=None, stop_at_eos=False).tokens
    eos = free[1][3]  # sequence 1 ends at its 4th token, the others may go on
    want = G.generate(model, PROMPTS, GEN, eos_id=eos, stop_at_eos=True)
    got = engine.generate(PROMPTS, GEN, eos_id=eos, stop_at_eos=True)
    assert want.tokens != free  # EOS did cut something
    assert got.tokens == want.tokens and got.tokens_out == want.tokens_out
    assert got.decode_steps == want.decode_steps
    first = free[0][0]
    alone = engine.generate([PROMPTS[0]], GEN, eos_id=first, stop_at_eos=True)
    assert alone.tokens == [[]] and alone.decode_steps == 0 and alone.tokens_out == 0


def test_first_logits_match_reference(model: torch.nn.Module, engine: H.HFEngine) -> None:
    want = make_engine("reference", model).first_logits(PROMPTS)
    for got, ref in zip(engine.first_logits(PROMPTS), want, strict=True):
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)


def test_static_cache_has_the_models_length_whatever_the_call(engine: H.HFEngine) -> None:
    """One cache shape for every call: a compiled decode step never sees a new shape."""
    out = engine._run([[1, 2]], engine._config(2, None, return_dict_in_generate=True))
    cache = getattr(out, "cache", None) or out.past_key_values
    assert type(cache).__name__ == "StaticCache"
    assert cache.layers[0].keys.shape == (1, 4, engine.max_seq_len, 32)


def test_phases_and_counts(engine: H.HFEngine) -> None:
    calls: list[tuple[str, int, int]] = []
    engine.prepare(lambda *a: calls.append(a))
    assert calls == []  # no compile on CPU by default
    result = engine.generate(PROMPTS, 5, eos_id=None, stop_at_eos=False,
                             on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["prefill", "decode"]
    (_, p0, p1), (_, d0, d1) = calls
    assert p0 < p1 == d0 < d1
    assert result.decode_steps == 4 and result.tokens_out == 20
    assert result.tokens_in == sum(map(len, PROMPTS))
    assert result.prefill_duration_s == pytest.approx((p1 - p0) / 1e9)
    assert result.decode_duration_s == pytest.approx((d1 - d0) / 1e9)
    calls.clear()
    engine.generate(PROMPTS, 1, eos_id=None, stop_at_eos=False, on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["prefill"]


def test_weights_shared_except_the_rotary_projections() -> None:
    model, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=3,
                       max_batch_size=2, max_seq_len=16)
    engine = make_engine("hf", model)
    layer = engine.hf.model.layers[0]
    assert layer.self_attn.v_proj.weight.data_ptr() == model.layers[0].attention.wv.weight.data_ptr()
    assert layer.self_attn.q_proj.weight.data_ptr() != model.layers[0].attention.wq.weight.data_ptr()
    before = engine.first_logits([[1, 2, 3]])[0]
    with torch.no_grad():
        model.output.weight.mul_(2.0)  # the engine must see the change: no copy of lm_head
    after = engine.first_logits([[1, 2, 3]])[0]
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_transformers_own_loader_agrees_with_the_conversion(model: torch.nn.Module, engine: H.HFEngine,
                                                           tmp_path: Path) -> None:
    """Our model written as an HF checkpoint, read back by ``from_pretrained``: same tensors."""
    import transformers

    checkpoint.save_hf_checkpoint(checkpoint.full_state_dict(model), model.args, tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs, ours = loaded.state_dict(), engine.hf.state_dict()
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


def test_limits_and_errors(model: torch.nn.Module, engine: H.HFEngine,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="exceed the model cache"):
        engine.generate(PROMPTS, 20, eos_id=None, stop_at_eos=False)
    with pytest.raises(ValueError, match="no empty prompt"):
        engine.generate([[]], 2, eos_id=None, stop_at_eos=False)
    assert engine_problem("hf", 1) is None and engine_problem("hf", 1, "cpu") is None
    assert engine_problem("hf", 2) == ("engine hf: runs one rank only (transformers' generate on "
                                       "the full weights), not 2 shards")
    monkeypatch.setattr(H.tp, "mp_world_size", lambda: 2)
    with pytest.raises(UserError, match="one rank only, not 2 shards"):
        make_engine("hf", model)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(UserError, match=r"^engine hf needs transformers: pip install 'llmenergy\[hf\]'$"):
        make_engine("hf", model)


def test_unmapped_architecture_field_is_refused() -> None:
    Scaled = dataclasses.make_dataclass("Scaled", [("sliding_window", object, None)], bases=(ModelArgs,),
                                        frozen=True)
    args = Scaled(dim=64, n_layers=1, n_heads=4, vocab_size=32, sliding_window={"size": 8})
    with pytest.raises(UserError, match=r"ModelArgs.sliding_window=\{'size': 8\} has no LlamaConfig"):
        H.hf_config(args, max_seq_len=16, dtype=torch.float32)
    assert H.hf_config(Scaled(dim=64, n_layers=1, n_heads=4, vocab_size=32), max_seq_len=16,
                       dtype=torch.float32).num_key_value_heads == 4


@pytest.mark.slow
def test_compile_on_cpu_reports_compile_and_gives_the_same_tokens(model: torch.nn.Module) -> None:
    """transformers' compile path forced on CPU (Inductor's C++): tens of seconds on two cores."""
    calls: list[tuple[str, int, int]] = []
    engine = make_engine("hf", model, compile=True)
    engine.prepare(lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["compile"]
    got = engine.generate(PROMPTS, GEN, eos_id=None, stop_at_eos=False, on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["compile", "prefill", "decode"]
    assert got.tokens == G.generate(model, PROMPTS, GEN, eos_id=None, stop_at_eos=False).tokens
    assert hasattr(engine.hf, "_compiled_call")  # transformers did compile its forward
    shorter = [p[:3] for p in PROMPTS]  # other prompt lengths, same cache shape: no recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = engine.generate(shorter, GEN - 3, eos_id=None, stop_at_eos=False)
    assert again.tokens == G.generate(model, shorter, GEN - 3, eos_id=None, stop_at_eos=False).tokens


@pytest.mark.parametrize("arch", ["llama2-tiny", "llama3.1-tiny"])
def test_families_with_gqa_and_rope_scaling_give_the_reference_tokens(arch: str) -> None:
    """GQA (Llama-3) and llama3 rope scaling (Llama-3.1) reach transformers' config."""
    m, _ = W.build(arch, "synthetic", device="cpu", dtype=torch.float32, seed=3, max_batch_size=4, max_seq_len=24)
    want = G.generate(m, PROMPTS, GEN, eos_id=None, stop_at_eos=False)
    engine = make_engine("hf", m)
    got = engine.generate(PROMPTS, GEN, eos_id=None, stop_at_eos=False)
    assert len(set(map(tuple, want.tokens))) == len(PROMPTS)
    assert got.tokens == want.tokens
    ref = make_engine("reference", m).first_logits(PROMPTS)
    for ours, theirs in zip(ref, engine.first_logits(PROMPTS), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_prefill_only_runs_hfs_prefill_without_warming_a_new_batch_size(model: torch.nn.Module) -> None:
    engine = make_engine("hf", model)
    assert 3 not in engine._ready
    assert engine.prefill_only(PROMPTS[:3]) is None
    assert 3 not in engine._ready  # prefill runs eagerly: nothing compiled for it
    with pytest.raises(ValueError, match="exceed the model cache"):
        engine.prefill_only([[1] * 30])


def test_a_bf16_cell_of_the_hf_engine_says_it_gives_no_per_position_logits(engine: H.HFEngine) -> None:
    """Whatever the references, the record names the engine, not a missing reference (a bf16
    job of this engine loads no fp16 weights for them: LOGIT_ENGINES)."""
    from llmenergy.inference import fidelity

    assert engine.name not in LOGIT_ENGINES
    assert fidelity.measure(engine, None).reason == "the hf engine cannot give per-position logits"
