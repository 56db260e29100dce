"""Real `snakemake` on the local profile's settings: a 2-cell matrix into a temp dir."""
from __future__ import annotations

import os
import subprocess
import sys
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
    "collector": {"backend": "estimate", "estimate_tdp_w": 50, "interval_ms": 50, "idle_baseline_s": 0.3},
    "matrix": [{"model": ["tiny"], "dataset": ["alpaca"], "gpu": ["cpu"], "shards": [1, 2],
                "batch_size": [2], "max_gen_len": [8]}],
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
        assert "run_cell" in out.stdout + out.stderr


def test_snakemake_stops_on_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = {**CONFIG, "matrix": [{**CONFIG["matrix"][0], "batch_size": [2, -4]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    out = _snakemake(tmp_path, "-n")
    assert out.returncode == 2
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert lines == ["llmenergy: error: config.yaml: matrix[0].batch_size: -4 must be a positive integer"]
    assert not (tmp_path / "results" / "cells").exists()
