"""A precision's cost in logits (inference/fidelity.py): the comparison's numbers on
hand-made logits, and the engine's per-position logits against the model's own forward."""
from __future__ import annotations

import math

import pytest
import torch

from llmenergy.arch import LOGIT_ENGINES
from llmenergy.inference import fidelity
from llmenergy.inference import weights as W
from llmenergy.inference.engines import make_engine

PROMPTS = [[1, 17, 300, 42, 9, 88, 5], [1, 640, 7], [1, 23, 23, 23, 23], [1, 5, 900, 31], [1, 2]]


def _model(batch: int, seq: int = 48, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=dtype, seed=1,
                       max_batch_size=batch, max_seq_len=seq)
    return model


def test_compare_on_two_positions_of_a_two_token_vocabulary() -> None:
    want = [torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]])]  # p = (1/2, 1/2) and (0.9, 0.1)
    got = [torch.tensor([[0.0, 0.0], [0.0, math.log(9.0)]])]  # the same, then (0.1, 0.9)
    fid = fidelity.compare(got, want)
    assert (fid.prompts, fid.positions) == (1, 2)
    assert fid.top1_agree == 0.5  # the second position's most likely token flips
    # KL((0.9, 0.1) || (0.1, 0.9)) = 0.8 ln 9 = 1.7578 nats; the first position adds 0
    assert fid.token_kl_nats == pytest.approx(0.8 * math.log(9.0) / 2, rel=1e-6)  # float32 inputs
    # |(-ln 9, ln 9)| / |(ln 9, 0)| = sqrt(2); the first position's reference is all zeros
    assert fid.logit_rel_diff_max == pytest.approx(math.sqrt(2), rel=1e-6)  # float32 inputs
    same = fidelity.compare(want, want)
    assert (same.logit_rel_diff, same.token_kl_nats, same.top1_agree) == (0.0, 0.0, 1.0)


def test_compare_refuses_logits_of_other_positions() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity.compare([torch.zeros(3, 4)], [torch.zeros(2, 4)])


def test_tail_logits_are_the_last_positions_of_each_prompt_whatever_the_chunking() -> None:
    model = _model(batch=4)

    def forward(tokens: torch.Tensor, n_pad: torch.Tensor | None, tail: int) -> torch.Tensor:
        return model(tokens, 0, n_pad=n_pad, tail=tail)

    chunked = fidelity.tail_logits(forward, PROMPTS, 2, torch.device("cpu"))
    alone = [fidelity.tail_logits(forward, [p], 1, torch.device("cpu"))[0] for p in PROMPTS]
    assert [len(t) for t in chunked] == [min(fidelity.FIDELITY_TAIL, len(p)) for p in PROMPTS]
    for got, want, p in zip(chunked, alone, PROMPTS, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # the last position is what generation's prefill picks the first token from
        full = model(torch.tensor([p]), 0, last_only=True)[0, -1]
        torch.testing.assert_close(got[-1], full, rtol=1e-4, atol=1e-4)


def test_the_compiled_engine_matches_the_reference_at_full_precision_and_not_at_int8() -> None:
    refs = fidelity.references(_model(batch=4), {"a": PROMPTS})
    dense = make_engine("compiled", _model(batch=4), precision="fp16", compile=False)
    same = fidelity.measure(dense, refs["a"])
    assert same.against == "float32" and same.positions == sum(len(p) for p in PROMPTS)
    assert same.logit_rel_diff < 1e-5 and same.top1_agree == 1.0
    narrow = make_engine("compiled", _model(batch=4), precision="int8", compile=False)
    cost = fidelity.measure(narrow, refs["a"])
    # int8 per-channel weights: about 1.3% on the tiny model (tests/inference/test_quant.py)
    assert 1e-3 < cost.logit_rel_diff < 0.03 and cost.top1_agree > 0.8


def test_a_cell_without_a_reference_says_why() -> None:
    engine = make_engine("compiled", _model(batch=2), precision="int8", compile=False)
    assert "no fp16 reference" in (fidelity.measure(engine, None).reason or "")


def test_the_reference_engine_compares_a_bf16_model_with_the_fp16_weights_loaded_apart() -> None:
    """bf16 has no fp16 weights in its load: the references come from a model of their own,
    and the record names that model's dtype, not the cell's."""
    refs = fidelity.references(_model(batch=4), {"a": PROMPTS})
    bf16 = fidelity.measure(make_engine("reference", _model(batch=4, dtype=torch.bfloat16)), refs["a"])
    assert bf16.against == "float32" and bf16.positions == sum(len(p) for p in PROMPTS)
    # bfloat16's 8-bit mantissa: about 1 % in the logits (weights and activations), not 0
    assert 1e-3 < bf16.logit_rel_diff < 0.05 and bf16.top1_agree > 0.8


def test_inf_or_nan_logits_of_the_engine_fail_and_of_the_reference_are_a_reason() -> None:
    want = [torch.zeros(3, 4), torch.zeros(2, 4)]
    got = [torch.zeros(3, 4), torch.tensor([[0.0, float("nan"), 0.0, 0.0], [0.0, 0.0, float("inf"), 0.0]])]
    with pytest.raises(fidelity.NonFiniteLogits, match="inf/NaN at 2 of 5 prompt positions"):
        fidelity.compare(got, want)
    fid = fidelity.compare(want, got)
    assert fid.logit_rel_diff is None and "reference logits are inf/NaN at 2 of 5" in (fid.reason or "")


def test_the_engines_a_bf16_job_loads_fp16_weights_for_can_use_them() -> None:
    model = _model(batch=2)
    for name in LOGIT_ENGINES:
        engine = make_engine(name, model, compile=False) if name == "compiled" else make_engine(name, model)
        assert callable(getattr(engine, "tail_logits", None)), name
