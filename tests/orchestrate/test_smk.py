"""Pure pieces used by the Snakemake rules and `llmenergy submit`: no cluster needed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmenergy import config
from llmenergy.cellfiles import accepted
from llmenergy.orchestrate.smk import load
from llmenergy.planning import jobs
from llmenergy.planning.matrix import estimate_runtime_s
from orchestrate_helpers import demo_config


def test_quarantine_moves_bad_outputs_aside_and_drops_derived(tmp_path: Path) -> None:
    ctx = load(demo_config(tmp_path))
    bad, good = ctx.plan.cells[0], ctx.plan.cells[1]
    for c, status in ((bad, "incomplete"), (good, "ok")):
        d = c.dir(ctx.output_dir)
        d.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), d / "metrics.parquet")
        (d / "cell.json").write_text(json.dumps({"status": status}))
    summary = tmp_path / "results" / "summary.parquet"
    summary.write_bytes(b"x")
    assert ctx.quarantine_corrupt(dry_run=True, derived=[summary]) == [bad.id]
    assert (bad.dir(ctx.output_dir) / "cell.json").exists() and summary.exists()
    assert ctx.quarantine_corrupt(derived=[summary]) == [bad.id]
    assert not (bad.dir(ctx.output_dir) / "cell.json").exists()
    assert (bad.dir(ctx.output_dir) / "cell.json.rejected").exists()
    assert (good.dir(ctx.output_dir) / "cell.json").exists()
    assert not summary.exists()


def test_rule_resources_give_every_cell_the_same_keys(tmp_path: Path) -> None:
    from types import SimpleNamespace

    ctx = load(demo_config(tmp_path))
    rules = ctx.rule_resources()

    def of(cell_id: str) -> dict:
        return {k: f(SimpleNamespace(cell=cell_id)) for k, f in rules.items()}

    one = of(next(c.id for c in ctx.plan.cells if c.shards == 1))
    two = of(next(c.id for c in ctx.plan.cells if c.shards == 2))
    assert set(one) == set(two)
    assert one["mpi"] == "" and two["mpi"] == "srun"
    assert one["tasks"] == 1 and two["tasks"] == 2 and two["gres"] == "gpu:2"
    assert "--signal=TERM@120" in one["slurm_extra"]


@pytest.mark.parametrize(("status", "on_oom", "on_denied", "expected"), [
    ("ok", "record", "fail", True), ("oom", "record", "fail", True), ("oom", "fail", "fail", False),
    ("power_cap_denied", "record", "skip", True), ("power_cap_denied", "record", "fail", False),
    ("incomplete", "record", "skip", False), ("failed", "record", "skip", False),
])
def test_accepted_follows_the_policies(tmp_path: Path, status: str, on_oom: str, on_denied: str,
                                       expected: bool) -> None:
    cfg = config.from_dict(demo_config(tmp_path, policies={"on_oom": on_oom, "on_power_cap_denied": on_denied}))
    assert accepted(status, cfg.policies) is expected


def _record(path: Path, status: str, wall_s: float, limit_min: int | None = None,
            fingerprint: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "status": status, "fingerprint": fingerprint,
                                "provenance": {"wall_s": wall_s, "slurm_time_limit_min": limit_min}}))


def test_packed_context_sizes_each_group_job_for_its_unfinished_cells(tmp_path: Path) -> None:
    """packing: group (the default of every route): the analysis needs the groups' done
    markers; a group's job is sized for its unfinished cells with the runtime learned from
    finished cells of the same model and GPU; a marker with an unfinished cell is removed."""
    from types import SimpleNamespace

    from llmenergy.orchestrate.launch import measurement

    ctx = load(demo_config(tmp_path))
    assert ctx.packing == "group" and load(demo_config(tmp_path, packing="cell")).packing == "cell"
    assert ctx.targets() == [ctx.done_marker(g) for g in ctx.job_ids]
    group = max(ctx.jobs, key=lambda g: len(g.cells))
    assert len(group.cells) >= 3
    res = ctx.rule_group_resources()
    wild = SimpleNamespace(group=group.id)
    est = sum(estimate_runtime_s(ctx.cfg, c) for c in group.cells)
    assert res["runtime"](wild) == max(15, math.ceil(est * 2 / 60) + 10)
    assert res["nodes"](wild) == 1 and res["gres"](wild) == f"gpu:{group.first.shards}"

    done, todo = group.cells[0], list(group.cells[1:])
    est = estimate_runtime_s(ctx.cfg, done)
    current = measurement(ctx.cfg, done)[0]  # a record without it is not finished
    _record(done.files(ctx.output_dir).record, "ok", est / 10, fingerprint=current)  # a tenth of its estimate
    _record(todo[0].files(ctx.output_dir).record, "incomplete", 1.0, limit_min=40)
    fresh = load(demo_config(tmp_path))
    fresh.prepare()
    assert fresh.unfinished(group.id) == todo
    assert fresh.history.factors[(done.model, done.gpu)] == pytest.approx(0.1)
    learned = sum(estimate_runtime_s(ctx.cfg, c) for c in todo) * 0.1
    expected = max(max(15, math.ceil(learned * 2 / 60) + 10), 80)  # ≥ 2 × the incomplete's limit
    assert fresh.rule_group_resources()["runtime"](wild) == expected
    assert fresh.rule_group_resources()["runtime"](wild, attempt=2) == 2 * expected

    marker = Path(fresh.done_marker(group.id))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}")
    summary = tmp_path / "results" / "summary.parquet"
    summary.write_bytes(b"x")
    assert fresh.stale_groups(dry_run=True, derived=[summary]) == [group.id] and marker.exists() and summary.exists()
    fresh.prepare(derived=[summary])
    assert not marker.exists()
    assert not summary.exists()  # else Snakemake would not reach back to the group (issue 21)


def test_group_memory_is_the_largest_of_its_cells_not_the_first(tmp_path: Path) -> None:
    """Issue 21: Snakemake sized a group's host memory by its first cell; every route now asks
    for the largest (a CPU device holds the KV cache in host memory: batch 64 needs more)."""
    from types import SimpleNamespace

    from llmenergy.planning.matrix import host_mem_mb

    cfg = demo_config(tmp_path)
    cfg["models"]["llama-tiny"]["arch"] = "llama-7b"  # synthetic weights in host memory, a KV cache that counts
    cfg["gpus"]["local"].update(device="cpu", memory_gb=80)
    cfg["matrix"] = [{**cfg["matrix"][0], "shards": [1], "batch_size": [1, 64], "max_gen_len": [256]}]
    ctx = load(cfg)
    (job,) = ctx.jobs
    assert [host_mem_mb(ctx.cfg, c)[0] for c in job.cells] == [27648, 47872]
    assert ctx.rule_group_resources()["mem_mb"](SimpleNamespace(group=job.id)) == 47872


def test_a_group_longer_than_its_partition_runs_as_parts(tmp_path: Path) -> None:
    """Issue 21 (3): with gpus.<type>.max_time_min, a group whose --time would exceed it
    becomes consecutive jobs, each within the limit; their ids name the group and positions."""
    from types import SimpleNamespace

    from llmenergy.planning.groups import find_group

    whole = load(demo_config(tmp_path))
    group = max(whole.jobs, key=lambda g: len(g.cells))
    cfg = demo_config(tmp_path)
    limit = whole.time_limit_min(group.id) - 1
    cfg["gpus"] = {k: {**v, "max_time_min": limit} for k, v in cfg["gpus"].items()}
    ctx = load(cfg)
    parts = [j for j in ctx.jobs if j.group_id == group.id]
    assert len(parts) >= 2 and [c for p in parts for c in p.cells] == list(group.cells)
    assert [p.part for p in parts] == list(range(1, len(parts) + 1))
    res = ctx.rule_group_resources()
    for p in parts:
        assert res["runtime"](SimpleNamespace(group=p.id)) <= limit
        assert res["runtime"](SimpleNamespace(group=p.id), attempt=3) <= limit  # never more than accepted
        assert find_group(ctx.cfg, ctx.plan.cells, p.id).cells == p.cells
    assert ctx.targets() == [ctx.done_marker(j) for j in ctx.job_ids]
    assert any("part 1/" in line for line in ctx.group_lines())
    assert isinstance(ctx.request(parts[0].id), jobs.JobRequest)


@pytest.mark.parametrize("packing", ["group", "cell"])
def test_a_dry_run_gives_each_job_it_would_rerun_an_input_newer_than_its_outputs(tmp_path: Path,
                                                                                  packing: str) -> None:
    """`snakemake -n` moves nothing, so a finished cell whose config changed still has its
    outputs; its job (the cell's, or its group's) gets an input file touched by the dry run,
    and Snakemake lists it. Other jobs get none; a real run removes the files."""
    from types import SimpleNamespace

    from llmenergy.orchestrate.launch import measurement

    ctx = load(demo_config(tmp_path, packing=packing))
    changed, other = ctx.plan.cells[0], ctx.plan.cells[-1]
    for cell, fp in ((changed, "0" * 16), (other, measurement(ctx.cfg, other)[0])):
        files = cell.files(ctx.output_dir)
        _record(files.record, "ok", 1.0, fingerprint=fp)
        pq.write_table(pa.table({"x": [1]}), files.metrics)
    wildcard = "group" if packing == "group" else "cell"

    def job_of(cell: object) -> str:
        return next(j.id for j in ctx.jobs if cell in j.cells) if packing == "group" else cell.id  # type: ignore[attr-defined]

    ctx.prepare(dry_run=True)
    inputs = ctx.would_rerun_input(wildcard)
    (mark,) = inputs(SimpleNamespace(**{wildcard: job_of(changed)}))
    assert Path(mark).stat().st_mtime >= changed.files(ctx.output_dir).metrics.stat().st_mtime
    if job_of(other) != job_of(changed):
        assert inputs(SimpleNamespace(**{wildcard: job_of(other)})) == []
    assert changed.files(ctx.output_dir).record.exists()  # nothing moved

    fresh = load(demo_config(tmp_path, packing=packing))
    assert fresh.prepare() == [changed.id]
    assert not Path(mark).exists() and fresh.would_rerun_input(wildcard)(SimpleNamespace(**{wildcard: job_of(changed)})) == []


def test_plan_says_where_the_results_stand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`llmenergy plan` mid-campaign: finished cells (an oom recorded as the policy says),
    one measured under another definition (it reruns), a failed one, the rest not run."""
    import yaml

    from llmenergy import cli
    from llmenergy.orchestrate.launch import measurement

    data = demo_config(tmp_path)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    ctx = load(data)
    out = Path(ctx.output_dir)
    assert cli.main(["plan", "--config", str(path)]) == 0
    assert f"  results:    none yet in {out}/\n" in capsys.readouterr().out
    ok, oom, stale, failed = ctx.plan.cells[:4]
    _record(ok.files(out).record, "ok", 1.0, fingerprint=measurement(ctx.cfg, ok)[0])
    _record(oom.files(out).record, "oom", 1.0, fingerprint=measurement(ctx.cfg, oom)[0])
    _record(stale.files(out).record, "ok", 1.0, fingerprint="0" * 16)
    _record(failed.files(out).failed_record(), "incomplete", 1.0)
    assert cli.main(["plan", "--config", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    n = len(ctx.plan.cells)
    left = [r["gpu_hours"] for r in doc["cells"] if r["cell_id"] not in (ok.id, oom.id)]
    assert doc["progress"] == {"output_dir": str(out), "cells": n, "finished": 2,
                               "finished_status": {"ok": 1, "oom": 1}, "changed": 1,
                               "failed": {"incomplete": 1}, "not_run": n - 4, "to_run": n - 2,
                               "to_run_gpu_hours": pytest.approx(sum(left), abs=0.01)}
    assert cli.main(["plan", "--config", str(path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (f"results: 2 of {n} finished in {out}/ (1 oom, as policies say); to run {n - 2} "
            f"(1 failed: 1 incomplete; 1 changed since measured; {n - 4} not run), ") in text
    # `snakemake -n` says the same on one line, and each group job its cells to run
    dry = load(data)
    dry.prepare(dry_run=True)
    assert dry.progress_line().startswith(
        f"results: 2 of {n} finished in {out}/ (1 oom, as policies say); to run {n - 2} "
        f"(1 failed: 1 incomplete; 1 changed since measured; {n - 4} not run), ")
    job = next(j for j in dry.jobs if ok in j.cells)
    line = next(ln for ln in dry.group_lines() if ln.startswith(f"{job.id}:"))
    assert f"{sum(c not in (ok, oom) for c in job.cells)} of {len(job.cells)} cells to run" in line
    # every cell measured as now defined: nothing left
    for cell in ctx.plan.cells:
        _record(cell.files(out).record, "ok", 1.0, fingerprint=measurement(ctx.cfg, cell)[0])
    assert cli.main(["plan", "--config", str(path)]) == 0
    assert f"  results:    {n} of {n} finished in {out}/\n" in capsys.readouterr().out
    done = load(data)
    done.prepare(dry_run=True)
    assert all(" cell(s) finished, " in ln for ln in done.group_lines())
