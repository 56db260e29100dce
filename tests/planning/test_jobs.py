"""llmenergy.planning.jobs: the one job request of every route, the partitions' limits read
from Slurm, and the split of a group too long for its partition (golden values)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmenergy import config
from llmenergy.cellfiles import Cell
from llmenergy.errors import ConfigError
from llmenergy.planning import jobs
from llmenergy.planning.groups import DEFAULT_PACKING, find_group, resolve_packing
from llmenergy.planning.jobs import (
    History,
    PartitionLimits,
    job_request,
    parse_sinfo_limits,
    read_history,
    retry_time_limit_min,
    split_by_time,
    time_limit_min,
)
from llmenergy.planning.matrix import expand

GID = "tiny_T_s1_pnone_reference"


def _cfg(tmp: Path, **gpu: Any) -> config.Config:
    """One group of four tiny cells, each estimated at 60.4–60.8 s (the 60 s load dominates)."""
    return config.from_dict({
        "output_dir": str(tmp / "results"), "repeats": 1,
        "models": {"tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
        "datasets": {"d": {"format": "alpaca", "path": "synthetic", "n_prompts": 2, "seed": 0,
                           "max_prompt_len": 32}},
        "gpus": {"T": {"partition": "short", "gpus_per_node": 2, "memory_gb": 8, "device": "cpu",
                       "cpus_per_gpu": 1, **gpu}},
        "collector": {"backend": "estimate", "estimate_tdp_w": 65, "interval_ms": 100, "idle_baseline_s": 0.2,
                      "min_window_s": 0, "prefill_window_s": 0},
        "matrix": [{"model": ["tiny"], "dataset": ["d"], "gpu": ["T"], "shards": [1], "batch_size": [1, 2],
                    "max_gen_len": [4, 6]}],
    })


def _record(path: Path, status: str, *, wall_s: float | None = None, limit_min: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "status": status,
                                "provenance": {"wall_s": wall_s, "slurm_time_limit_min": limit_min}}))


# ------------------------------------------------------------------ time limits

@pytest.mark.parametrize(("estimate_s", "minutes"), [
    (0, 15), (1, 15), (60, 15), (150, 15), (151, 16), (300, 20), (3600, 130), (36000, 1210),
])
def test_time_limit_is_twice_the_estimate_plus_ten_minutes_at_least_fifteen(estimate_s: float,
                                                                            minutes: int) -> None:
    assert time_limit_min(estimate_s) == minutes


@pytest.mark.parametrize(("base", "attempt", "status", "limit", "expected"), [
    (15, 1, None, None, 15), (15, 2, None, None, 30), (15, 3, "failed", 15, 45),
    (15, 1, "incomplete", 15, 30), (15, 1, "incomplete", 40, 80), (15, 1, "incomplete", None, 30),
    (15, 2, "incomplete", 20, 80), (100, 1, "incomplete", 20, 100),
])
def test_retry_time_limit_arithmetic(base: int, attempt: int, status: str | None, limit: int | None,
                                     expected: int) -> None:
    assert retry_time_limit_min(base, attempt, previous_status=status, previous_limit_min=limit) == expected


# ------------------------------------------------------------------ partitions

SINFO = """\
v100* infinite
a100 2-00:00:00
short 15:00
debug 30
gpu 4:00:00
gpu 1:00:00
odd UNLIMITED
long infinite
long 45

"""


def test_parse_sinfo_limits_golden() -> None:
    limits = parse_sinfo_limits(SINFO)
    assert limits == PartitionLimits(
        {"v100": None, "a100": 2880, "short": 15, "debug": 30, "gpu": 60, "odd": None, "long": 45},
        default="v100")
    assert limits.of("short") == 15 and limits.of(None) is None and limits.of("absent") is None
    assert parse_sinfo_limits("long* 1-12:00:00\n").of(None) == 2160
    assert parse_sinfo_limits("") == PartitionLimits()


def test_partition_limits_come_from_sinfo_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake `sinfo` first on PATH: its answer is read once; without sinfo, no limit."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "sinfo"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho x >> {calls}\nprintf 'v100* infinite\\nshort 3:00\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    jobs.partition_limits.cache_clear()
    try:
        assert jobs.partition_limits().of("short") == 3
        assert jobs.partition_limits().of("v100") is None
        assert calls.read_text().split() == ["x"]
    finally:
        jobs.partition_limits.cache_clear()
    assert jobs.read_partition_limits(run=lambda: None) == PartitionLimits()


def test_max_time_is_the_smaller_of_the_config_and_slurm(tmp_path: Path) -> None:
    slurm_says = PartitionLimits({"short": 15})
    assert jobs.max_time_min(_cfg(tmp_path), "T", slurm_says) == 15
    assert jobs.max_time_min(_cfg(tmp_path, max_time_min=10), "T", slurm_says) == 10
    assert jobs.max_time_min(_cfg(tmp_path, max_time_min=40), "T", slurm_says) == 15
    assert jobs.max_time_min(_cfg(tmp_path, max_time_min=40), "T", None) == 40
    assert jobs.max_time_min(_cfg(tmp_path), "T", PartitionLimits({"other": 5})) is None


# ------------------------------------------------------------------ the split

@pytest.mark.parametrize(("estimates", "max_min", "ranges"), [
    ([60.5] * 4, None, [(0, 4)]),
    ([60.5] * 4, 20, [(0, 4)]),  # 2 × 242 s + 10 min = 19
    ([60.5] * 4, 15, [(0, 2), (2, 4)]),  # two: 15; three: 17
    ([60.5] * 4, 3, [(0, 1), (1, 2), (2, 3), (3, 4)]),  # not even one fits: each alone
    ([600, 30, 30, 3000, 30], 60, [(0, 3), (3, 4), (4, 5)]),  # 660 s: 32 min; 3000 s alone: 110
    ([], 15, []),
])
def test_split_by_time_golden(estimates: list[float], max_min: int | None, ranges: list[tuple[int, int]]) -> None:
    assert split_by_time(estimates, max_min) == ranges


def test_a_group_too_long_for_its_partition_runs_as_parts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cells = expand(cfg).cells
    (whole,) = jobs.group_jobs(cfg, cells, PartitionLimits({"short": 20}))
    assert (whole.id, whole.parts, whole.max_time_min) == (GID, 1, 20)
    parts = jobs.group_jobs(cfg, cells, PartitionLimits({"short": 15}))
    assert [(j.id, j.group_id, j.part, j.parts) for j in parts] == [
        (f"{GID}.cells1-2", GID, 1, 2), (f"{GID}.cells3-4", GID, 2, 2)]
    assert [c for j in parts for c in j.cells] == cells
    assert all(j.fits(cfg) for j in parts)
    # run-group finds a part by its id, without asking Slurm
    assert find_group(cfg, cells, f"{GID}.cells3-4").cells == tuple(cells[2:])
    assert find_group(cfg, cells, f"{GID}.cells3-4").id == f"{GID}.cells3-4"
    with pytest.raises(ConfigError, match=r"group 'tiny_T_s1_pnone_reference.cells3-5' is not in the plan"):
        find_group(cfg, cells, f"{GID}.cells3-5")
    # packing: cell: a cell is never split; its job asks at most the limit
    alone = jobs.cell_jobs(cfg, cells, PartitionLimits({"short": 3}))
    assert [j.id for j in alone] == [c.id for c in cells] and not alone[0].fits(cfg)
    assert job_request(cfg, alone[0].cells, max_time_min=3).resources.time_limit_min == 3


def test_every_route_packs_by_group_unless_the_config_says(tmp_path: Path) -> None:
    assert DEFAULT_PACKING == "group"
    assert resolve_packing(_cfg(tmp_path)) == "group"


# ------------------------------------------------------------------ the request

def test_job_request_golden(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cells = expand(cfg).cells
    req = job_request(cfg, cells)
    assert req.resources.time_limit_min == 19  # 4 × ~60.6 s: 2 × 242.4 s + 10 min
    assert (req.resources.nodes, req.resources.gpus_per_node, req.resources.partition) == (1, 1, "short")
    assert req.resources.mem_mb == 1792 and req.todo == tuple(cells) and not req.clipped
    assert job_request(cfg, cells, attempt=2).resources.time_limit_min == 38
    clipped = job_request(cfg, cells, attempt=2, max_time_min=25)
    assert clipped.resources.time_limit_min == 25 and clipped.clipped


def test_history_learns_and_sizes_for_the_unfinished_cells(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cells = expand(cfg).cells
    out = cfg.output_dir
    _record(cells[0].files(out).record, "ok", wall_s=6.0683181056, limit_min=19)  # a tenth of its estimate
    _record(cells[1].files(out).record, "oom", wall_s=3.0)  # accepted under on_oom: record
    _record(cells[2].files(out).failed_record(), "incomplete", wall_s=50.0, limit_min=40)
    history = read_history(cfg, cells)
    assert history.cells[cells[0].id] == jobs.CellHistory("ok", True, 6.0683181056, 19)
    assert history.cells[cells[2].id] == jobs.CellHistory("incomplete", False, None, 40)
    assert cells[3].id not in history.cells
    # median of 0.1 (cell 0) and 3.0 / 60.8 (cell 1)
    assert history.factors[("tiny", "T")] == pytest.approx((0.1 + 3.0 / 60.80318105600001) / 2)
    req = job_request(cfg, cells, history=history)
    assert req.todo == (cells[2], cells[3])
    assert req.resources.time_limit_min == 80  # twice the incomplete job's 40 min
    assert job_request(cfg, cells, history=history, attempt=2).resources.time_limit_min == 160
    assert History().unfinished(cells) == cells


def test_job_memory_is_the_largest_of_its_unfinished_cells(tmp_path: Path) -> None:
    """A CPU device holds the KV cache in host memory: batch 64 of a 7B shape needs more."""
    base = _cfg(tmp_path)
    data = {
        "output_dir": base.output_dir,
        "models": {"m": {"arch": "llama-7b", "weights": "synthetic"}},
        "datasets": {"d": {"format": "alpaca", "path": "synthetic", "n_prompts": 8, "max_prompt_len": 64}},
        "gpus": {"C": {"partition": "p", "gpus_per_node": 1, "memory_gb": 80, "device": "cpu"}},
        "matrix": [{"model": ["m"], "dataset": ["d"], "gpu": ["C"], "batch_size": [1, 64], "max_gen_len": [256]}],
    }
    cfg = config.from_dict(data)
    small, big = expand(cfg).cells
    assert job_request(cfg, [small, big]).resources.mem_mb == 47872
    assert job_request(cfg, [small]).resources.mem_mb == 27648
    _record(big.files(cfg.output_dir).record, "ok", wall_s=100.0)
    assert job_request(cfg, [small, big], history=read_history(cfg, [small, big])).resources.mem_mb == 27648


def test_host_memory_is_what_loading_needs() -> None:
    """Golden numbers: Llama-3 70B in float16 is 141.1 GB; 8 shards on 4-GPU nodes put 4 ranks
    on a node, each memory-mapping its 17.6 GB (16,821 MiB) shard plus 4 GiB of torch/CUDA,
    and 512 MiB for the node's agent: 84,197 MiB, rounded up to 256 MiB."""
    from llmenergy.planning.plan import plan_rows

    data = {
        "models": {"l70": {"arch": "llama3-70b", "weights": "/data/Meta-Llama-3-70B"},
                   "syn": {"arch": "llama3-70b"}},
        "datasets": {"d": {"format": "alpaca", "path": "synthetic", "n_prompts": 8, "max_prompt_len": 64}},
        "gpus": {"A100": {"partition": "a100", "gpus_per_node": 4, "memory_gb": 80},
                 "H100": {"partition": "gpu", "gpus_per_node": 8, "memory_gb": 80, "mem_mb_per_gpu": 64000}},
        "matrix": [{"model": ["l70", "syn"], "dataset": ["d"], "gpu": ["A100", "H100"], "shards": [8],
                    "batch_size": [8], "max_gen_len": [64]}],
    }
    cfg = config.from_dict(data, check_files=False)

    def mem(model: str, gpu: str) -> int | None:
        cell = Cell(model=model, dataset="d", gpu=gpu, shards=8, batch_size=8, max_gen_len=64, power_cap_w=None)
        return job_request(cfg, [cell]).resources.mem_mb

    assert mem("l70", "A100") == 84224
    assert mem("syn", "A100") == 4 * 4096 + 512  # weights made on the GPU
    assert mem("l70", "H100") == 512000
    rows = {(r["model"], r["gpu"]): r for r in plan_rows(cfg)[0]}
    assert (rows["l70", "A100"]["mem_mb_per_node"], rows["l70", "A100"]["mem_mb_source"]) == (84224, "estimate")
    assert (rows["l70", "H100"]["mem_mb_per_node"], rows["l70", "H100"]["mem_mb_source"]) == (
        512000, "gpus.H100.mem_mb_per_gpu")
