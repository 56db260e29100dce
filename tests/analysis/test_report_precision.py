"""The precision axis in the report (analysis/precision.py): each int8 cell beside its fp16
cell with the energy and throughput ratios, the logits against fp16 and, for GSM8K, the
accuracy and J per correct answer of both; synthetic weights marked; nothing too wide."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from report_helpers import CHROMIUM, chromium_probe, synthetic_summary, write_results
from test_report_layout import _WIDTH_JS

from llmenergy.analysis.report import render_report


def _render(root: Path, *, synthetic: bool = False) -> str:
    summary = synthetic_summary(datasets=("alpaca", "gsm8k"), batch=(1, 16), engines=("compiled",),
                                precisions=("fp16", "int8"))
    summary["weights_synthetic"] = synthetic
    write_results(root, summary)
    return render_report(root).read_text()


def _section(html: str) -> str:
    return html.split('id="precision"')[1].split('id="energy"')[0]


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _render(tmp_path_factory.mktemp("prec"))


def test_each_int8_cell_beside_its_fp16_cell(html: str) -> None:
    table = _section(html)
    rows = re.findall(r"<tr><td><code>([^<]+)</code></td><td>int8</td>(.*?)</tr>", table, re.S)
    assert sorted(c for c, _ in rows) == sorted(
        f"7B_{d}_H200_s1_b{b}_g256_pdefault_compiled_int8" for d in ("alpaca", "gsm8k") for b in (1, 16))
    for cid, cells in rows:
        # int8: 0.9× the power at 1.5× the tokens/s of fp16 → 0.60× the energy per token
        assert "0.60× (" in cells and "1.50× (" in cells, cid
        assert "0.012 (0.025)" in cells and "0.004" in cells and "0.98" in cells, cid
        if "_gsm8k_" in cid:  # graded: int8's accuracy and J per correct answer, fp16's in brackets
            # batch 16: 18 of 64 right (fp16: 19), at 0.60× the energy → 0.60 · 19/18 the J per correct
            want = ("0.25 (0.25)", "52.5 (87.5)") if "_b1_" in cid else ("0.281 (0.297)", "3.09 (4.87)")
            assert all(f'<td class="num">{w}</td>' in cells for w in want), (cid, cells)
        else:
            assert cells.count("—") == 2, cid  # no accuracy, no J per correct answer
        assert "not meaningful" not in cells


def test_all_cells_table_names_each_cells_precision(html: str) -> None:
    cells = html.split('id="cells"')[1].split('id="balance"')[0]
    head = re.findall(r"<th>([^<]+)</th>", cells.split("</tr>")[0])
    column = head.index("Engine, precision")
    rows = re.findall(r"<tr>(<td><code class=\"id\">([^<]+)</code>.*?)</tr>", cells, re.S)
    precisions = {cid: re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[column].split("<br>")[1]
                  for row, cid in rows}
    assert precisions and all(p == ("int8" if cid.endswith("_int8") else "fp16")
                              for cid, p in precisions.items()), precisions


def test_precision_in_the_comparisons_and_findings(html: str) -> None:
    comp = html.split('id="comparisons"')[1].split('id="precision"')[0]
    assert re.search(r"<td>precision \(weights\)</td><td>int8 vs fp16</td><td class=\"num\">4", comp)
    assert "Precision int8 uses 0.60×" in html


def test_synthetic_weights_are_marked_not_meaningful(tmp_path: Path) -> None:
    table = _section(_render(tmp_path / "syn", synthetic=True))
    assert table.count("<strong>not meaningful</strong>: synthetic (random) weights") == 4


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_the_precision_report_fits_a_1280px_window(html: str, tmp_path: Path) -> None:
    out = chromium_probe(html, tmp_path, _WIDTH_JS, width=1280)
    assert out["page"] <= out["vw"] and out["wide"] == [], out
    assert out["scrolled"] == [], "a table needs horizontal scrolling at 1,280 px"


def test_the_short_answer_names_the_precision_and_compares_with_the_papers_fp16(tmp_path: Path) -> None:
    summary = synthetic_summary(engines=("reference", "compiled"), precisions=("fp16", "int8"))
    write_results(tmp_path, summary)
    box = render_report(tmp_path).read_text().split('id="answer"')[1].split('id="matrix"')[0]
    assert "engine compiled, precision int8, batch 16" in box
    # compiled int8: 1.1 · 0.9 the power at 2 · 1.5 the tokens/s of reference fp16 → 0.33×
    assert "0.33× (" in box and "the J/token of reference fp16 at the same settings" in box
    assert 'href="#precision"' in box.split("</section>")[1]  # the contents line links the section
