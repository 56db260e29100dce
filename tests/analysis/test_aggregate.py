from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_helpers import make_cell

from llmenergy.analysis.aggregate import _t975_table, aggregate, t_quantile_975
from llmenergy.analysis.metrics import to_table
from llmenergy.atomic import write_parquet
from llmenergy.cellfiles import SCHEMA_VERSION_KEY
from llmenergy.errors import UserError


def _write_rows(root: Path, cell_id: str, values: list[float], **ident: object) -> Path:
    cdir = root / "cells" / cell_id
    rows = [dict(cell_id=cell_id, model="m", gpu="H100", shards=1, batch_size=8, repeat=i,
                 status="ok", j_per_token=v, energy_j=v * 100, tokens_per_s=1000.0 / v,
                 power_source="nvml", **ident) for i, v in enumerate(values)]
    write_parquet(cdir / "metrics.parquet", to_table(rows))
    return cdir


def _t_quantile_by_integration(df: int, q: float = 0.975) -> float:
    """Independent check: bisection on the numerically integrated Student t density."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float) -> float:
        xs = np.linspace(0.0, x, 20001)
        pdf = c * (1 + xs * xs / df) ** (-(df + 1) / 2)
        return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) * np.diff(xs)) / 2)

    lo, hi = 0.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [2, 3, 4, 9, 29])
def test_t_table_matches_integrated_density(df: int) -> None:
    assert _t975_table(np.array([df]))[0] == pytest.approx(_t_quantile_by_integration(df), abs=2e-4)
    values, method = t_quantile_975(np.array([df, 0]))
    assert method in ("scipy", "table")
    assert values[0] == pytest.approx(_t_quantile_by_integration(df), abs=2e-4)
    assert np.isnan(values[1])


def test_stats_mean_std_ci_by_hand(tmp_path: Path) -> None:
    _write_rows(tmp_path, "a", [10.0, 12.0, 14.0])
    _write_rows(tmp_path, "b", [5.0])
    res = aggregate(tmp_path)
    stats = pq.read_table(res.stats_path).to_pandas().set_index("cell_id")
    a = stats.loc["a"]
    mean = (10 + 12 + 14) / 3
    std = math.sqrt(((10 - mean) ** 2 + 0 + (14 - mean) ** 2) / 2)
    assert a["j_per_token_mean"] == pytest.approx(mean)
    assert a["j_per_token_std"] == pytest.approx(std)
    assert a["j_per_token_n"] == 3
    assert a["j_per_token_ci95"] == pytest.approx(_t_quantile_by_integration(2) * std / math.sqrt(3),
                                                  rel=1e-4)
    assert a["n_repeats"] == 3 and a["n_ok"] == 3 and a["status"] == "ok"
    assert stats.loc["b", "j_per_token_n"] == 1
    assert np.isnan(stats.loc["b", "j_per_token_ci95"])  # one repeat: no interval
    meta = pq.read_schema(res.stats_path).metadata
    assert meta[b"llmenergy.t_method"].decode() == res.t_method


def test_corrupt_files_named_and_skipped_statuses_kept(tmp_path: Path) -> None:
    make_cell(tmp_path, "good", repeats=2)
    make_cell(tmp_path, "oom-cell", status="oom", reason="CUDA out of memory", write_events=False)
    bad = make_cell(tmp_path, "truncated", repeats=1) / "metrics.parquet"
    bad.write_bytes(bad.read_bytes()[:200])
    garbage = make_cell(tmp_path, "garbage", repeats=1) / "metrics.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    make_cell(tmp_path, "nometrics", repeats=1, write_metrics=False)
    wrong = tmp_path / "cells" / "wrongtype" / "metrics.parquet"
    write_parquet(wrong, pa.table({"cell_id": ["wrongtype"], "status": [3]}))

    expected = [{"cell_id": "good"}, {"cell_id": "planned-only", "model": "tiny", "batch_size": 2}]
    res = aggregate(tmp_path, expected_cells=expected, grid_gco2_per_kwh=100.0)

    named = {p["cell_id"]: p for p in res.problems}
    assert set(named) == {"truncated", "garbage", "wrongtype"}
    assert named["truncated"]["path"].endswith("truncated/metrics.parquet")
    assert "type" in named["wrongtype"]["error"]
    on_disk = json.loads(res.problems_path.read_text())
    assert {p["cell_id"] for p in on_disk["problems"]} == set(named)

    summary = pq.read_table(res.summary_path)
    assert summary.schema.metadata[SCHEMA_VERSION_KEY] == b"1"
    df = summary.to_pandas()
    status = df.groupby("cell_id")["status"].agg(lambda s: sorted(set(s))).to_dict()
    assert status == {"good": ["ok"], "oom-cell": ["oom"], "truncated": ["missing"],
                      "garbage": ["missing"], "nometrics": ["missing"], "wrongtype": ["missing"],
                      "planned-only": ["missing"]}
    assert (df["cell_id"] == "good").sum() == 2 and (df["cell_id"] == "oom-cell").sum() == 2
    planned = df[df["cell_id"] == "planned-only"].iloc[0]
    assert planned["model"] == "tiny" and planned["batch_size"] == 2
    trunc = df[df["cell_id"] == "truncated"].iloc[0]
    assert trunc["model"] == "tiny" and "metrics.parquet" in trunc["reason"]
    good = df[df["cell_id"] == "good"].iloc[0]
    assert good["gco2e"] == pytest.approx(good["energy_j"] / 3.6e6 * 100.0)
    assert res.status_counts == {"ok": 2, "oom": 2, "missing": 5}
    assert res.n_cells == 7


def test_corrupt_page_with_valid_footer_found_by_fallback(tmp_path: Path) -> None:
    _write_rows(tmp_path, "fine", [1.0, 2.0])
    broken = _write_rows(tmp_path, "badpage", [3.0]) / "metrics.parquet"
    data = bytearray(broken.read_bytes())
    data[4:64] = b"\xff" * 60  # damage the first page header, footer intact
    broken.write_bytes(bytes(data))
    res = aggregate(tmp_path)
    assert [p["cell_id"] for p in res.problems] == ["badpage"]
    df = pq.read_table(res.summary_path).to_pandas()
    assert df.loc[df["cell_id"] == "fine", "j_per_token"].tolist() == [1.0, 2.0]
    assert df.loc[df["cell_id"] == "badpage", "status"].tolist() == ["missing"]


def test_main_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cells"):
        aggregate(tmp_path / "empty")
    _write_rows(tmp_path, "x", [2.0, 4.0])
    aggregate(tmp_path, expected_cells=[{"cell_id": "y"}])
    df = pq.read_table(tmp_path / "summary.parquet").to_pandas()
    assert sorted(df["cell_id"].unique()) == ["x", "y"]


def test_cells_the_plan_no_longer_has_are_named_in_the_report(tmp_path: Path) -> None:
    from llmenergy.analysis.report import render_report

    _write_rows(tmp_path, "old", [2.0, 4.0])
    _write_rows(tmp_path, "now", [1.0, 2.0])
    res = aggregate(tmp_path, expected_cells=[{"cell_id": "now"}])
    assert json.loads(res.problems_path.read_text())["not_in_plan"] == ["old"]
    html = render_report(tmp_path).read_text()
    assert "1 cell(s) are not in the config's plan" in html and "<code>old</code>" in html
    # without a plan to compare with (llmenergy aggregate without --config) nothing is said
    aggregate(tmp_path)
    assert "not in the config's plan" not in render_report(tmp_path).read_text()


def test_failed_and_queued_cells_are_listed_with_reasons_and_logs(tmp_path: Path) -> None:
    """Issue 15 (3): a partial report names the cells not measured, why, and where the logs are."""
    from llmenergy.analysis.report import render_report
    from llmenergy.cellfiles import Cell, CellRecord

    _write_rows(tmp_path, "fine", [1.0, 2.0], fingerprint="aaaa")
    cell = Cell("m", "d", "H100", 2, 8, 16, None)
    crashed = tmp_path / "cells" / cell.id
    (crashed / "logs").mkdir(parents=True)  # Snakemake removed the failed job's cell.json and metrics
    (tmp_path / "logs" / "run_cell").mkdir(parents=True)
    (tmp_path / "logs" / "run_cell" / f"{cell.id}.log").write_text("boom\n")
    (tmp_path / "failed").mkdir()
    CellRecord(cell=cell, status="failed", reason="rank exited with code 1; see logs/", repeats=1,
               launcher="srun").write(tmp_path / "failed" / f"{cell.id}.json")
    res = aggregate(tmp_path, expected_cells=[{"cell_id": "fine"}, cell.identity(), {"cell_id": "queued"}])
    df = pq.read_table(res.summary_path).to_pandas().set_index("cell_id")
    assert df.loc[cell.id, "status"] == "failed" and "rank exited with code 1" in df.loc[cell.id, "reason"]
    assert df.loc["queued", "status"] == "missing" and "not run yet" in df.loc["queued", "reason"]
    assert df.loc["fine", "fingerprint"].tolist() == ["aaaa", "aaaa"]

    html = render_report(tmp_path).read_text()
    table = html[html.index('id="not-measured"'):]
    table = table[:table.index("</table>")]
    assert "2 cell(s) have no ok measurement" in table
    assert cell.id in table and "queued" in table and "fine" not in table
    assert f"failed/{cell.id}.json" in table and f"logs/run_cell/{cell.id}.log" in table
    assert f"cells/{cell.id}/logs/" in table


def test_two_fingerprints_under_one_cell_id_are_refused(tmp_path: Path) -> None:
    from llmenergy.errors import RecordError

    cdir = tmp_path / "cells" / "mixed"
    rows = [dict(cell_id="mixed", repeat=i, status="ok", fingerprint=fp) for i, fp in enumerate(["a", "b"])]
    write_parquet(cdir / "metrics.parquet", to_table(rows))
    with pytest.raises(RecordError, match="mixed.*more than one fingerprint"):
        aggregate(tmp_path)


def test_stats_carry_the_cell_balance_once_and_energy_complete_of_every_row(tmp_path: Path) -> None:
    _write_rows(tmp_path, "a", [10.0, 12.0], compile_j=5000.0, balance_total_j=9000.0,
                energy_complete=True)
    cdir = tmp_path / "cells" / "b"
    rows = [dict(cell_id="b", repeat=i, status="ok", power_source="nvml", compile_j=0.0,
                 energy_complete=ok) for i, ok in enumerate([True, False])]
    write_parquet(cdir / "metrics.parquet", to_table(rows))
    _write_rows(tmp_path, "c", [3.0])  # no collector: energy_complete null
    res = aggregate(tmp_path)
    stats = pq.read_table(res.stats_path).to_pandas().set_index("cell_id")
    assert stats.loc["a", "compile_j"] == 5000.0 and stats.loc["a", "balance_total_j"] == 9000.0
    assert stats.loc["b", "compile_j"] == 0.0
    assert stats.loc["a", "energy_complete"] == True  # noqa: E712
    assert stats.loc["b", "energy_complete"] == False  # noqa: E712
    assert stats["energy_complete"].isna()["c"]
    summary = pq.read_table(res.summary_path).to_pandas()
    assert "balance_unattributed_j" in summary.columns and "tokens_after_eos" in summary.columns


def test_cells_metered_under_older_rules_are_recomputed_from_their_raw_files(tmp_path: Path) -> None:
    """A metrics file without this version's rules (an older llmenergy wrote it) does not pass
    for current: aggregate computes its rows again from events and power, leaves the file as
    it is, and says so; one without raw files keeps its rows and is named."""
    from llmenergy.analysis.metrics import RULES_KEY, RULES_VERSION
    from llmenergy.analysis.report import render_report

    make_cell(tmp_path, "current")
    old_dir = make_cell(tmp_path, "older")
    gone_dir = make_cell(tmp_path, "older-no-events")
    truth = pq.read_table(old_dir / "metrics.parquet").column("energy_j").to_pylist()
    for d in (old_dir, gone_dir):  # as an older version wrote them: other numbers, no rules key
        t = pq.read_table(d / "metrics.parquet")
        meta = {k: v for k, v in (t.schema.metadata or {}).items() if k != RULES_KEY}
        i = t.schema.get_field_index("energy_j")
        t = t.set_column(i, t.schema.field(i), pa.array([2 * e for e in t.column("energy_j").to_pylist()]))
        write_parquet(d / "metrics.parquet", t.replace_schema_metadata(meta))
    (gone_dir / "events.parquet").unlink()
    on_disk = (old_dir / "metrics.parquet").read_bytes()

    result = aggregate(tmp_path)
    summary = pq.read_table(result.summary_path).to_pandas().set_index(["cell_id", "repeat"])
    assert summary.loc["older", "energy_j"].tolist() == pytest.approx(truth)
    assert summary.loc["older-no-events", "energy_j"].tolist() == pytest.approx([2 * e for e in truth])
    found = json.loads(result.problems_path.read_text())
    assert found["remetered"] == ["older"]
    assert found["older_rules_kept"] == [{"cell_id": "older-no-events", "status": "ok", "why": "no events.parquet"}]
    assert found["rules_version"] == RULES_VERSION
    assert (old_dir / "metrics.parquet").read_bytes() == on_disk
    text = render_report(tmp_path).read_text()
    assert "1 cell(s) were metered under older rules" in text and "1 cell(s) keep numbers computed" in text
    assert "<code>older-no-events</code></td><td>ok</td><td>no events.parquet</td>" in text


def _as_older(cdir: Path) -> None:
    """Rewrite a cell's metrics.parquet as an older version wrote it (no rules key)."""
    from llmenergy.analysis.metrics import RULES_KEY

    t = pq.read_table(cdir / "metrics.parquet")
    write_parquet(cdir / "metrics.parquet",
                  t.replace_schema_metadata({k: v for k, v in (t.schema.metadata or {}).items() if k != RULES_KEY}))


def test_an_older_cell_is_computed_again_only_from_all_the_raw_inputs_it_was_first_computed_from(
        tmp_path: Path) -> None:
    """Raw files lost or broken since the first computation keep the older rows (named, with
    why): computed again from less, their numbers would be nulls, not news; a cell without a
    record keeps its status; a failure inside the computation keeps the cell, not the aggregate."""
    from llmenergy.analysis.metrics import compute_cell_metrics
    from trace_helpers import nvml_trace, standard_segments, timeline, write_trace_cell

    cases = {"no-power": "no power.parquet", "bad-power": "power.parquet does not read",
             "no-responses": "no responses.parquet", "no-record": "no readable cell.json",
             "no-batch-index": "computing it again failed: KeyError", "cpu-no-power": "no power.parquet"}
    before = {}
    for name in cases:
        if name == "cpu-no-power":  # a CPU rank metered by RAPL alone: its power source says none
            rapl = nvml_trace(timeline(standard_segments()), device="cpu-package-0").assign(
                domain="cpu_package", source="rapl")
            cdir, _ = write_trace_cell(tmp_path, name, power=rapl, collector="auto",
                                       gpus=[{"node": "node0", "rank": 0, "uuid": "cpu", "name": "cpu", "index": -1}])
            write_parquet(cdir / "metrics.parquet", compute_cell_metrics(cdir))
        else:
            cdir = make_cell(tmp_path, name)
        _as_older(cdir)
        before[name] = pq.read_table(cdir / "metrics.parquet").to_pandas()
    (tmp_path / "cells" / "cpu-no-power" / "power.parquet").unlink()
    assert before["cpu-no-power"]["power_source"].eq("none").all() and before["cpu-no-power"]["cpu_energy_j"].notna().all()
    (tmp_path / "cells" / "no-power" / "power.parquet").unlink()
    bad = tmp_path / "cells" / "bad-power" / "power.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (tmp_path / "cells" / "no-responses" / "responses.parquet").unlink()
    (tmp_path / "cells" / "no-record" / "cell.json").unlink()
    ev_path = tmp_path / "cells" / "no-batch-index" / "events.parquet"
    write_parquet(ev_path, pq.read_table(ev_path).drop_columns(["batch_index"]))

    result = aggregate(tmp_path)
    found = json.loads(result.problems_path.read_text())
    assert found["remetered"] == [] and found["status_changed"] == []
    kept = {k["cell_id"]: k["why"] for k in found["older_rules_kept"]}
    assert set(kept) == set(cases)
    for name, why in cases.items():
        assert kept[name].startswith(why), (name, kept[name])
    summary = pq.read_table(result.summary_path).to_pandas()
    for name, old in before.items():
        rows = summary[summary["cell_id"] == name].sort_values("repeat")
        for col in ("energy_j", "cpu_energy_j"):
            assert rows[col].tolist() == pytest.approx(old.sort_values("repeat")[col].tolist(), nan_ok=True)
        assert set(rows["status"]) == {"ok"} and rows["words_out"].notna().all()


def test_an_older_failed_cell_without_measurements_is_neither_recomputed_nor_kept(tmp_path: Path) -> None:
    """A failed cell's rows hold no measured number that other rules would change: nothing to say."""
    from llmenergy.analysis.remeter import kept_entries

    cdir = make_cell(tmp_path, "failed", status="failed", reason="RuntimeError: boom", write_events=False)
    _as_older(cdir)
    result = aggregate(tmp_path)
    found = json.loads(result.problems_path.read_text())
    assert (found["remetered"], found["older_rules_kept"]) == ([], [])
    assert set(pq.read_table(result.summary_path).column("status").to_pylist()) == {"failed"}
    # a problems file of before older_rules_kept said why: names alone
    assert kept_entries({"older_rules_kept": ["a"]}) == [{"cell_id": "a", "status": "", "why": ""}]


def test_an_older_cell_whose_status_changes_under_the_new_rules_is_named_for_the_next_run(
        tmp_path: Path) -> None:
    """Old rows ok, the same raw files now give incomplete energy (here a GPU the ranks used that the
    power file never metered): the new rows say so, and the cell is named, since its cell.json,
    which decides what reruns, still says ok."""
    from llmenergy.analysis.metrics import RULES_VERSION
    from llmenergy.analysis.remeter import status_changed_since
    from llmenergy.analysis.report import render_report
    from llmenergy.cellfiles import CellRecord

    cdir = make_cell(tmp_path, "changed")
    _as_older(cdir)
    record = CellRecord.read(cdir / "cell.json")
    gpus = [*record.provenance.gpus, {**record.provenance.gpus[0], "uuid": "GPU-never-metered", "rank": 1}]
    record = dataclasses.replace(record, provenance=dataclasses.replace(record.provenance, gpus=gpus))
    record.write(cdir / "cell.json")

    result = aggregate(tmp_path)
    found = json.loads(result.problems_path.read_text())
    assert found["remetered"] == ["changed"]
    (changed,) = found["status_changed"]
    assert (changed["cell_id"], changed["was"], changed["now"]) == ("changed", "ok", "incomplete")
    assert "GPU-never-metered" in changed["why"]
    assert CellRecord.read(cdir / "cell.json").status == "ok"  # aggregate writes no cell file
    text = render_report(tmp_path).read_text()
    assert "1 of them changed status under this version's rules" in text
    assert "the\nnext run of the workflow" in text and "no longer plans is not rerun" in text
    # the workflow's next parse reads it back (smk.Context.rules_changed_cells) while cell.json
    # is the one the aggregate read, and not once the cell was measured again
    records = {"changed": cdir / "cell.json", "other": tmp_path / "cells" / "other" / "cell.json"}
    ((cid, why),) = status_changed_since(result.problems_path, records)
    assert cid == "changed" and why.startswith(f"under metrics rules {RULES_VERSION} its rows say incomplete, "
                                               "its cell.json ok: ") and "GPU-never-metered" in why
    dataclasses.replace(record, reason="measured again").write(cdir / "cell.json")
    assert status_changed_since(result.problems_path, records) == []
    (cdir / "cell.json").unlink()
    assert status_changed_since(result.problems_path, records) == []
    assert status_changed_since(tmp_path / "absent.json", records) == []
