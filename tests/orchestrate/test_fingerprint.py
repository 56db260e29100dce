"""Issue 15: a cell's fingerprint (no silent mixing) and more time for retried cells."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmenergy import config
from llmenergy.arch import ENGINE_SWITCHES
from llmenergy.cellfiles import CellRecord
from llmenergy.errors import ConfigError
from llmenergy.orchestrate.fingerprint import (
    SUPERSEDED,
    changes,
    definition,
    fingerprint_of,
)
from llmenergy.orchestrate.launch import (
    finished,
    cell_spec,
    measurement,
)
from llmenergy.orchestrate.smk import load
from llmenergy.planning.matrix import expand
from llmenergy.slurm import parse_time_limit_min
from orchestrate_helpers import demo_config, write_timed_out


def _finish(ctx, cell, fingerprint: str | None, defn: dict | None = None, status: str = "ok") -> Path:
    """A finished cell as run_cell leaves it (the files that matter here)."""
    d = cell.dir(ctx.output_dir)
    (d / "logs").mkdir(parents=True)
    (d / "metrics.parquet").write_bytes(b"PAR1" + b"\0" * 8 + b"PAR1")
    (d / "logs" / "rank0.log").write_text("measured\n")
    CellRecord(cell=cell, status=status, reason=None, repeats=1, launcher="local",
               fingerprint=fingerprint, definition=defn).write(d / "cell.json")
    return d


def test_fingerprint_follows_what_defines_the_measurement(tmp_path: Path) -> None:
    base = config.from_dict(demo_config(tmp_path))
    cell = expand(base).cells[0]
    fp, defn = measurement(base, cell)
    assert measurement(config.from_dict(demo_config(tmp_path)), cell)[0] == fp  # stable
    assert defn["weights"] == "synthetic" and defn["checkpoint"] == []

    data = demo_config(tmp_path)
    ds = next(iter(data["datasets"]))
    data["datasets"][ds]["n_prompts"] += 1
    fp2, defn2 = measurement(config.from_dict(data), cell)
    assert fp2 != fp
    assert changes(defn, defn2) == (f"dataset.n_prompts: {defn['dataset']['n_prompts']} → "
                                    f"{defn['dataset']['n_prompts'] + 1}")
    for key, value in (("repeats", 7), ("warmup_tokens", 3), ("seed", 42)):
        assert measurement(config.from_dict(demo_config(tmp_path, **{key: value})), cell)[0] != fp, key
    # settings that do not define the measurement leave it alone
    assert measurement(config.from_dict(demo_config(tmp_path, policies={"on_oom": "fail"})), cell)[0] == fp


def test_a_set_model_dtype_is_what_a_cpu_cell_computes_in_as_the_plan_says(tmp_path: Path) -> None:
    # models.<name>.dtype: set, it wins on every device (the plan's memory estimate reads the
    # same value); auto: float32 on a CPU device, also on one that resolves to CPU at run time
    def dtypes(device: str, dtype: str | None) -> set[str]:
        data = demo_config(tmp_path)
        data["gpus"]["local"]["device"] = device
        if dtype is not None:
            data["models"]["llama-tiny"]["dtype"] = dtype
        cfg = config.from_dict(data)
        return {cell_spec(cfg, c, resolve_device=resolve).dtype
                for c in expand(cfg).cells for resolve in (False, True)}

    assert dtypes("cpu", "float16") == {"float16"}
    assert dtypes("cpu", None) == {"float32"}
    assert dtypes("auto", "float16") == {"float16"}
    # auto device, auto dtype: the plan's (unresolved) float16, and float32 where it resolves to CPU
    import torch

    assert dtypes("auto", None) == ({"float16"} if torch.cuda.is_available() else {"float16", "float32"})


def test_checkpoint_files_sizes_and_mtimes_are_in_the_definition(tmp_path: Path) -> None:
    cfg = config.from_dict(demo_config(tmp_path))
    spec = cell_spec(cfg, expand(cfg).cells[0], resolve_device=False)
    ckpt = tmp_path / "7B"
    ckpt.mkdir()
    (ckpt / "consolidated.00.pth").write_bytes(b"x" * 10)
    (ckpt / "params.json").write_text("{}")
    real = spec.__class__(**{**spec.__dict__, "weights": str(ckpt)})
    d1 = definition(real)
    assert d1["weights"] == str(ckpt) and [f[:2] for f in d1["checkpoint"]] == [
        ["consolidated.00.pth", 10], ["params.json", 2]]
    assert "weights: synthetic → " + str(ckpt) in changes(definition(spec), d1)
    os.utime(ckpt / "consolidated.00.pth", ns=(1, 1))  # a replaced checkpoint file
    assert fingerprint_of(definition(real)) != fingerprint_of(d1)


def test_prepare_supersedes_exactly_the_changed_cells(tmp_path: Path, caplog) -> None:
    old = load(demo_config(tmp_path))
    changed, same, legacy = old.plan.cells[0], old.plan.cells[1], old.plan.cells[2]
    fp, defn = measurement(old.cfg, changed)
    _finish(old, changed, "0123456789abcdef", {**defn, "weights": "synthetic-old"})
    _finish(old, same, *measurement(old.cfg, same))
    _finish(old, legacy, None)
    summary = tmp_path / "results" / "summary.parquet"
    summary.write_bytes(b"x")

    # dry run: says which and why, moves nothing
    with caplog.at_level("WARNING"):
        assert load(demo_config(tmp_path)).prepare(dry_run=True, derived=[summary]) == [changed.id, legacy.id]
    assert "weights: synthetic-old → synthetic" in caplog.text and "dry run" in caplog.text
    assert f"{legacy.id}: config changed (recorded without a fingerprint)" in caplog.text
    assert (changed.dir(old.output_dir) / "cell.json").exists() and summary.exists()

    # on_config_change: error: one error naming the cell and the change, nothing moved
    with pytest.raises(ConfigError) as err:
        load(demo_config(tmp_path, policies={"on_config_change": "error"})).prepare(derived=[summary])
    assert len(str(err.value).splitlines()) == 1
    assert "policies.on_config_change" in str(err.value) and changed.id in str(err.value)
    assert same.id not in str(err.value) and summary.exists()

    # rerun: the changed cell's files move to superseded/<old fingerprint>/, a record without a
    # fingerprint's to superseded/unknown/ (nothing unchecked passes for current), nothing else
    before = sorted(p.name for p in same.dir(old.output_dir).iterdir())
    assert load(demo_config(tmp_path)).prepare(derived=[summary]) == [changed.id, legacy.id]
    d = changed.dir(old.output_dir)
    assert [p.name for p in d.iterdir()] == [SUPERSEDED]
    kept = d / SUPERSEDED / "0123456789abcdef"
    assert sorted(p.name for p in kept.iterdir()) == ["cell.json", "logs", "metrics.parquet"]
    assert (kept / "logs" / "rank0.log").read_text() == "measured\n"
    assert sorted(p.name for p in same.dir(old.output_dir).iterdir()) == before
    unchecked = legacy.dir(old.output_dir) / SUPERSEDED / "unknown"
    assert sorted(p.name for p in unchecked.iterdir()) == ["cell.json", "logs", "metrics.parquet"]
    assert [p.name for p in legacy.dir(old.output_dir).iterdir()] == [SUPERSEDED]
    assert not summary.exists()
    assert load(demo_config(tmp_path)).prepare() == []  # nothing left to rerun


def test_prepare_reruns_a_cell_whose_status_changed_under_newer_metrics_rules(tmp_path: Path, caplog) -> None:
    """aggregate_problems.json names a finished cell whose rows, computed again under this
    version's rules, say incomplete: its cell.json (the same the aggregate read) says ok and would
    keep it from rerunning, so the next parse sets its files aside, also under
    on_config_change: error (the config did not change); a cell measured again since is not."""
    import json

    from llmenergy.analysis.metrics import RULES_VERSION
    from llmenergy.atomic import file_sha256
    from llmenergy.orchestrate.smk import changed_cell_ids

    ctx = load(demo_config(tmp_path))
    changed, remeasured, same, older = ctx.plan.cells[0], ctx.plan.cells[1], ctx.plan.cells[2], ctx.plan.cells[3]
    for cell in (changed, remeasured, same, older):
        _finish(ctx, cell, *measurement(ctx.cfg, cell))
    entries = [{"cell_id": c.id, "was": "ok", "now": "incomplete", "why": "energy_j null: GPU-x not metered",
                "rules": str(RULES_VERSION if c is not older else RULES_VERSION - 1),  # older: judged by other rules
                "record_sha256": file_sha256(c.dir(ctx.output_dir) / "cell.json")}
               for c in (changed, remeasured, older)]
    problems = tmp_path / "results" / "aggregate_problems.json"
    problems.write_text(json.dumps({"problems": [], "status_changed": entries}))
    again = remeasured.dir(ctx.output_dir) / "cell.json"
    dataclasses.replace(CellRecord.read(again), reason="measured again").write(again)
    summary = tmp_path / "results" / "summary.parquet"
    summary.write_bytes(b"x")

    strict = demo_config(tmp_path, policies={"on_config_change": "error"})
    with caplog.at_level("WARNING"):
        assert load(strict).prepare(dry_run=True, derived=[summary]) == [changed.id]
    assert (f"{changed.id}: status changed under newer rules (under metrics rules {RULES_VERSION} its rows say "
            "incomplete, its cell.json ok: energy_j null: GPU-x not metered); would rerun (dry run)") in caplog.text
    assert (changed.dir(ctx.output_dir) / "cell.json").exists() and summary.exists()
    marks = tmp_path / "results" / ".llmenergy" / "would-rerun"
    assert [p.name for p in marks.iterdir()] == [j.id for j in ctx.jobs if changed in j.cells]  # -n lists its job
    assert changed_cell_ids(load(strict).cfg, "group") == {changed.id}  # plan and submit count it to run

    assert load(strict).prepare(derived=[summary]) == [changed.id]
    moved = changed.dir(ctx.output_dir) / SUPERSEDED / measurement(ctx.cfg, changed)[0]
    assert sorted(p.name for p in moved.iterdir()) == ["cell.json", "logs", "metrics.parquet"]
    assert (remeasured.dir(ctx.output_dir) / "cell.json").exists() and not summary.exists()
    assert (same.dir(ctx.output_dir) / "cell.json").exists() and (older.dir(ctx.output_dir) / "cell.json").exists()
    assert load(strict).prepare() == []


def test_run_group_and_run_cell_rerun_a_cell_whose_status_changed_under_newer_rules(tmp_path: Path) -> None:
    """The other routes (llmenergy submit, run-group and run-cell by hand) decide through
    launch.finished: a cell named in status_changed with its cell.json as it is is not finished,
    its files set aside; submit sends a group whose every cell is finished but one so named."""
    import json

    from llmenergy.analysis.metrics import RULES_VERSION
    from llmenergy.atomic import file_sha256
    from llmenergy.orchestrate.submit import group_jobs

    ctx = load(demo_config(tmp_path))
    (job, *_rest) = ctx.jobs
    for c in ctx.plan.cells:
        _finish(ctx, c, *measurement(ctx.cfg, c))
    path = tmp_path / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(demo_config(tmp_path)))
    assert group_jobs(path)[2] == []  # every cell finished: nothing to submit
    cell = job.cells[0]
    record = cell.dir(ctx.output_dir) / "cell.json"
    (tmp_path / "results" / "aggregate_problems.json").write_text(json.dumps({"status_changed": [
        {"cell_id": cell.id, "was": "ok", "now": "incomplete", "why": "energy_j null: x", "rules": str(RULES_VERSION),
         "record_sha256": file_sha256(record)}]}))
    assert group_jobs(path)[2] == [job.id]
    current = measurement(ctx.cfg, cell)
    assert finished(ctx.cfg, cell.files(ctx.output_dir), current) is None
    assert not record.exists() and (cell.dir(ctx.output_dir) / SUPERSEDED / current[0] / "cell.json").is_file()
    other = job.cells[1]
    assert finished(ctx.cfg, other.files(ctx.output_dir), measurement(ctx.cfg, other)) == "ok"


def test_run_cell_treats_another_fingerprint_as_not_finished(tmp_path: Path) -> None:
    ctx = load(demo_config(tmp_path))
    cell = ctx.plan.cells[0]
    current = measurement(ctx.cfg, cell)
    d = _finish(ctx, cell, *current)
    assert finished(ctx.cfg, cell.files(ctx.output_dir), current) == "ok"
    other = ("feedfacefeedface", {**current[1], "repeats": 9})
    assert finished(ctx.cfg, cell.files(ctx.output_dir), other) is None
    assert (d / SUPERSEDED / current[0] / "cell.json").is_file() and not (d / "cell.json").exists()
    _finish(ctx, cell, None)  # recorded without a fingerprint: not finished either
    assert finished(ctx.cfg, cell.files(ctx.output_dir), current) is None
    assert (d / SUPERSEDED / "unknown" / "cell.json").is_file() and not (d / "cell.json").exists()


def test_runtime_resource_grows_with_attempt_and_after_a_time_limit(tmp_path: Path) -> None:
    ctx = load(demo_config(tmp_path))
    timed_out, fresh = ctx.plan.cells[0], ctx.plan.cells[1]
    write_timed_out(tmp_path / "results", timed_out, time_limit_min=50)

    ctx = load(demo_config(tmp_path))
    ctx.prepare()
    runtime = ctx.rule_resources()["runtime"]
    base = ctx.resources_of(fresh.id)["runtime"]
    assert runtime(SimpleNamespace(cell=fresh.id)) == base
    assert runtime(SimpleNamespace(cell=fresh.id), attempt=2) == 2 * base
    assert runtime(SimpleNamespace(cell=timed_out.id)) == max(100, ctx.resources_of(timed_out.id)["runtime"])


@pytest.mark.parametrize(("text", "minutes"), [
    ("15:00", 15), ("1:00:00", 60), ("1-00:00:00", 1440), ("2-03", 3060), ("30", 30), ("14:30", 15),
    ("UNLIMITED", None), ("", None),
])
def test_parse_time_limit_min(text: str, minutes: int | None) -> None:
    assert parse_time_limit_min(text) == minutes


@pytest.mark.parametrize(("argv", "dry"), [
    (["snakemake", "-n"], True), (["snakemake", "-np", "--profile", "x"], True),
    (["snakemake", "--dry-run"], True), (["snakemake", "--profile", "profiles/slurm"], False),
    (["snakemake", "-p", "--cores", "2"], False), (["snakemake", "--notemp"], False),
])
def test_dry_run_is_read_from_the_command_line(argv: list[str], dry: bool) -> None:
    from llmenergy.orchestrate.smk import dry_run_requested

    assert dry_run_requested(argv) is dry


def test_an_engine_switch_that_is_set_is_part_of_a_compiled_cells_definition(tmp_path: Path,
                                                                             monkeypatch) -> None:
    """LLMENERGY_DENSE_GEMV (and the other ENGINE_SWITCHES) change what a compiled cell
    measures: set, they enter its definition, so changing one reruns the cell with the
    change named; unset, the definition has no such key (the default's fingerprints stay
    as they were); the reference engine does not read them."""
    cfg = config.from_dict(demo_config(tmp_path))
    cell = expand(cfg).cells[0]
    compiled = dataclasses.replace(cell, engine="compiled")
    for name in ENGINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    before = {c.engine: measurement(cfg, c) for c in (cell, compiled)}
    assert all("engine_switches" not in defn for _, defn in before.values())
    monkeypatch.setenv("LLMENERGY_DENSE_GEMV", "1")
    fp, defn = measurement(cfg, compiled)
    assert fp != before["compiled"][0]
    assert changes(before["compiled"][1], defn) == "engine_switches.LLMENERGY_DENSE_GEMV: null → 1"
    assert measurement(cfg, cell) == before[cell.engine]
    monkeypatch.delenv("LLMENERGY_DENSE_GEMV")
    assert measurement(cfg, compiled) == before["compiled"]
