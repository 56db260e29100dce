"""The engine axis end to end: `llmenergy run-cell` of the same cell with the
`reference` and the `compiled` engine (2 ranks, gloo, on the CPU) gives the same
responses, and the compiled cell's compile time is its own phase, outside the metrics."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from launch_helpers import CellRun, make_env, start_run_cell, write_config

from llmenergy.config import load
from llmenergy.planning.matrix import expand


def test_compiled_engine_cell_matches_reference(tmp_path: Path, runs: list[CellRun]) -> None:
    path = write_config(tmp_path, n_prompts=5, batch_size=2, max_gen_len=6)
    cfg = yaml.safe_load(path.read_text())
    cfg["gpus"]["cpu"]["gpus_per_node"] = 2
    cfg["matrix"][0].update(shards=[2], engine=["reference", "compiled"])
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cells = {c.engine: c.id for c in expand(load(path, check_files=False)).cells}
    assert set(cells) == {"reference", "compiled"}
    out = {}
    for engine, cell_id in cells.items():
        run = start_run_cell(tmp_path, cell_id, make_env(None))
        runs.append(run)
        assert run.wait(180.0) == 0, run.logs()
        assert run.cell_json()["status"] == "ok"
        out[engine] = run.cell_dir
    texts = {e: pd.read_parquet(d / "responses.parquet").sort_values(["repeat", "prompt_id"])["text"].tolist()
             for e, d in out.items()}
    assert texts["compiled"] == texts["reference"] and len(texts["reference"]) == 5
    events = pd.read_parquet(out["compiled"] / "events.parquet")
    assert set(events["phase"]) >= {"prefill", "decode", "warmup"}
    metrics = pd.read_parquet(out["compiled"] / "metrics.parquet")
    decode_s = events.loc[(events.phase == "decode") & (events.repeat == 0)]
    decode_s = ((decode_s.end_ns - decode_s.start_ns) / 1e9).sum()
    prefill = events.loc[(events.phase == "prefill") & (events.repeat == 0)]
    prefill_s = ((prefill.end_ns - prefill.start_ns) / 1e9).sum()
    assert abs(metrics["duration_s"].iloc[0] - (decode_s + prefill_s)) < 1e-6  # compile time not counted
    assert metrics["engine"].iloc[0] == "compiled"

    # Issue 23 on real run-cell output: both engines' cells are drawn in every metric family,
    # and the report pairs them on the engine axis.
    from llmenergy.analysis.aggregate import aggregate
    from llmenergy.analysis.figdata import FigureSkipped, figure_data
    from llmenergy.analysis.plots import BUILDERS, FAMILIES
    from llmenergy.analysis.report import render_report

    results = out["reference"].parent.parent
    aggregate(results)
    summary = pd.read_parquet(results / "summary.parquet")
    assert set(summary["status"]) == {"ok"}
    for family, names in FAMILIES.items():
        drawn: set[str] = set()
        for name in names:
            try:
                fig, _ = BUILDERS[name](summary)
            except FigureSkipped:
                continue
            drawn |= set(figure_data(fig).cells)
        assert drawn == set(cells.values()), family
    html = render_report(results).read_text()
    assert "Comparisons" in html and "engine compiled" in html.lower()


def test_hf_engine_cell_matches_reference_and_is_planned_on_one_rank_only(tmp_path: Path,
                                                                          runs: list[CellRun]) -> None:
    """`hf` through `llmenergy run-cell` (1 rank): the reference's responses; at 2 shards it is left out."""
    pytest.importorskip("transformers")
    path = write_config(tmp_path, n_prompts=5, batch_size=2, max_gen_len=6)
    cfg = yaml.safe_load(path.read_text())
    cfg["gpus"]["cpu"]["gpus_per_node"] = 2
    cfg["matrix"][0].update(shards=[1, 2], engine=["reference", "hf"])
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = expand(load(path, check_files=False))
    assert sorted((c.engine, c.shards) for c in plan.cells) == [("hf", 1), ("reference", 1), ("reference", 2)]
    assert [(i.cell.engine, i.cell.shards, i.reason) for i in plan.infeasible] == [
        ("hf", 2, "engine hf: runs one rank only (transformers' generate on the full weights), not 2 shards")]
    out = {}
    for cell in plan.cells:
        if cell.shards != 1:
            continue
        run = start_run_cell(tmp_path, cell.id, make_env(None))
        runs.append(run)
        assert run.wait(180.0) == 0, run.logs()
        assert run.cell_json()["status"] == "ok"
        out[cell.engine] = run.cell_dir
    texts = {e: pd.read_parquet(d / "responses.parquet").sort_values(["repeat", "prompt_id"])["text"].tolist()
             for e, d in out.items()}
    assert texts["hf"] == texts["reference"] and len(texts["reference"]) == 5
    events = pd.read_parquet(out["hf"] / "events.parquet")
    assert set(events["phase"]) >= {"prefill", "decode", "warmup"} and "compile" not in set(events["phase"])
    assert pd.read_parquet(out["hf"] / "metrics.parquet")["engine"].iloc[0] == "hf"



@pytest.mark.parametrize("ranks_inherit", [True, False], ids=["ranks-inherit", "ranks-lose-it"])
def test_a_compiled_cell_fails_when_its_ranks_ran_under_other_engine_switches(
        tmp_path: Path, runs: list[CellRun], ranks_inherit: bool) -> None:
    """An engine switch set for the job is in the cell's definition (its fingerprint); the
    ranks record the switches they ran with, and a cell whose ranks lost one (a launcher
    that does not pass the environment on, faked) is failed, not recorded as ok."""
    path = write_config(tmp_path, n_prompts=2, batch_size=2, max_gen_len=3)
    cfg = yaml.safe_load(path.read_text())
    cfg["matrix"][0].update(engine=["compiled"])
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (cell,) = expand(load(path, check_files=False)).cells
    env = make_env(None)
    env["LLMENERGY_KEY_BUCKETS"] = "0"
    if not ranks_inherit:
        env["FAKE_RANK_UNSET_ENV"] = "LLMENERGY_KEY_BUCKETS"
    run = start_run_cell(tmp_path, cell.id, env)
    runs.append(run)
    code = run.wait(180.0)
    doc = run.cell_json()
    assert doc["definition"]["engine_switches"] == {"LLMENERGY_KEY_BUCKETS": "0"}
    if ranks_inherit:
        assert code == 0 and doc["status"] == "ok", run.logs()
        assert doc["provenance"]["load"]["engine_switches"] == {"LLMENERGY_KEY_BUCKETS": "0"}
    else:
        assert code == 1 and doc["status"] == "failed", run.logs()
        assert doc["provenance"]["load"]["engine_switches"] == {}
        assert doc["reason"].startswith("engine switches differ: the ranks ran with none, the job defined "
                                        "the cell with {'LLMENERGY_KEY_BUCKETS': '0'}")
