"""Greedy generation: fixed work when EOS is ignored, padding, phases, multi-rank."""
from __future__ import annotations

import pytest
import torch
from dist_helpers import generate_worker, run_ranks

from llmenergy.inference import generate as G
from llmenergy.inference import weights as W

PROMPTS = [[1, 17, 300, 42, 9, 88, 5], [1, 640, 7], [1, 23, 23, 23, 23]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                   max_batch_size=4, max_seq_len=32)
    return m


def test_length_is_exactly_max_gen_len_when_eos_is_ignored(model: torch.nn.Module) -> None:
    first = G.generate(model, PROMPTS, 6, eos_id=None, stop_at_eos=False)
    eos = first.tokens[1][0]  # a token the model does produce, first of all for sequence 1
    result = G.generate(model, PROMPTS, 12, eos_id=eos, stop_at_eos=False)
    assert [len(t) for t in result.tokens] == [12, 12, 12]
    assert result.tokens[1][0] == eos
    assert result.tokens_out == 36 and result.decode_steps == 11
    assert result.tokens_in == sum(len(p) for p in PROMPTS)


def test_stop_at_eos_truncates_before_eos(model: torch.nn.Module) -> None:
    free = G.generate(model, PROMPTS, 8, eos_id=None, stop_at_eos=False).tokens
    eos = free[0][2]
    stopped = G.generate(model, PROMPTS, 8, eos_id=eos, stop_at_eos=True)
    for full, cut in zip(free, stopped.tokens):
        want = full[: full.index(eos)] if eos in full else full
        assert cut == want
    assert stopped.tokens_out == sum(len(t) for t in stopped.tokens) < 24


def test_stop_at_eos_ends_the_loop_when_all_sequences_finished(model: torch.nn.Module) -> None:
    prompt = [PROMPTS[0]]
    eos = G.generate(model, prompt, 1, eos_id=None, stop_at_eos=False).tokens[0][0]
    result = G.generate(model, prompt, 10, eos_id=eos, stop_at_eos=True)
    assert result.tokens == [[]] and result.decode_steps == 0


def test_left_padded_batch_matches_each_prompt_alone(model: torch.nn.Module) -> None:
    batch = G.generate(model, PROMPTS, 7, eos_id=None, stop_at_eos=False).tokens
    alone = [G.generate(model, [p], 7, eos_id=None, stop_at_eos=False).tokens[0]
             for p in PROMPTS]
    assert batch == alone
    assert len(set(map(tuple, batch))) == 3  # not a degenerate model


def test_prefill_and_decode_step_match_the_forward_pass(model: torch.nn.Module) -> None:
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        full = model(torch.tensor([PROMPTS[0] + [11]]), 0)
    assert torch.allclose(G.prefill(model, tokens), full[:, -2], atol=1e-5)
    step = G.decode_step(model, torch.tensor([[11]]), len(PROMPTS[0]))
    assert torch.allclose(step, full[:, -1], atol=1e-5)


def test_phase_callback_reports_contiguous_ns_windows(model: torch.nn.Module) -> None:
    calls: list[tuple[str, int, int]] = []
    result = G.generate(model, PROMPTS, 5, eos_id=None, stop_at_eos=False,
                        on_phase=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["prefill", "decode"]
    (_, p0, p1), (_, d0, d1) = calls
    assert p0 < p1 == d0 < d1
    assert p0 > 1_600_000_000 * 10**9  # wall clock in ns
    assert result.prefill_duration_s == pytest.approx((p1 - p0) / 1e9)
    assert result.decode_duration_s == pytest.approx((d1 - d0) / 1e9)


def test_too_long_for_the_cache(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="exceed the model cache"):
        G.generate(model, PROMPTS, 30, eos_id=None, stop_at_eos=False)
    with pytest.raises(ValueError, match="no empty prompt"):
        G.generate(model, [[]], 3, eos_id=None, stop_at_eos=False)


def test_two_ranks_generate_what_one_does() -> None:
    one = run_ranks(generate_worker, 1, "llama-tiny", PROMPTS, 6)
    two = run_ranks(generate_worker, 2, "llama-tiny", PROMPTS, 6)
    assert one[0] == two[0] == two[1]
    assert all(len(t) == 6 for t in one[0])


def test_split_at_eos_counts_the_tokens_produced_past_the_first_eos(model: torch.nn.Module) -> None:
    free = G.generate(model, PROMPTS, 10, eos_id=None, stop_at_eos=False)
    eos = free.tokens[0][3]  # the 4th token of sequence 0 serves as EOS
    result = G.generate(model, PROMPTS, 10, eos_id=eos, stop_at_eos=False)
    parts = result.split_at_eos(eos)
    for row, (answer, after) in zip(result.tokens, parts, strict=True):
        cut = row.index(eos) if eos in row else len(row)
        assert answer == row[:cut] and eos not in answer
        assert len(answer) + after == len(row) == 10
    assert parts[0][1] == 10 - free.tokens[0].index(eos)  # from the first EOS on, itself included
    assert result.tokens_out == 30  # every token the GPU produced
    assert result.split_at_eos(None) == [(row, 0) for row in result.tokens]
    stopped = G.generate(model, PROMPTS, 10, eos_id=eos, stop_at_eos=True)
    assert all(after == 0 for _, after in stopped.split_at_eos(eos))
    assert G.split_at_eos([5, 2, 7, 2], 2) == ([5], 3)
