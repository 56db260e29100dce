"""The report of the issue-23 matrix (7B × {alpaca, gsm8k} × batch {16, 64} × engine
{reference, compiled} on one GPU, from a synthetic summary of that shape): the short answer
on the first screen, the reference engine in every metric family, the engine figure, the
ratio table, flags one click away, and nothing wider than a 1,280-px window in Chromium."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from report_helpers import CHROMIUM, chromium_probe, synthetic_summary, write_results

from llmenergy.analysis.plots import FAMILIES
from llmenergy.analysis.report import render_report

FLAGGED = "7B_gsm8k_H200_s1_b16_g256_pdefault_reference"
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="chromium is not installed (Debian package `chromium`)")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("accept")
    summary = synthetic_summary(datasets=("alpaca", "gsm8k"), batch=(16, 64),
                                engines=("reference", "compiled"), short_cells=(FLAGGED,))
    write_results(root, summary)
    render_report(root)
    return root


@pytest.fixture(scope="module")
def html(results: Path) -> str:
    return (results / "report.html").read_text()


def test_short_answer_comes_first(html: str) -> None:
    top = html.split('id="matrix"')[0]
    box = top.split('id="answer"')[1]
    assert "7B on H200" in box
    assert "engine compiled, batch 64, cap default, dataset gsm8k" in box
    assert "0.55× (" in box and "45 % less energy per token" in box
    assert "the paper's setting (engine reference)" in box


def test_matrix_lists_the_papers_engine_first(html: str) -> None:
    matrix = html.split('id="matrix"')[1].split('id="findings"')[0]
    assert re.search(r"<td>engine</td><td>reference, compiled</td>", matrix)


def test_reference_engine_in_every_family_and_engine_figure(results: Path, html: str) -> None:
    manifest = {f["name"]: f for f in json.loads((results / "figures" / "index.json").read_text())}
    reference = {f"7B_{d}_H200_s1_b{b}_g256_pdefault_reference"
                 for d in ("alpaca", "gsm8k") for b in (16, 64)}
    for family, names in FAMILIES.items():
        drawn = set().union(*(manifest[n]["cells"] for n in names if not manifest[n]["skipped"]))
        assert reference <= drawn, family
    assert not manifest["engine_comparison"]["skipped"]
    assert 'id="fig-engine_comparison"' in html
    assert manifest["j_per_token_vs_batch"]["flagged"] == [FLAGGED]


def test_ratio_table_and_findings(html: str) -> None:
    comp = html.split('id="comparisons"')[1].split('id="figures"')[0]
    row = re.search(r"<tr><td>engine</td><td>compiled vs reference</td>.*?</tr>", comp, re.S)
    assert row and "0.55× (" in row.group(0) and "2.00× (" in row.group(0)
    assert "delta method" in comp
    findings = html.split('id="findings"')[1].split('id="comparisons"')[0]
    assert "Engine compiled uses 0.55×" in findings
    assert "Energy per output token falls as the batch size grows. (§IV-B)" in findings
    assert re.search(r"falls as the batch size grows.*?</td>\s*<td class=\"holds\">holds</td>",
                     findings, re.S)


def test_flag_is_marked_where_the_number_is_read(html: str) -> None:
    cells = html.split('id="cells"')[1].split('id="flagged"')[0]
    marks = re.findall(rf'<a class="flag" href="#flag-{FLAGGED}" title="Flagged: ([^"]*)">', cells)
    # a short window concerns the whole repeat: beside the cell id and beside its J/token
    assert len(marks) == 2 and all("short window" in m for m in marks)
    assert f'<tr id="flag-{FLAGGED}">' in html  # the link's target, with the reason
    clean = "7B_alpaca_H200_s1_b16_g256_pdefault_reference"
    assert f'href="#flag-{clean}"' not in html


_WIDTH_JS = """
var vw = document.documentElement.clientWidth, wide = [];
document.querySelectorAll('body *').forEach(function (el) {
  var r = el.getBoundingClientRect();
  if (r.right > vw + 1 || r.width > vw) {
    wide.push(el.tagName + '.' + el.className + ' ' + Math.round(r.width) + 'px');
  }
});
var scrolled = [];
document.querySelectorAll('.tw').forEach(function (el) {
  if (el.scrollWidth > el.clientWidth + 1) { scrolled.push(el.scrollWidth + '>' + el.clientWidth); }
});
var box = document.getElementById('answer').getBoundingClientRect();
window.__probe = {vw: vw, page: document.documentElement.scrollWidth, wide: wide.slice(0, 20),
                  scrolled: scrolled, answer_bottom: box.bottom, answer_top: box.top};
"""


@needs_chromium
def test_nothing_wider_than_a_1280px_window_and_answer_on_first_screen(
        html: str, tmp_path: Path) -> None:
    out = chromium_probe(html, tmp_path, _WIDTH_JS, width=1280)
    assert out["vw"] <= 1280
    assert out["page"] <= out["vw"], out
    assert out["wide"] == [], out["wide"]
    assert out["scrolled"] == [], "a table needs horizontal scrolling at 1,280 px"
    assert out["answer_top"] >= 0 and out["answer_bottom"] <= 900  # the first screen


@needs_chromium
def test_the_mixed_results_report_fits_too(tmp_path: Path) -> None:
    """A report with failed, estimated and flagged cells and long ids: still no overflow."""
    from report_helpers import make_cell

    from llmenergy.analysis.aggregate import aggregate

    root = tmp_path / "results"
    for bs in (1, 4):
        make_cell(root, f"llama-2-70b-chat_alpaca_H100-SXM5-80GB_s8_b{bs}_g512_pdefault_reference",
                  batch_size=bs, decode_s=1.0 + bs)
    make_cell(root, "big-oom-with-a-very-long-reason", model="big", batch_size=64, status="oom",
              reason="CUDA out of memory. Tried to allocate 20.00 GiB; GPU 0 has a total capacity of "
                     "79.10 GiB of which 1.2 GiB is free." * 2, write_events=False)
    make_cell(root, "tiny-est", batch_size=2, power="estimate")
    make_cell(root, "tiny-gsm8k", dataset="gsm8k", correct=True, counter_scale=1.03)
    aggregate(root)
    page = render_report(root).read_text()
    out = chromium_probe(page, tmp_path, _WIDTH_JS, width=1280)
    assert out["page"] <= out["vw"] and out["wide"] == [], out


INCOMPLETE = "7B_gsm8k_H200_s1_b64_g256_pdefault_compiled"
INCOMPLETE_WHY = ("energy incomplete in 1 repeat(s) (repeat 2: energy_j null: no power samples "
                  "of node2/GPU-7 (rank 1))")


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The matrix as on an H200: every prefill below the sensor's resolution, a balance per
    cell with a withheld warm-up, and one cell recorded incomplete."""
    root = tmp_path_factory.mktemp("gpu")
    summary = synthetic_summary(datasets=("alpaca", "gsm8k"), batch=(16, 64),
                                engines=("reference", "compiled"), real_gpu=True)
    bad = summary["cell_id"] == INCOMPLETE
    summary.loc[bad, "status"] = "incomplete"
    summary.loc[bad, "reason"] = INCOMPLETE_WHY
    write_results(root, summary)
    render_report(root)
    return root


@pytest.fixture(scope="module")
def gpu_html(gpu_results: Path) -> str:
    return (gpu_results / "report.html").read_text()


def _section(html: str, start: str, end: str) -> str:
    return html.split(f'id="{start}"')[1].split(f'id="{end}"')[0]


def test_balance_table_populated_with_reasons_for_null_parts(gpu_html: str) -> None:
    table = _section(gpu_html, "balance", "flagged")
    head = re.search(r"<tr><th>Cell</th>.*?</tr>", table, re.S).group(0)  # type: ignore[union-attr]
    labels = re.findall(r"<th>([^<]+)", head)
    assert labels == ["Cell", "Span (s)", "Total (J)", "Idle", "Load", "Compile", "Warm-up",
                      "Measured (prefill + decode)", "Gaps", "Unattributed"]
    cid = "7B_alpaca_H200_s1_b16_g256_pdefault_compiled"
    row = re.search(rf"<tr><td><code class=\"id\">{cid}</code>.*?</tr>", table, re.S).group(0)  # type: ignore[union-attr]
    cells = re.findall(r'<td class="num">(.*?)</td>', row, re.S)
    text = [re.sub(r"<[^>]+>", " ", c).split() for c in cells]
    assert text[0] == ["90"] and text[1] == ["10,000"]  # span (s), total (J)
    assert text[2] == ["1,000", "10", "%"]  # idle: J and % of the total
    assert text[4] == ["1,500", "15", "%", "40", "s"]  # compile: J, %, seconds
    assert text[7] == ["500", "5", "%", "2", "s"]  # gaps
    # withheld parts: an em dash whose tooltip gives the reason, and the reason listed below
    assert re.search(r'<span class="null" title="balance_warmup_j null: 1 of 1 window\(s\) last '
                     r'0.400 s, under 10 sensor update periods \(1.00 s\)">—</span>', cells[5])
    assert ('<span class="null" title="null: the rest of the total is unknown while Warm-up is '
            'withheld">—</span>') in cells[8]
    nulls = table.split('id="balance-nulls"')[1]
    assert re.search(r"<li>Warm-up: balance_warmup_j null: 1 of 1 window\(s\) last 0.400 s, "
                     rf"under 10 sensor update periods \(1.00 s\); in 8 cells: .*{cid}", nulls)
    assert f'{INCOMPLETE}</code> <a class="status-bad" href="#not-measured">incomplete</a>' in table
    reference = "7B_alpaca_H200_s1_b16_g256_pdefault_reference"
    ref_row = re.search(rf"<code class=\"id\">{reference}</code>.*?</tr>", table, re.S).group(0)  # type: ignore[union-attr]
    assert re.findall(r'<td class="num">(.*?)</td>', ref_row, re.S)[4].startswith("0<br>")


def test_prefill_not_resolved_decode_still_drawn(gpu_results: Path, gpu_html: str) -> None:
    manifest = {f["name"]: f for f in json.loads((gpu_results / "figures" / "index.json").read_text())}
    fig = manifest["prefill_vs_decode_energy"]
    assert not fig["skipped"]
    assert fig["caption"].startswith("Prefill is not drawn: prefill windows shorter than 10 sensor "
                                     "update periods: not resolved; see docs/measurement.md.")
    # every ok cell's decode, but gsm8k × compiled: its panel keeps one batch size (64 is incomplete)
    assert len(fig["cells"]) == 6 and "7B_gsm8k_H200_s1_b16_g256_pdefault_compiled" not in fig["cells"]
    note = " ".join(_section(gpu_html, "energy", "figures").split())
    assert "updated every 100 ms, so windows under 1 s are withheld" in note
    assert "docs/measurement.md" in note and "null" in note


def test_a_withheld_phase_marks_the_cell_not_its_headline_numbers(gpu_html: str) -> None:
    """Every repeat's prefill energy is withheld (as on an H200): the cell is marked where
    its phases are shown, but its J/token, tokens/s and their ratios are whole-window
    numbers the clause does not touch, so the answer, best-cell and ratio tables carry no mark."""
    for start, end in (("answer", "matrix"), ("findings", "paper"), ("comparisons", "energy")):
        assert '<a class="flag"' not in _section(gpu_html, start, end), start
    cid = "7B_alpaca_H200_s1_b16_g256_pdefault_compiled"
    cells = _section(gpu_html, "cells", "balance")
    row = re.search(rf"<tr><td><code class=\"id\">{cid}</code>(.*?)</tr>", cells, re.S).group(1)  # type: ignore[union-attr]
    marks = re.findall(r'<a class="flag" href="#flag-[^"]*" title="Flagged: ([^"]*)">', row)
    assert len(marks) == 1 and marks[0].startswith("repeats 0, 1, 2: prefill_energy_j null")
    assert row.startswith(' <a class="flag"')  # beside the cell id, not its J/token
    assert f'href="#flag-{cid}"' in _section(gpu_html, "balance", "balance-nulls")


def test_energy_reason_in_flagged_repeats_and_incomplete_cell_listed(gpu_html: str) -> None:
    flagged = _section(gpu_html, "flag-table", "not-measured")
    assert re.search(r"<td class=\"num\">0, 1, 2</td><td>prefill_energy_j null: 4 of 4 window\(s\) "
                     r"last 0.025-0.141 s, under 10 sensor update periods", flagged)
    assert INCOMPLETE not in flagged  # not ok: listed below instead
    missing = _section(gpu_html, "not-measured", "problems")
    row = re.search(rf"<tr><td><code>{INCOMPLETE}</code></td>.*?</tr>", missing, re.S).group(0)  # type: ignore[union-attr]
    assert ">incomplete<" in row and INCOMPLETE_WHY in row


@needs_chromium
def test_the_energy_integrity_report_fits_too(gpu_html: str, tmp_path: Path) -> None:
    out = chromium_probe(gpu_html, tmp_path, _WIDTH_JS, width=1280)
    assert out["page"] <= out["vw"] and out["wide"] == [] and out["scrolled"] == [], out


def test_flagged_reasons_counted_by_kind_before_each_cell(gpu_html: str, html: str) -> None:
    """Every ok repeat (7 ok cells × 3) has its prefill withheld, each cell with its own
    window lengths: one kind, said once with its counts, above the per-cell rows."""
    flagged = _section(gpu_html, "flag-table", "not-measured")
    kinds = flagged.split('id="flag-kinds"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]*)</td><td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td></tr>", kinds)
    assert [(why.split(" null:")[0], int(n), int(c)) for why, n, c in rows] == [
        ("prefill_energy_j", 21, 7), ("balance_warmup_j", 21, 7)]
    assert flagged.index('id="flag-kinds"') < flagged.index("<th>Why flagged</th>")
    assert 'id="flag-kinds"' not in html  # one flagged repeat: its row says it all


def test_a_part_withheld_in_many_cells_with_their_own_numbers_is_one_line(tmp_path: Path) -> None:
    summary = synthetic_summary(batch=(16, 64), engines=("reference", "compiled"), real_gpu=True)
    one = summary["cell_id"] == "7B_alpaca_H200_s1_b64_g256_pdefault_compiled"
    summary.loc[one, "energy_reason"] = summary.loc[one, "energy_reason"].str.replace(
        "last 0.400 s", "last 0.650 s")
    write_results(tmp_path, summary)
    render_report(tmp_path)
    nulls = (tmp_path / "report.html").read_text().split('id="balance-nulls"')[1].split("</details>")[0]
    lines = re.findall(r"<li>(.*?)</li>", nulls, re.S)
    warmup = [ln for ln in lines if ln.startswith("Warm-up:")]
    assert len(warmup) == 1, lines  # four cells, one kind of reason
    assert warmup[0].startswith("Warm-up: balance_warmup_j null: 1 of 1 window(s) last 0.400 s, under 10 "
                                "sensor update periods (1.00 s) (the numbers are the first cell&#39;s); "
                                "in 4 cells: ")
    assert [ln.split(":")[0] for ln in lines] == ["Warm-up", "Unattributed"]
