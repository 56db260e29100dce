"""llmenergy.planning.matrix: the precision axis (ids, feasibility, bytes per weight) and the
runtime estimate of the windows the measure loop runs."""
from __future__ import annotations

import json
from typing import Any

import pytest

from llmenergy import config
from llmenergy.arch import SIZES, weight_bytes
from llmenergy.cellfiles import AXES, Cell
from llmenergy.planning.groups import group_id
from llmenergy.planning.matrix import dtype_for, estimate_load_s, estimate_runtime_s, expand, memory_problem
from llmenergy.planning.plan import format_plan


def _cfg(**matrix: list[Any]) -> config.Config:
    gpu = {"partition": "p", "gpus_per_node": 8, "memory_gb": 80}
    data = {
        "models": {"tiny": {"arch": "llama-tiny"}, "m7": {"arch": "llama-7b"}},
        "datasets": {"alp": {"format": "alpaca", "path": "synthetic", "n_prompts": 4, "max_prompt_len": 64}},
        "gpus": {"H100": gpu, "V100": {**gpu, "memory_gb": 32}, "mystery": gpu,
                 "newgpu": {**gpu, "compute_capability": 9.0},
                 "cpu": {**gpu, "device": "cpu"}},
        "matrix": [{"model": ["m7"], "dataset": ["alp"], "gpu": ["H100"], **matrix}],
        "collector": {"min_window_s": 0, "prefill_window_s": 0},  # the decode estimate alone
    }
    return config.from_dict(data, check_files=False)


def test_ids_of_fp16_cells_are_unchanged_and_other_precisions_are_named() -> None:
    cell = Cell("m7", "alp", "H100", 1, 16, 256, None, "compiled")
    assert cell.precision == "fp16"
    assert cell.id == "m7_alp_H100_s1_b16_g256_pnone_compiled"
    int8 = Cell("m7", "alp", "H100", 1, 16, 256, None, "compiled", "int8")
    assert int8.id == "m7_alp_H100_s1_b16_g256_pnone_compiled_int8"
    assert AXES[-1] == "precision"
    old_record = {k: v for k, v in cell.identity().items() if k != "precision"}
    assert Cell.from_identity(old_record) == cell  # records written before the axis existed
    assert Cell.from_identity(int8.identity()) == int8
    assert group_id(cell) != group_id(int8)  # one model load holds one precision


def test_precisions_an_engine_or_gpu_cannot_run_are_left_out_with_their_reason() -> None:
    cfg = _cfg(gpu=["H100", "V100", "mystery", "newgpu"], engine=["reference", "compiled"],
               precision=["fp16", "bf16", "int8", "fp8"], model=["tiny"])
    plan = expand(cfg)
    planned = {(c.gpu, c.engine, c.precision) for c in plan.cells}
    reasons = {(i.cell.gpu, i.cell.engine, i.cell.precision): i.reason for i in plan.infeasible}
    assert {("H100", "compiled", p) for p in ("fp16", "bf16", "int8", "fp8")} <= planned
    assert ("newgpu", "compiled", "fp8") in planned  # compute_capability given
    assert ("mystery", "compiled", "bf16") in planned  # unknown GPUs are trusted with bf16
    assert "needs the compiled engine" in reasons["H100", "reference", "int8"]
    assert "engine reference" in reasons["H100", "reference", "fp8"]
    assert "V100 × fp8: needs compute capability ≥ 8.9, V100 has 7" in reasons["V100", "compiled", "fp8"]
    assert "V100 × bf16: needs compute capability ≥ 8" in reasons["V100", "compiled", "bf16"]
    assert "gpus.mystery.compute_capability" in reasons["mystery", "compiled", "fp8"]
    assert len(planned) + len(reasons) == 4 * 2 * 4


def test_dtype_and_bytes_follow_the_precision() -> None:
    cfg = _cfg(engine=["compiled"], precision=["fp16", "bf16", "int8"], batch_size=[1])
    cells = {c.precision: c for c in expand(cfg).cells}
    assert [dtype_for(cfg, cells[p]) for p in ("fp16", "bf16", "int8")] == ["float16", "bfloat16", "float16"]
    # int8 halves the bytes a decode step reads (and so the estimated decode time) ...
    def decode_s(cell: Cell) -> float:
        return estimate_runtime_s(cfg, cell) - estimate_load_s(cfg, cell)

    assert estimate_load_s(cfg, cells["int8"]) == estimate_load_s(cfg, cells["fp16"])
    # a bf16 job loads the weights twice (fp16 for its logit references, then bf16), hf's once
    fp16_s, bf16_s = estimate_load_s(cfg, cells["fp16"]), estimate_load_s(cfg, cells["bf16"])
    assert fp16_s + 10 < bf16_s < 2 * fp16_s  # 13.5 GB more at ~1 GB/s; one process start
    hf = _cfg(engine=["hf"], precision=["fp16", "bf16"], batch_size=[1])
    assert len({estimate_load_s(hf, c) for c in expand(hf).cells}) == 1
    assert decode_s(cells["int8"]) < 0.7 * decode_s(cells["fp16"])
    # ... but not the load peak: weights are quantised after loading in float16
    small = config.from_dict({**cfg.raw, "gpus": {"H100": {"partition": "p", "gpus_per_node": 8,
                                                           "memory_gb": 12}}}, check_files=False)
    assert memory_problem(small, cells["int8"]) is not None
    cpu = _cfg(gpu=["cpu"], model=["tiny"], engine=["compiled"], precision=["bf16", "fp8"])
    assert {dtype_for(cpu, c) for c in expand(cpu).cells} == {"float32"}


def test_weight_bytes_of_llama_7b_per_precision() -> None:
    args = SIZES["llama-7b"]
    assert weight_bytes(args, "float16") == 13_476_831_232
    # 6,476,005,376 block linear weights at one byte, the other 262,410,240 parameters at two,
    # and a float16 scale for each of 32 × 42,496 output channels
    assert weight_bytes(args, "float16", "int8") == 6_476_005_376 + 2 * 262_410_240 + 2 * 1_359_872
    assert weight_bytes(args, "float16", "fp8") == weight_bytes(args, "float16", "int8")


def test_plan_carries_the_precision_column() -> None:
    cfg = _cfg(engine=["compiled"], precision=["fp16", "fp8"])
    doc = json.loads(format_plan(cfg, fmt="json"))
    assert sorted(c["precision"] for c in doc["cells"]) == ["fp16", "fp8"]
    assert any(c["cell_id"].endswith("_compiled_fp8") for c in doc["cells"])


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
