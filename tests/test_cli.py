"""The `llmenergy` command line: help on every option, --version, delegated commands,
user errors without tracebacks, `report --config`, a readable aggregate log line."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from llmenergy import __version__, cli
from llmenergy.analysis.metrics import to_table

ROOT = Path(__file__).parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "llmenergy.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False, timeout=120)


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"llmenergy {__version__}"


def test_every_option_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, p in sub.choices.items()
               for a in p._actions if a.option_strings and not a.help]
    assert not missing
    assert {"plan", "run-cell", "aggregate", "plot", "report"} <= set(sub.choices)


#: each command as `llmenergy` is called, for its --help (data's options are fetch's)
COMMANDS = [["plan"], ["run-cell"], ["run-group"], ["submit"], ["aggregate"], ["plot"], ["report"],
            ["data", "fetch"], ["collect"], ["powercap-guard"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_option_is_in_the_cli_reference(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """docs/cli.md names every option each command's --help prints, under its own heading."""
    import re

    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out)) - {"--help"}
    assert options, f"no options parsed from `llmenergy {' '.join(command)} --help`"
    doc = (ROOT / "docs" / "cli.md").read_text()
    heading = f"### `llmenergy {' '.join(command)}"
    assert heading in doc, f"docs/cli.md has no section {heading}`"
    section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
    # run-cell's section names only what differs from run-group's
    if command == ["run-cell"]:
        section += doc.split("### `llmenergy run-group`", 1)[1].split("\n### ", 1)[0]
    missing = sorted(o for o in options if not re.search(rf"`{o}[` ]", section))
    assert not missing, f"docs/cli.md, {heading}`: not described: {missing}"


def test_data_help_and_verbose_before_delegated_command() -> None:
    out = run_cli("data", "--help")
    assert out.returncode == 0 and "llmenergy data fetch" in out.stdout
    out = run_cli("-v", "data", "fetch", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: llmenergy data fetch" in out.stdout
    assert run_cli("data").returncode == 2


def test_plot_without_summary_is_one_line(tmp_path: Path) -> None:
    out = run_cli("plot", "--summary", str(tmp_path / "missing.parquet"), "--out", str(tmp_path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"llmenergy: error: {tmp_path / 'missing.parquet'}: no summary; run `llmenergy aggregate` first"]
    out = run_cli("plot", "--summary", str(tmp_path / "missing.parquet"), "--jobs", "0")
    assert out.stderr.strip().splitlines() == ["llmenergy: error: --jobs 0: draw at least one figure at a time"]


def test_report_config_notes_planned_cells_not_measured(tmp_path: Path) -> None:
    measured = "llama-7b_alpaca_V100_s1_b16_g256_pnone_reference"
    row = dict(cell_id=measured, model="llama-7b", dataset="alpaca", gpu="V100", shards=1,
               batch_size=16, max_gen_len=256, engine="reference", repeat=0, status="ok",
               tokens_per_s=10.0, power_source="none")
    to_table([row]).to_pandas().to_parquet(tmp_path / "summary.parquet")
    out = tmp_path / "r.html"
    assert cli.main(["report", "--results", str(tmp_path), "--config", str(ROOT / "config.yaml"),
                     "--out", str(out)]) == 0
    html = out.read_text()
    assert "planned cells not in the summary" in html
    assert "309: llama-7b_alpaca_V100_s1_b16_g512_pnone_reference" in html
    assert f"309: {measured}" not in html


def test_aggregate_logs_a_readable_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cells" / "c1").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="llmenergy"):
        assert cli.main(["aggregate", "--results", str(tmp_path)]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "llmenergy")
    assert "AggregateResult(" not in text
    assert "aggregated 1 cells (1 rows; statuses: missing 1)" in text
    assert pd.read_parquet(tmp_path / "summary.parquet")["status"].tolist() == ["missing"]


def test_aggregate_plot_and_report_read_the_configs_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --config and no --results, the config's output_dir is read and written (a bench
    config with `output_dir: bench-results/...` once aggregated into ./results)."""
    import yaml

    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "elsewhere")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["aggregate", "--config", str(cfg)]) == 0
    assert (tmp_path / "elsewhere" / "summary.parquet").is_file()
    assert not (tmp_path / "results").exists()
    assert cli.main(["plot", "--config", str(cfg), "--jobs", "1"]) == 0
    assert (tmp_path / "elsewhere" / "figures" / "index.json").is_file()
    assert not (tmp_path / "results").exists()
    assert cli.main(["report", "--config", str(cfg)]) == 0
    assert (tmp_path / "elsewhere" / "report.html").is_file()
