from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_helpers import make_cell

from llmenergy import cli
from llmenergy.analysis.aggregate import aggregate
from llmenergy.analysis.report import render_report
from llmenergy.errors import UserError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for bs in (1, 4):
        for shards in (1, 2):
            # how the compiled engine ran (provenance.load): mixed here on purpose
            load = {"prefill": "compiled", "decode_key_buckets": [64, 128] if shards == 1 else [136],
                    "dense_gemv": bs == 1 and shards == 2,
                    "engine_index": 0 if bs == 1 else 1, "shared_engine": bs == 4 and shards == 2,
                    # recorded since session 21; a later engine recorded before it was after a reset
                    **({"engine_after_reset": False} if bs == 4 and shards == 2 else {})}
            make_cell(root, f"tiny-h100-s{shards}-bs{bs}", batch_size=bs, shards=shards,
                      power_w=100.0 + 20 * shards, decode_s=1.0 + bs, load=load)
    make_cell(root, "tiny-v100-s1-bs4", gpu="V100", batch_size=4, power_w=80.0, decode_s=8.0)
    make_cell(root, "tiny-h100-cap", batch_size=4, power_cap_w=200.0, power_w=90.0, decode_s=5.5)
    make_cell(root, "big-oom", model="big", batch_size=64, status="oom",
              reason="CUDA out of memory", write_events=False)
    make_cell(root, "tiny-est", batch_size=2, power="estimate")
    make_cell(root, "tiny-short", batch_size=3, n_batches=1, decode_s=1.0)  # 1.5 s < 5 s
    make_cell(root, "tiny-gsm8k", dataset="gsm8k", correct=True, counter_scale=1.03)
    bad = make_cell(root, "corrupt-cell", repeats=1) / "metrics.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    aggregate(root)
    return root


@pytest.fixture(scope="module")
def html(results: Path) -> str:
    path = render_report(results, extra={"note": "<script>alert('x')</script>"})
    return path.read_text()


def test_sections_and_flags_present(html: str) -> None:
    for text in ("Matrix and status", "Findings", "Comparisons", "All cells", "Failed and flagged cells",
                 "Aggregation problems", "Provenance", "How to rerun",
                 "snakemake --profile profiles/slurm"):
        assert text in html, text
    assert "Energy is an ESTIMATE for 1 cell(s)" in html
    assert "CUDA out of memory" in html and "big-oom" in html
    assert "corrupt-cell/metrics.parquet" in html  # named problem file
    short = html.split("Short measurement windows")[1].split("</table>")[0]
    assert "tiny-short" in short and "tiny-h100-s1-bs1" not in short  # 1.5 s vs exactly 5 s
    assert "discrepancy above 1.0%" in html and "tiny-gsm8k" in html
    assert "not meaningful" in html  # GSM8K accuracy with synthetic weights
    assert "abc1234" in html  # provenance git commit
    # the short repeat is marked in the cells table, its reason one click away
    cells = html.split('id="cells"')[1].split('id="flagged"')[0]
    assert re.search(r'<a class="flag" href="#flag-tiny-short" title="Flagged: repeats? 0(, 1)?: short window', cells)
    assert '<tr id="flag-tiny-short">' in html


def test_key_findings_best_j_per_token_per_model(html: str, results: Path) -> None:
    import pandas as pd

    stats = pd.read_parquet(results / "summary_stats.parquet")
    tiny = stats[(stats["model"] == "tiny") & (stats["status"] == "ok")]
    best = tiny.loc[tiny["j_per_token_mean"].idxmin()]
    section = html.split('id="findings"')[1].split('id="figures"')[0]
    assert f"{best['j_per_token_mean']:.3g}" in section
    assert f"batch_size={int(best['batch_size'])}" in section


def test_self_contained_and_escaped(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "url(" not in html and "@import" not in html
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(srcs) >= 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


def test_no_power_banner_and_skipped_figures(tmp_path: Path) -> None:
    make_cell(tmp_path, "a", power="none")
    make_cell(tmp_path, "b", power="none", batch_size=8)
    aggregate(tmp_path)
    assert cli.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert "No power sensor: energy columns are empty" in text
    assert "Figures not drawn" in text and "energy columns are empty" in text.split("Figures not drawn")[1]
    assert "tokens_per_s_vs_batch" in text
    with pytest.raises(UserError, match="summary"):
        render_report(tmp_path / "nothing")


_CHECK_JS = """<script>
var violations = [];
document.addEventListener('securitypolicyviolation', function (e) { violations.push(e.blockedURI); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var res = performance.getEntriesByType('resource').map(function (r) { return r.name; })
      .filter(function (n) { return n.indexOf('data:') !== 0; });
  var out = {n: imgs.length, decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
             widths: imgs.map(function (i) { return i.naturalWidth; }), violations: violations, resources: res};
  var pre = document.createElement('pre'); pre.id = 'llmenergy-check';
  pre.textContent = 'CHECK' + JSON.stringify(out) + 'END'; document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_renders_in_headless_chromium(html: str, tmp_path: Path) -> None:
    # the report's CSP forbids scripts; the test copy allows only this inline check script
    probe = html.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    probe = probe.replace("</body>", _CHECK_JS + "</body>")
    page = tmp_path / "probe.html"
    page.write_text(probe)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="llmenergy-check">CHECK(.*?)END</pre>', proc.stdout)
    assert match, f"no check output; rc={proc.returncode} stderr={proc.stderr[-2000:]}"
    out = json.loads(match.group(1).replace("&quot;", '"'))
    assert out["n"] >= 4
    assert out["decoded"] == out["n"], out["widths"]
    assert min(out["widths"]) > 100
    assert out["violations"] == [] and out["resources"] == []


def test_provenance_table_shows_the_versions_cell_json_records(html: str) -> None:
    """Issue 14: the versions sit under provenance.versions in cell.json (as the launcher
    writes them, see report_helpers.make_cell); the table used to read other keys and show —."""
    prov = html.split('id="provenance"')[1].split("</table>")[0]
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", prov))
    assert rows["llmenergy version"] == "0.1.0"
    assert rows["torch version"] == "2.13.0" and rows["python version"] == "3.11.7"
    assert rows["GPU driver"] == "999.1" and rows["git commit"] == "abc1234"


def test_provenance_table_counts_the_cells_by_how_the_compiled_engine_ran(html: str) -> None:
    """A switch such as LLMENERGY_DENSE_GEMV changes J/token but not a cell's id: a run that
    mixes settings says so, with the cells of each (cells that recorded none are not counted)."""
    prov = html.split('id="provenance"')[1].split("</table>")[0]
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", prov))
    assert rows["compiled: decode attention"] == ("keys written so far (key lengths): 2 cells, "
                                                  "whole KV cache: 2 cells")
    assert rows["compiled: prefill"] == "compiled: 4 cells"
    assert rows["compiled: fp16/bf16 linears"] == (
        "our GEMV at batch 1 (LLMENERGY_DENSE_GEMV=1): 1 cell, torch&#39;s F.linear: 3 cells")


def test_provenance_table_says_which_compiled_cells_ran_on_an_engine_built_after_a_reset(html: str) -> None:
    """A job's later compiled engine built after a reset of the compiled code decoded ~3.5 %
    slower on an H200 than the same cell alone (sessions 20 and 21); one built with the code
    before it kept did not. The report counts the cells of each (provenance.load.engine_index,
    engine_after_reset; a later engine recorded before session 21 was built after a reset)."""
    prov = html.split('id="provenance"')[1].split("</table>")[0]
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", prov))
    assert rows["compiled: engine in its job"] == (
        "a later engine of its job, built after a reset of the compiled code (such fp16 cells "
        "decoded 3.4–3.6 % slower on an H200: docs/measurement.md): 1 cell, "
        "a later engine of its job, the compiled code before it kept: 1 cell, "
        "its job&#39;s first engine: 2 cells")


def test_the_rerun_commands_are_ones_the_cli_accepts(html: str, results: Path) -> None:
    """Each `llmenergy` line of "How to rerun" parses with the real argument parser, and
    together they aggregate, plot and report the same results folder."""
    import html as html_lib
    import shlex

    block = html_lib.unescape(html.split('id="rerun"')[1].split("</pre>")[0])
    lines = [shlex.split(line) for line in block.splitlines() if line.startswith("llmenergy ")]
    assert [line[1] for line in lines] == ["aggregate", "plot", "report"]
    parser = cli.build_parser()
    for line in lines:
        args = parser.parse_args(line[1:])
        assert args.results == str(results), line


def test_the_accuracy_table_withholds_a_cell_whose_repeats_are_not_all_ok() -> None:
    import pandas as pd

    from llmenergy.analysis.report import _accuracy

    summary = pd.DataFrame({
        "cell_id": ["a", "a", "b", "b"], "model": "m", "dataset": "gsm8k",
        "status": ["ok", "ok", "ok", "incomplete"], "accuracy": [0.5, 0.7, 0.55, 0.5],
        "j_per_correct": [4.0, 6.0, 6.0, 5.0], "weights_synthetic": False})
    a, b = _accuracy(summary)
    assert (a["accuracy"], a["j_per_correct"], a["withheld"]) == (pytest.approx(0.6), 5.0, None)
    # b's one ok repeat is not the cell's accuracy: the cell is not finished
    assert b["accuracy"] is None and b["j_per_correct"] is None
    assert b["withheld"] == "1 of 2 repeat(s) incomplete: the cell is not finished"


def test_the_report_shows_only_what_goes_with_its_summary(tmp_path: Path) -> None:
    """Figures, statistics and problems are matched to the summary by its SHA-256, not by file
    dates: an older run's figures copied in after the summary, or a summary read from elsewhere,
    never shows the results folder's other files as its own."""
    from llmenergy.analysis.plots import load_manifest
    from llmenergy.atomic import file_sha256

    make_cell(tmp_path, "cell-a", batch_size=1)
    make_cell(tmp_path, "cell-b", batch_size=4)
    aggregate(tmp_path)
    render_report(tmp_path)
    old_figures, old_summary = tmp_path / "old-figures", tmp_path / "elsewhere" / "summary.parquet"
    shutil.copytree(tmp_path / "figures", old_figures)
    old_summary.parent.mkdir()
    shutil.copy(tmp_path / "summary.parquet", old_summary)

    make_cell(tmp_path, "cell-c", batch_size=8)
    bad = make_cell(tmp_path, "cell-bad", repeats=1) / "metrics.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    aggregate(tmp_path)
    shutil.rmtree(tmp_path / "figures")
    shutil.copytree(old_figures, tmp_path / "figures")  # newer than the summary, drawn from the old one
    text = render_report(tmp_path).read_text()
    digest = file_sha256(tmp_path / "summary.parquet")
    infos = load_manifest(tmp_path / "figures") or []
    assert infos and {i.summary_sha256 for i in infos} == {digest}
    assert any("cell-c" in i.cells for i in infos)
    assert "cell-bad/metrics.parquet" in text

    text = render_report(tmp_path, summary_path=old_summary, out_path=tmp_path / "old.html").read_text()
    cells_table = text.split('id="cells"')[1] if 'id="cells"' in text else text
    assert "cell-a" in cells_table and "cell-c" not in text  # not the folder's statistics
    assert "cell-bad/metrics.parquet" not in text  # nor its aggregation problems
    assert "Not known:" in text and "None: every metrics file was read" not in text
    # the folder's own figures are left as they were: the other summary's were drawn aside
    assert {i.summary_sha256 for i in load_manifest(tmp_path / "figures") or []} == {digest}
