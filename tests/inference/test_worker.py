"""The rank loop (``inference.worker``): engines kept or reset across a job's cells, and
through a real run, repeats cycled to ``collector.min_window_s`` and the prefill-only loop."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from launch_helpers import CellRun, make_env, start_run_cell, write_config

from llmenergy.config import load
from llmenergy.inference import engines as E
from llmenergy.inference import model as M
from llmenergy.inference import weights as W
from llmenergy.inference.compiled import CompiledEngine
from llmenergy.inference.worker import Shared, batch_sizes
from llmenergy.planning.matrix import expand


def _swap(shared: Shared, model: M.Transformer, spec: SimpleNamespace, tmp_path: Path, bsz: int) -> object:
    """The job's next cell has another KV cache shape: its engine is a new one."""
    M.resize_cache(model, bsz, 16)
    engine, reused = shared.engine_for(spec, tmp_path, {bsz})
    assert not reused
    return engine


def _job(tmp_path: Path) -> tuple[M.Transformer, Shared, SimpleNamespace]:
    model, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=1,
                       max_batch_size=2, max_seq_len=16)
    return model, Shared(device=torch.device("cpu"), model=model), SimpleNamespace(
        cell=SimpleNamespace(engine="compiled", precision="fp16"))


def test_a_new_engine_of_a_job_keeps_the_compiled_code_before_it_while_dynamo_has_room(tmp_path: Path) -> None:
    """A job's later engine built after ``torch._dynamo.reset`` decoded ~3.5 % slower on an H200
    than one built without it (docs/measurement.md), so an engine swap keeps what Dynamo compiled
    before while ``recompile_limit`` (8) leaves room for what the new engine compiles (an entry
    per batch size), and resets only then. Shown with a function compiled once: a swap with room
    keeps it (no recompile), one without room drops it (compiled again) and marks the new engine,
    and every later one, as built after a reset."""
    model, shared, spec = _job(tmp_path)
    compiles: list[int] = []

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend=counting, fullgraph=True, dynamic=False)
    double(torch.ones(2))
    first, _ = shared.engine_for(spec, tmp_path, {2})
    assert not shared.engine_after_reset and shared.engines_made == 1
    assert _swap(shared, model, spec, tmp_path, 3) is not first  # room: 0 kept + 1 <= 8
    double(torch.ones(2))
    assert len(compiles) == 1 and not shared.engine_after_reset and shared.kept_entries == 0
    shared.kept_entries = 7  # as after seven batch sizes compiled: 7 + 1 <= 8, still room
    _swap(shared, model, spec, tmp_path, 2)
    double(torch.ones(2))
    assert len(compiles) == 1 and not shared.engine_after_reset
    shared.kept_entries = 7  # a cell of two batch sizes (a smaller last batch): no room, reset
    M.resize_cache(model, 3, 16)
    assert not shared.engine_for(spec, tmp_path, {3, 1})[1]
    assert shared.engine_after_reset and shared.kept_entries == 0 and shared.engines_made == 4
    double(torch.ones(2))
    assert len(compiles) == 2  # its compiled code went with the reset
    _swap(shared, model, spec, tmp_path, 2)  # a later engine, with room: still after that reset
    assert shared.engine_after_reset and shared.kept_entries == 0


def test_a_cell_keeps_the_engine_before_it_unless_its_new_batch_sizes_leave_no_room(tmp_path: Path) -> None:
    """A cell of the previous cell's KV cache shape keeps its engine; where it brings a batch
    size the engine has not compiled (a smaller last batch) and Dynamo has no room for it, the
    job resets instead and the cell gets a new engine (compiling inside a measured window, or
    failing over the limit, would be worse)."""
    model, shared, spec = _job(tmp_path)
    shared.engine_for(spec, tmp_path, {2})
    engine = CompiledEngine(model, compile=True)  # as warmed for batch 2 (Inductor takes minutes on CPU)
    engine.ready_batches.add(2)
    shared.engine, shared.kept_entries = engine, 6
    assert shared.engine_for(spec, tmp_path, {2}) == (engine, True)  # nothing new to compile
    assert shared.engine_for(spec, tmp_path, {2, 1}) == (engine, True)  # 6 + 1 + 1 <= 8
    shared.kept_entries = 7
    other, reused = shared.engine_for(spec, tmp_path, {2, 1})  # 7 + 1 + 1 > 8
    assert other is not engine and not reused and shared.engine_after_reset and shared.kept_entries == 0


def test_an_engine_swap_resets_where_the_limit_leaves_no_room(tmp_path: Path) -> None:
    """Dynamo compiles one function at most ``recompile_limit`` times per process (8) and a
    packed group may have more KV-cache shapes than that: without room for the next engine,
    the swap forgets the compiled code before it, so the next one compiles afresh. Shown with
    the limit at 0 and a function compiled for one shape: after a swap it compiles for another
    (without the swap's reset that is a recompile over the limit, a hard failure)."""
    model, shared, spec = _job(tmp_path)
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", fullgraph=True, dynamic=False)
    double(torch.ones(2))
    with torch._dynamo.config.patch(recompile_limit=1):
        first, reused = shared.engine_for(spec, tmp_path, {2})  # nothing compiled before: room
        assert not reused and not shared.engine_after_reset
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            double(torch.ones(3))  # the limit holds while the first engine is in use
        assert shared.engine_for(spec, tmp_path, {2}) == (first, True)  # same shape: kept, nothing forgotten
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            double(torch.ones(3))
    with torch._dynamo.config.patch(recompile_limit=0):
        assert _swap(shared, model, spec, tmp_path, 3) is not first and shared.engine_after_reset
    with torch._dynamo.config.patch(recompile_limit=1):
        torch.testing.assert_close(double(torch.ones(3)), torch.full((3,), 2.0))


def test_an_engine_counts_one_dynamo_entry_per_batch_size_it_compiled(tmp_path: Path) -> None:
    """What an engine swap counts against the limit: nothing for an engine that compiled
    nothing (the reference, or ``compiled`` on CPU), a batch size each for a compiled one, and
    an unknown (so a reset) where transformers decides what it compiles (``hf``); a cell runs
    its batch size, a smaller last batch, or all its prompts in one batch."""
    model, _, _ = _job(tmp_path)
    plain = E.make_engine("compiled", model)
    plain.warm(2)
    assert E.compiled_entries(plain) == 0 and plain.ready_batches == {2} and E.new_entries(plain, {1}) == 0
    assert E.compiled_entries(E.make_engine("reference", model)) == 0
    warmed = SimpleNamespace(compile=True, ready_batches={1, 16})
    assert E.compiled_entries(warmed) == 2 and E.new_entries(warmed, {16, 4}) == 1
    assert E.compiled_entries(SimpleNamespace(compile=True)) is None
    assert E.new_entries(SimpleNamespace(compile=True), {4}) is None
    assert not E.room_for(None, 0) and E.room_for(6, 2) and not E.room_for(7, 2)
    assert batch_sizes(10, 4) == {4, 2} and batch_sizes(8, 4) == {4} and batch_sizes(3, 4) == {3}


def test_repeats_cycle_their_batches_to_the_minimum_window_and_prefill_is_measured(
        tmp_path: Path, runs: list[CellRun]) -> None:
    """Two ranks (gloo): each repeat runs whole cycles of the cell's 2 batches until its windows
    last min_window_s, every cycle recorded like the first and counted; then its prefill-only
    loop lasts prefill_window_s; the ranks agree on both (a disagreement would hang them)."""
    path = write_config(tmp_path, n_prompts=4, batch_size=2, max_gen_len=6, min_window_s=1.5,
                        prefill_window_s=1.5)
    cfg = yaml.safe_load(path.read_text())
    cfg["repeats"] = 2
    cfg["gpus"]["cpu"]["gpus_per_node"] = 2
    cfg["matrix"][0]["shards"] = [2]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (cell,) = expand(load(path, check_files=False)).cells
    run = start_run_cell(tmp_path, cell.id, make_env(None))
    runs.append(run)
    assert run.wait(240.0) == 0, run.logs()
    assert run.cell_json()["status"] == "ok"
    events = pd.read_parquet(run.cell_dir / "events.parquet")
    resp = pd.read_parquet(run.cell_dir / "responses.parquet")
    metrics = pd.read_parquet(run.cell_dir / "metrics.parquet").set_index("repeat")
    events["duration_s"] = (events["end_ns"] - events["start_ns"]) / 1e9
    for r in (0, 1):
        measured = events[(events["repeat"] == r) & events["phase"].isin(["prefill", "decode"])]
        cycles = int(resp.loc[resp["repeat"] == r, "cycle"].max()) + 1
        assert cycles >= 2, f"repeat {r}: one pass of 2 tiny batches cannot last 1.5 s"
        # every cycle's batches are events (batch_index runs on) and responses like the first's
        assert sorted(measured.loc[measured["phase"] == "decode", "batch_index"]) == list(range(2 * cycles))
        rr = resp[resp["repeat"] == r]
        assert len(rr) == 4 * cycles
        assert all(sorted(g["prompt_id"]) == sorted(rr.loc[rr["cycle"] == 0, "prompt_id"])
                   for _, g in rr.groupby("cycle"))
        assert measured["duration_s"].sum() >= 1.5
        # the counts follow: every cycle's tokens and responses, over every cycle's windows
        m = metrics.loc[r]
        assert m["responses"] == 4 * cycles and m["tokens_out"] == 4 * cycles * 6
        assert m["duration_s"] == pytest.approx(measured["duration_s"].sum())
        assert m["tokens_per_s"] == pytest.approx(m["tokens_out"] / m["duration_s"])
        assert m["words_out"] == rr["words_out"].sum() and rr["tokens_after_eos"].notna().all()
        # the prefill-only loop: one event after the repeat's batches, whole passes over both batches
        (loop,) = events[(events["repeat"] == r) & (events["phase"] == "prefill_only")].itertuples()
        assert loop.start_ns >= measured["end_ns"].max() and loop.duration_s >= 1.5
        per_pass = int(rr.loc[rr["cycle"] == 0, "tokens_in"].sum())
        assert loop.tokens_in % per_pass == 0 and loop.tokens_in > per_pass
        assert m["prefill_only_tokens_in"] == loop.tokens_in
        assert m["prefill_only_duration_s"] == pytest.approx(loop.duration_s)
        assert m["prefill_only_energy_j"] > 0 and m["prefill_j_per_token_in"] > 0
