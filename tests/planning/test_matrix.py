"""llmenergy.planning.matrix: the runtime estimate counts the windows the measure loop runs."""
from __future__ import annotations

from typing import Any

import pytest

from llmenergy import config
from llmenergy.planning.matrix import estimate_runtime_s, expand


def _estimate(repeats: int, **collector: Any) -> float:
    cfg = config.from_dict({
        "repeats": repeats,
        "models": {"tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
        "datasets": {"d": {"format": "alpaca", "path": "synthetic", "n_prompts": 4, "max_prompt_len": 32}},
        "gpus": {"T": {"partition": "p", "gpus_per_node": 1, "memory_gb": 8, "device": "cpu"}},
        "collector": {"backend": "none", "idle_baseline_s": 1, **collector},
        "matrix": [{"model": ["tiny"], "dataset": ["d"], "gpu": ["T"], "batch_size": [2], "max_gen_len": [8]}],
    })
    (cell,) = expand(cfg).cells
    return estimate_runtime_s(cfg, cell)


def test_each_repeat_lasts_at_least_its_minimum_window_plus_its_prefill_loop() -> None:
    bare = _estimate(3, min_window_s=0, prefill_window_s=0)
    repeats_s = bare - _estimate(1, min_window_s=0, prefill_window_s=0)  # two repeats of tiny batches
    assert 0 < repeats_s < 5  # far shorter than any window below
    # a 20 s window replaces each of the 3 short repeats
    assert _estimate(3, min_window_s=20, prefill_window_s=0) == pytest.approx(bare + 3 * 20 - 1.5 * repeats_s)
    # the prefill-only loop adds its window to each repeat, at least 10 collector intervals
    assert _estimate(3, min_window_s=0, prefill_window_s=5) == pytest.approx(bare + 3 * 5)
    assert _estimate(3, min_window_s=0, prefill_window_s=0.2, interval_ms=100) == pytest.approx(bare + 3 * 1.0)
    # unset, the defaults apply: 20 s and 5 s a repeat
    assert _estimate(2) == pytest.approx(_estimate(2, min_window_s=20, prefill_window_s=5))
    assert _estimate(2) > 2 * 25
