"""`llmenergy plan` on the default config: one screen (≤60 lines, ≤120 columns) of totals, GPU
energy, jobs and left-out reasons; `--cells` adds every cell, caps as `—`/`250 W`; JSON/CSV with
every axis of a cell."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest

import pyarrow as pa
import pyarrow.parquet as pq

from llmenergy import cli, config
from llmenergy.cellfiles import METRICS_SCHEMA
from llmenergy.planning.matrix import expand
from llmenergy.planning.energy import EnergyEstimate, estimate_energy
from llmenergy.planning.plan import IDENTITY, format_plan, group_reasons, plan_rows

CONFIG = Path(__file__).parents[2] / "config.yaml"


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load(CONFIG, check_files=False)


def test_totals_come_first_and_lines_are_narrow(cfg: config.Config) -> None:
    plan = expand(cfg)
    text = format_plan(cfg, packing="cell", cells=True)
    lines = text.splitlines()
    head = "\n".join(lines[:7])
    assert f"{len(plan.cells)} planned" in head
    assert f"left out:   {len(plan.infeasible)} cells" in head
    assert re.search(r"GPU-hours:\s+[\d,]+\.\d in all", head)
    assert f"Slurm jobs: {len(plan.cells)}" in head
    first_cell = next(i for i, ln in enumerate(lines) if ln.startswith(plan.cells[0].id))
    assert first_cell < 11
    assert max(len(ln) for ln in lines) <= 120
    assert "None" not in text


def test_power_cap_column_reads_dash_or_watts(cfg: config.Config) -> None:
    text = format_plan(cfg, show_infeasible=False, cells=True)
    rows = {ln.split()[0]: ln for ln in text.splitlines() if "_reference" in ln}
    assert rows["llama-65b_alpaca_V100_s8_b64_g256_p250W_reference"].split()[3:5] == ["250", "W"]
    assert rows["llama-7b_alpaca_V100_s1_b16_g256_pnone_reference"].split()[3] == "—"
    assert "left out," not in text


def test_left_out_grouped_by_reason_with_counts(cfg: config.Config) -> None:
    _, left_out = plan_rows(cfg)
    text = format_plan(cfg, cells=True)
    section = text.split("cells left out,")[1].splitlines()[1:]
    counts = [int(m.group(1)) for ln in section if (m := re.match(r"\s+(\d+) × ", ln))]
    groups = group_reasons(left_out)
    assert len(counts) == len(groups) < len({r["reason"] for r in left_out})
    assert sum(counts) == len(left_out) and counts == sorted(counts, reverse=True)
    assert len(section) == 2 * len(groups)  # a reason line and an example line each
    assert "needs 152–259 GB" in text  # memory reasons that differ only in GB share a line
    screen = format_plan(cfg).split("cells left out,")[1].splitlines()[1:]
    assert [ln for ln in screen if re.match(r"\s+\d+ × ", ln)] == [ln for ln in section if "e.g." not in ln]
    every = format_plan(cfg, all_left_out=True)
    assert sum(1 for r in left_out if f"  {r['cell_id']}: {r['reason']}" in every) == len(left_out)


def test_json_and_csv_carry_every_axis(cfg: config.Config) -> None:
    doc = json.loads(format_plan(cfg, fmt="json"))
    fields = ["cell_id", *IDENTITY, "nodes", "gpus_per_node", "partition", "gpu_hours"]
    assert all(set(fields) <= set(c) for c in doc["cells"])
    cap = {c["cell_id"]: c for c in doc["cells"]}["llama-65b_alpaca_V100_s8_b64_g256_p250W_reference"]
    assert (cap["model"], cap["shards"], cap["batch_size"], cap["power_cap_w"]) == \
        ("llama-65b", 8, 64, 250)
    assert all(set(IDENTITY) | {"reason"} <= set(r) for r in doc["left_out"])
    rows = list(csv.DictReader(io.StringIO(format_plan(cfg, fmt="csv"))))
    planned = [r for r in rows if r["planned"] == "yes"]
    assert len(planned) == len(doc["cells"])
    assert len(rows) - len(planned) == len(doc["left_out"])
    assert set(fields) <= set(rows[0])
    hidden = list(csv.DictReader(io.StringIO(format_plan(cfg, fmt="csv", show_infeasible=False))))
    assert len(hidden) == len(planned)


def test_hf_engine_needs_its_own_cache_and_rotary_copies(cfg: config.Config) -> None:
    """hf holds a second KV cache and wq/wk in HF's layout: a cell that fits the reference can fail."""
    import dataclasses

    from llmenergy.arch import kv_cache_bytes
    from llmenergy.planning.matrix import Cell, memory_problem

    cell = Cell(model="llama-7b", dataset="alpaca", gpu="V100", shards=1, batch_size=16, max_gen_len=256,
                power_cap_w=None, engine="reference")
    assert memory_problem(cfg, cell) is None
    def need_gb(engine: str) -> int:
        reason = memory_problem(cfg, dataclasses.replace(cell, batch_size=10**4, engine=engine)) or ""
        m = re.search(r"needs (\d+) GB", reason)
        return int(m.group(1)) if m else 0

    args, seq = cfg.models["llama-7b"].args, cfg.datasets["alpaca"].max_prompt_len + 256
    extra = kv_cache_bytes(args, 10**4, seq, "float16") + 32 * 2 * 4096 * 4096 * 2  # + 32 layers of wq, wk
    assert need_gb("reference") > 0
    assert abs(need_gb("hf") - need_gb("reference") - extra / 1e9) <= 1


def test_packed_plan_shows_the_groups(cfg: config.Config) -> None:
    """packing: group: 31 jobs for the default 310 cells, one line per group with its cells,
    layout and time; the JSON lists each group's cells."""
    from llmenergy.planning.groups import make_groups

    plan = expand(cfg)
    groups = make_groups(plan.cells)
    text = format_plan(cfg, packing="group")
    lines = text.splitlines()
    assert not any(ln.startswith(plan.cells[0].id) for ln in lines)  # cells only behind --cells
    with_cells = format_plan(cfg, packing="group", cells=True).splitlines()
    assert sum(ln.startswith(plan.cells[0].id) for ln in with_cells) == 1
    assert f"Slurm jobs: {len(groups)} (packing: group; {len(plan.cells)} with packing: cell)" in text
    assert len(groups) == 31 and max(len(g.cells) for g in groups) == 12
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in {g.id for g in groups}}
    assert len(rows) == len(groups)
    assert rows["llama-7b_A100_s32_pnone_reference"][1:4] == ["12", "8×4", "a100"]
    assert max(len(ln) for ln in lines) <= 120
    doc = json.loads(format_plan(cfg, fmt="json", packing="group"))
    assert sum(len(g["cells"]) for g in doc["groups"]) == len(plan.cells)
    assert all(g["time_limit_min"] >= 15 for g in doc["groups"])


def test_one_job_reads_one_count_and_one_time_not_a_range(cfg: config.Config) -> None:
    """A plan of one cell said "1–1 cells, 3.2–3.2 min each"; a range is shown only where it is one."""
    one = config.from_dict({**cfg.raw, "matrix": [{**cfg.raw["matrix"][0], "model": ["llama-7b"],
                                                   "gpu": ["A100"], "shards": [1], "batch_size": [1],
                                                   "max_gen_len": [256], "dataset": ["alpaca"]}]},
                           check_files=False)
    for packing in ("group", "cell"):
        head = "\n".join(format_plan(one, packing=packing).splitlines()[:6])
        assert re.search(r"(1 cell|packing: cell\)), \d+\.\d min each", head), head
        assert "–" not in head.split("Slurm jobs:")[1].split("GPU-hours")[0], head
    assert re.search(r"1–12 cells, [\d.]+–[\d.]+ min each", format_plan(cfg, packing="group"))


def test_default_plan_fits_a_screen(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    """`llmenergy plan --config config.yaml`: ≤60 lines of ≤120 columns, the energy line says its source."""
    monkeypatch.chdir(tmp_path)  # no results/ here: the prior
    assert cli.main(["plan", "--config", str(CONFIG)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 120
    energy = next(ln for ln in lines if ln.startswith("  GPU energy:"))
    assert re.search(r"GPU energy: [\d,]+ kWh \(estimate; no measured cells in results/, so prior: "
                     r"gpus\.<type>\.tdp_w × 0\.35 \(reference\)\)", energy)
    assert lines.index(energy) == next(i for i, ln in enumerate(lines) if "GPU-hours:" in ln) + 1
    assert "llama-7b_A100_s32_pnone_reference" in "\n".join(lines)  # the groups fit, one line each
    assert cli.main(["plan", "--config", str(CONFIG), "--packing", "cell"]) == 0
    cell_lines = capsys.readouterr().out.splitlines()
    assert len(cell_lines) <= 60 and max(map(len, cell_lines)) <= 120
    assert cli.main(["plan", "--config", str(CONFIG), "--cells"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > len(expand(config.load(CONFIG, check_files=False)).cells)


def test_too_many_groups_for_a_screen_become_one_line_per_model_gpu_engine(cfg: config.Config) -> None:
    wide = dataclasses.replace(cfg, matrix=[{**cfg.matrix[0], "power_cap_w": [None, 290, 200]}])
    plan = expand(wide)
    lines = format_plan(wide, packing="group").splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 120
    header = next(ln for ln in lines if ln.startswith("model"))
    assert header.split()[:4] == ["model", "GPU", "engine", "cells"]
    rows = [ln.split() for ln in lines[lines.index(header) + 1:] if ln.startswith("llama-")]
    assert sum(int(r[3]) for r in rows) == len(plan.cells)
    assert len(rows) == len({(c.model, c.gpu, c.engine) for c in plan.cells})


def _metrics(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{name: r.get(name) for name in METRICS_SCHEMA.names} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=METRICS_SCHEMA), path)


def test_energy_from_finished_cells_where_there_are_some(cfg: config.Config, tmp_path: Path) -> None:
    """A100 cells measured at 200 W per GPU (a 2-GPU repeat of 1,000 s drawing 400 kJ); the failed
    repeat and the CPU estimate are left out; V100 keeps the prior (250 W × 0.35)."""
    here = dataclasses.replace(cfg, output_dir=str(tmp_path))
    rows, _ = plan_rows(here)
    base = {"gpu": "A100", "engine": "reference", "status": "ok", "power_source": "nvml"}
    _metrics(tmp_path / "cells" / "a" / "metrics.parquet", [
        {**base, "energy_j": 400e3, "duration_s": 1000.0, "n_devices": 2},
        {**base, "status": "failed", "energy_j": 9e9, "duration_s": 1.0, "n_devices": 1},
        {**base, "power_source": "estimate", "energy_j": 9e9, "duration_s": 1.0, "n_devices": 1}])
    a100_h = sum(r["gpu_hours"] for r in rows if r["gpu"] == "A100")
    v100_h = sum(r["gpu_hours"] for r in rows if r["gpu"] == "V100")
    est = estimate_energy(here, rows)
    assert est.kwh == pytest.approx(a100_h * 0.200 + v100_h * 0.250 * 0.35)
    assert est.n_measured_rows == 1 and est.measured_gpu_hours == pytest.approx(a100_h)
    share = round(100 * a100_h / (a100_h + v100_h))
    assert f"{share}% of GPU-hours at the power of 1 measured repeats, the rest prior" in est.text()
    line = next(ln for ln in format_plan(here, packing="group").splitlines() if "GPU energy" in ln)
    assert f"{est.kwh:,.0f} kWh" in line and len(line) <= 120

    # a summary, when there is one, is what is read; every GPU type measured: no prior left
    _metrics(tmp_path / "summary.parquet", [
        {**base, "energy_j": 300e3, "duration_s": 1000.0, "n_devices": 1},
        {**base, "gpu": "V100", "power_source": "dcgm", "energy_j": 100e3, "duration_s": 500.0, "n_devices": 2}])
    est = estimate_energy(here, rows)
    assert est.kwh == pytest.approx(a100_h * 0.300 + v100_h * 0.100)
    assert est.prior_gpu_hours == 0 and "prior" not in est.text() and "summary.parquet" in est.text()


def _without_tdp(cfg: config.Config, *types: str) -> config.Config:
    return dataclasses.replace(cfg, gpus={name: dataclasses.replace(g, tdp_w=None) if name in types else g
                                          for name, g in cfg.gpus.items()})


def test_energy_of_gpu_types_without_tdp_w_or_measurements_is_unknown_not_0(cfg: config.Config,
                                                                             tmp_path: Path) -> None:
    """Neither A100 nor V100 has tdp_w and nothing is measured: the line says the energy is
    unknown and names the keys to set, whole, within the plan's 120 columns."""
    here = _without_tdp(dataclasses.replace(cfg, output_dir=str(tmp_path / "out")), "A100", "V100")
    line = next(ln for ln in format_plan(here, packing="group").splitlines() if "GPU energy" in ln)
    assert line.startswith("  GPU energy: unknown (no measured A100, V100 cells")
    assert "set gpus.A100.tdp_w, gpus.V100.tdp_w for a prior)" in line
    assert "kWh" not in line and "…" not in line and len(line) <= 120


def test_the_integrity_config_plans_its_energy_as_unknown(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bug report: bench/configs/h200x1_integrity.yaml (H200 without tdp_w) printed
    `0 kWh (...prior: gpus.<type>.tdp_w × ); w…`."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", "--config", str(CONFIG.parent / "bench/configs/h200x1_integrity.yaml")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "GPU energy" in ln)
    assert line == ("  GPU energy: unknown (no measured H200 cells in bench-results/h200x1_integrity/; "
                    "set gpus.H200.tdp_w for a prior)")


def test_energy_leaves_out_the_hours_of_a_type_without_tdp_w_and_says_so(cfg: config.Config,
                                                                        tmp_path: Path) -> None:
    here = _without_tdp(dataclasses.replace(cfg, output_dir=str(tmp_path / "out")), "V100")
    rows, _ = plan_rows(here)
    a100_h = sum(r["gpu_hours"] for r in rows if r["gpu"] == "A100")
    est = estimate_energy(here, rows)
    assert est.kwh == pytest.approx(a100_h * 0.400 * 0.35)
    assert est.missing_types == ("V100",) and est.missing_gpu_hours > 0
    line = next(ln for ln in format_plan(here, packing="group").splitlines() if "GPU energy" in ln)
    assert re.search(r"GPU energy: [\d,.]+ kWh \(estimate; .*\); without [\d,.]+ GPU-hours of V100", line)
    assert "…" not in line and len(line) <= 120


@pytest.mark.parametrize("kwh, shown", [(0.0245, "0.025 kWh"), (0.996, "1.0 kWh"), (3.14159, "3.1 kWh"),
                                        (9.96, "10 kWh"), (1234.4, "1,234 kWh")])
def test_a_small_energy_keeps_two_significant_digits(kwh: float, shown: str) -> None:
    est = EnergyEstimate(kwh=kwh, measured_gpu_hours=0.0, prior_gpu_hours=0.1, missing_gpu_hours=0.0,
                         n_measured_rows=0, source=None, prior_engines=("reference",))
    assert est.text().startswith(f"{shown} (estimate; no measured cells in results/, so prior: ")


def test_a_long_output_dir_gives_way_to_a_shorter_wording() -> None:
    est = EnergyEstimate(kwh=0.0, measured_gpu_hours=0.0, prior_gpu_hours=0.0, missing_gpu_hours=2.0,
                         n_measured_rows=0, source=None, missing_types=("H200",), output_dir="x" * 90)
    assert est.text() == "unknown (no measured H200 cells; set gpus.H200.tdp_w for a prior)"


def test_plan_shows_a_group_split_to_fit_its_partition() -> None:
    """Issue 21 (3): groups whose --time would exceed gpus.<type>.max_time_min are shown as
    their parts (`{group}.cells{first}-{last}`, `part` k/n in JSON), each within the limit."""
    import yaml

    data = yaml.safe_load(CONFIG.read_text())
    data["gpus"]["A100"]["max_time_min"] = 240
    cfg = config.from_dict(data, source="config.yaml", check_files=False)
    text = format_plan(cfg, packing="group")
    assert re.search(r"split:\s+\d+ group\(s\) too long for the partition run as \d+ jobs", text)
    assert max(len(ln) for ln in text.splitlines()) <= 120
    doc = json.loads(format_plan(cfg, fmt="json", packing="group"))
    parts = [g for g in doc["groups"] if g["part"]]
    assert parts and all(".cells" in g["group_id"] for g in parts)
    assert all(g["time_limit_min"] <= 240 for g in doc["groups"] if g["max_time_min"] == 240)
    assert sum(len(g["cells"]) for g in doc["groups"]) == len(expand(cfg).cells)
    assert all(g["max_time_min"] is None for g in doc["groups"] if "_V100_" in g["group_id"])


def test_an_engine_switch_set_where_the_plan_runs_is_named_for_compiled_cells(
        cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray LLMENERGY_* switch in the shell changes what compiled cells measure (it is
    part of their definition): the plan names it, and says nothing when none is set or
    no cell runs the compiled engine (the default config's)."""
    from llmenergy.planning.plan import switches_note

    demo = config.load(CONFIG.parent / "profiles" / "local" / "demo-config.yaml", check_files=False)
    monkeypatch.setenv("LLMENERGY_KEY_BUCKETS", "0")
    assert "switches:" not in format_plan(cfg)  # reference cells only
    cfg = demo
    for name in ("LLMENERGY_DENSE_GEMV", "LLMENERGY_KEY_BUCKETS", "LLMENERGY_COMPILE_PREFILL",
                 "LLMENERGY_GEMV_TUNE", "LLMENERGY_QUANT_BACKEND", "LLMENERGY_QUANT_AUTOTUNE"):
        monkeypatch.delenv(name, raising=False)
    assert "switches:" not in format_plan(cfg)
    monkeypatch.setenv("LLMENERGY_KEY_BUCKETS", "0")
    lines = format_plan(cfg).splitlines()
    (line,) = [ln for ln in lines if ln.startswith("  switches:")]
    assert line == "  switches:   LLMENERGY_KEY_BUCKETS=0 (set here: part of the compiled cells' definitions)"
    assert lines.index(line) < 10  # with the totals, before the table
    assert switches_note(["reference", "hf"]) is None  # only the compiled engine reads them
