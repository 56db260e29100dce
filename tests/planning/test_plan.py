"""`llmenergy plan` on the default config: totals first, ≤120 columns, left-out cells by reason,
caps as `—`/`250 W`, and JSON/CSV with every axis of a cell."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from llmenergy import config
from llmenergy.planning.matrix import expand
from llmenergy.planning.plan import IDENTITY, format_plan, group_reasons, plan_rows

CONFIG = Path(__file__).parents[2] / "config.yaml"


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load(CONFIG, check_files=False)


def test_totals_come_first_and_lines_are_narrow(cfg: config.Config) -> None:
    plan = expand(cfg)
    text = format_plan(cfg, packing="cell")
    lines = text.splitlines()
    head = "\n".join(lines[:6])
    assert f"{len(plan.cells)} planned" in head
    assert f"left out:   {len(plan.infeasible)} cells" in head
    assert re.search(r"GPU-hours:\s+[\d,]+\.\d in all", head)
    assert f"Slurm jobs: {len(plan.cells)}" in head
    first_cell = next(i for i, ln in enumerate(lines) if ln.startswith(plan.cells[0].id))
    assert first_cell < 10
    assert max(len(ln) for ln in lines) <= 120
    assert "None" not in text


def test_power_cap_column_reads_dash_or_watts(cfg: config.Config) -> None:
    text = format_plan(cfg, show_infeasible=False)
    rows = {ln.split()[0]: ln for ln in text.splitlines() if "_reference" in ln}
    assert rows["llama-65b_alpaca_V100_s8_b64_g256_p250W_reference"].split()[3:5] == ["250", "W"]
    assert rows["llama-7b_alpaca_V100_s1_b16_g256_pnone_reference"].split()[3] == "—"
    assert "left out," not in text


def test_left_out_grouped_by_reason_with_counts(cfg: config.Config) -> None:
    _, left_out = plan_rows(cfg)
    text = format_plan(cfg)
    section = text.split("cells left out,")[1].splitlines()[1:]
    counts = [int(m.group(1)) for ln in section if (m := re.match(r"\s+(\d+) × ", ln))]
    groups = group_reasons(left_out)
    assert len(counts) == len(groups) < len({r["reason"] for r in left_out})
    assert sum(counts) == len(left_out) and counts == sorted(counts, reverse=True)
    assert len(section) == 2 * len(groups)  # a reason line and an example line each
    assert "needs 152–259 GB" in text  # memory reasons that differ only in GB share a line
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
    assert f"Slurm jobs: {len(groups)} (packing: group; {len(plan.cells)} with packing: cell)" in text
    assert len(groups) == 31 and max(len(g.cells) for g in groups) == 12
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in {g.id for g in groups}}
    assert len(rows) == len(groups)
    assert rows["llama-7b_A100_s32_pnone_reference"][1:4] == ["12", "8×4", "a100"]
    assert max(len(ln) for ln in lines) <= 120
    doc = json.loads(format_plan(cfg, fmt="json", packing="group"))
    assert sum(len(g["cells"]) for g in doc["groups"]) == len(plan.cells)
    assert all(g["time_limit_min"] >= 15 for g in doc["groups"])


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
