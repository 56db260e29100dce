"""Real `snakemake` on the local profile's settings: a 2-cell matrix into a temp dir."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "output_dir": "results", "repeats": 2, "seed": 0, "warmup_tokens": 2,
    "models": {"tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
    "datasets": {"alpaca": {"format": "alpaca", "path": "synthetic", "n_prompts": 4, "max_prompt_len": 48}},
    "gpus": {"cpu": {"partition": "local", "gpus_per_node": 2, "memory_gb": 4, "device": "cpu"}},
    # 100 ms polls: the gap limit is 20 polls, and at 50 ms a collector stalled 1.3 s on the loaded
    # 2-core CI machine withheld a window's energy (the cell then incomplete, as the rules say)
    "collector": {"backend": "estimate", "estimate_tdp_w": 50, "interval_ms": 100, "idle_baseline_s": 0.3,
                  "idle_settle_s": 0.2, "min_window_s": 0, "prefill_window_s": 0},
    "matrix": [{"model": ["tiny"], "dataset": ["alpaca"], "gpu": ["cpu"], "shards": [1, 2],
                "batch_size": [2], "max_gen_len": [8]}],
    "packing": "cell",  # one job per cell (rule run_cell); every route packs by group by default
}


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _snakemake(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["timeout", "-s", "INT", "600", sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(tmp), "--cores", "2", "--jobs", "1", "--rerun-triggers", "mtime", "input", *extra],
        cwd=tmp, env=_env(), capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_local_workflow_two_cells_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    dry = _snakemake(tmp_path, "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "run_cell" in dry.stdout + dry.stderr

    run = _snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    res = tmp_path / "results"
    summary = pd.read_parquet(res / "summary.parquet")
    assert len(summary) == 4  # 2 cells × 2 repeats
    assert set(summary.status) == {"ok"}
    assert sorted(summary.shards.unique()) == [1, 2]
    assert (summary.responses == 4).all() and (summary.n_prompts == 4).all()
    assert (summary.tokens_out == 4 * 8).all()  # EOS ignored: every prompt generates max_gen_len tokens
    assert (summary.tokens_per_s > 0).all()
    assert (summary.power_source == "estimate").all()
    assert (summary.gpu_name == "cpu").all()  # what the ranks really ran on, from provenance
    assert (summary.energy_j > 0).all()
    pd.testing.assert_series_equal(summary.j_per_token, summary.energy_j / summary.tokens_out, check_names=False)
    # The shards=2 cell ran 2 real ranks and, with the same weights, generated exactly the same text.
    texts = {}
    for sh in (1, 2):
        cid = f"tiny_alpaca_cpu_s{sh}_b2_g8_pnone_reference"
        r = pd.read_parquet(res / "cells" / cid / "responses.parquet").sort_values(["repeat", "prompt_id"])
        texts[sh] = list(r.text)
        assert len(list((res / "cells" / cid / "logs").glob("rank*.log"))) == sh
    assert texts[1] == texts[2]
    html = (res / "report.html").read_text()
    assert "tiny_alpaca_cpu_s2_b2_g8_pnone_reference" in html and "ESTIMATE" in html.upper()
    assert len(list((res / "figures").glob("*.png"))) >= 1

    # Snakemake's own report carries the figures and the llmenergy report, not only the DAG.
    smk_report = _snakemake(tmp_path, "--report", str(tmp_path / "smk-report.zip"))
    assert smk_report.returncode == 0, smk_report.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "smk-report.zip") as z:
        names = z.namelist()
    raw = [n for n in names if "/data/raw/" in n]  # the result files the report embeds
    assert any(n.endswith("/report.html") for n in raw), names
    assert sum(n.endswith(".png") for n in raw) >= 5, names

    # Nothing to do on a second run: completed cells are never re-executed.
    again = _snakemake(tmp_path, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_plans_of_the_shipped_profiles_parse(tmp_path: Path) -> None:
    for profile in ("profiles/local", "profiles/slurm"):
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", profile, "--directory", str(REPO),
                              "--config", f"output_dir={tmp_path / profile.split('/')[1]}"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
        assert out.returncode == 0, (profile, out.stderr[-2000:])
        assert "run_group" in out.stdout + out.stderr  # the default packing of every route


def test_snakemake_lint_is_clean(tmp_path: Path) -> None:
    """Issue 16: the rules pass their command and folders as params (no lint findings)."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--directory", str(REPO),
                          "--config", f"output_dir={tmp_path / 'lint'}"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Lints for" not in out.stdout + out.stderr


def test_a_given_config_file_is_the_whole_config_not_merged_over_the_repositorys(tmp_path: Path) -> None:
    """--configfile (or a profile's configfile:) is the config: keys it leaves out take their
    defaults, not the values of the config.yaml beside the Snakefile, as llmenergy plan reads it;
    without one, config.yaml is read and --config overrides it."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "repeats": 3, "seed": 7}))
    mine = {k: v for k, v in CONFIG.items() if k not in ("repeats", "seed")}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**mine, "output_dir": "mine"}))
    assert _snakemake(tmp_path, "-n", "--configfile", "mine.yaml").returncode == 0
    resolved = json.loads((tmp_path / "mine" / ".llmenergy" / "config.json").read_text())
    assert "repeats" not in resolved and "seed" not in resolved  # the defaults, as `llmenergy plan` has them
    assert _snakemake(tmp_path, "-n", "--config", "output_dir=repo").returncode == 0
    resolved = json.loads((tmp_path / "repo" / ".llmenergy" / "config.json").read_text())
    assert (resolved["repeats"], resolved["seed"]) == (3, 7)


def test_snakemake_stops_on_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = {**CONFIG, "matrix": [{**CONFIG["matrix"][0], "batch_size": [2, -4]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    out = _snakemake(tmp_path, "-n")
    assert out.returncode == 2
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert lines == ["llmenergy: error: config.yaml: matrix[0].batch_size: -4 must be a positive integer"]
    assert not (tmp_path / "results" / "cells").exists()


def _executed(output: str) -> list[str]:
    return re.findall(r"rule run_cell:\n(?:\s+\w+: .*\n)*?\s+wildcards: cell=([A-Za-z0-9._-]+)", output)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_config_change_reruns_only_the_affected_cells(tmp_path: Path) -> None:
    """Issue 15 (2): changing n_prompts of one dataset reruns exactly its cells; their old
    outputs are kept under superseded/; `-n` lists their jobs and says why, moving nothing;
    `policies.on_config_change: error` stops with one line before anything runs."""
    cfg = {**CONFIG, "repeats": 1,
           "datasets": {"a": {"format": "alpaca", "path": "synthetic", "n_prompts": 2, "max_prompt_len": 32},
                        "b": {"format": "alpaca", "path": "synthetic", "n_prompts": 2, "max_prompt_len": 32}},
           "matrix": [{"model": ["tiny"], "dataset": ["a", "b"], "gpu": ["cpu"], "shards": [1],
                       "batch_size": [2], "max_gen_len": [4]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    first = _snakemake(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    cells = tmp_path / "results" / "cells"
    a, b = "tiny_a_cpu_s1_b2_g4_pnone_reference", "tiny_b_cpu_s1_b2_g4_pnone_reference"
    before_a, before_b = _files(cells / a), _files(cells / b)
    old_fp = json.loads((cells / b / "cell.json").read_text())["fingerprint"]

    cfg["datasets"]["b"]["n_prompts"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    dry = _snakemake(tmp_path, "-n")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert f"{b}: config changed (dataset.n_prompts: 2 → 3); would rerun (dry run)" in out
    assert a + ":" not in out
    assert _executed(out) == [b]  # the plan lists the job, though its outputs are still there
    assert _files(cells / b) == before_b  # nothing moved

    strict = {**cfg, "policies": {"on_config_change": "error"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(strict))
    err = _snakemake(tmp_path)
    lines = [ln for ln in (err.stdout + err.stderr).splitlines() if ln.startswith("llmenergy: error:")]
    assert err.returncode == 2 and len(lines) == 1, (err.stdout + err.stderr)[-3000:]
    assert "policies.on_config_change" in lines[0] and b in lines[0] and a not in lines[0]
    assert _files(cells / b) == before_b

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    second = _snakemake(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert _executed(second.stdout + second.stderr) == [b]
    assert _files(cells / a) == before_a
    kept = cells / b / "superseded" / old_fp
    assert {k: v for k, v in _files(kept).items() if k in before_b} == before_b
    new = json.loads((cells / b / "cell.json").read_text())
    assert new["fingerprint"] != old_fp and new["definition"]["dataset"]["n_prompts"] == 3
    summary = pd.read_parquet(tmp_path / "results" / "summary.parquet").set_index("cell_id")
    assert summary.loc[b, "n_prompts"] == 3 and summary.loc[b, "fingerprint"] == new["fingerprint"]
    assert summary.loc[a, "fingerprint"] == json.loads(before_a["cell.json"])["fingerprint"]
