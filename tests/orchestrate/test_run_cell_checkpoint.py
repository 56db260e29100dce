"""`llmenergy run-cell` with a checkpoint directory from the config (Meta format, 2 files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from llmenergy import config, entrypoints
from llmenergy.arch import SIZES
from llmenergy.errors import ConfigError
from llmenergy.inference.checkpoint import save_meta_checkpoint
from llmenergy.inference.model import full_shapes


def _write_checkpoint(path: Path) -> None:
    args = SIZES["llama-tiny"]
    g = torch.Generator().manual_seed(7)
    state = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in full_shapes(args).items()}
    save_meta_checkpoint(state, args, path, mp=2)


def _config(tmp: Path, weights: str) -> Path:
    cfg = {
        "output_dir": "results", "repeats": 1, "warmup_tokens": 2,
        "models": {"tiny": {"arch": "llama-tiny", "weights": weights, "tokenizer": None}},
        "datasets": {"gsm": {"format": "gsm8k", "path": "synthetic", "n_prompts": 2, "max_prompt_len": 48}},
        "gpus": {"cpu": {"partition": "local", "gpus_per_node": 2, "memory_gb": 4, "device": "cpu"}},
        "collector": {"backend": "none", "idle_baseline_s": 0.1, "min_window_s": 0, "prefill_window_s": 0},
        "matrix": [{"model": ["tiny"], "dataset": ["gsm"], "gpu": ["cpu"], "shards": [1],
                    "batch_size": [2], "max_gen_len": [4]}],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_cell_loads_a_meta_checkpoint_from_config(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _write_checkpoint(ckpt)
    # Our checkpoint carries no tokenizer.model: point the model at the project's tokenizer.
    from llmenergy.inference.tokenizer import default_tokenizer_path

    cfg_path = _config(tmp_path, str(ckpt))
    data = yaml.safe_load(cfg_path.read_text())
    data["models"]["tiny"]["tokenizer"] = str(default_tokenizer_path())
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cid = "tiny_gsm_cpu_s1_b2_g4_pnone_reference"
    out = subprocess.run([sys.executable, "-m", entrypoints.CLI, "run-cell", "--config", str(cfg_path),
                          "--cell", cid], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    cell = json.loads((tmp_path / "results" / "cells" / cid / "cell.json").read_text())
    assert cell["status"] == "ok"
    metrics = pd.read_parquet(tmp_path / "results" / "cells" / cid / "metrics.parquet")
    assert metrics.tokens_out.iloc[0] == 2 * 4
    assert metrics.template.iloc[0] == "gsm8k_0shot"
    assert metrics.dataset.iloc[0] == "gsm" and metrics.n_prompts.iloc[0] == 2
    assert metrics.tokens_in.iloc[0] > 0 and metrics.words_out.iloc[0] >= 0


@pytest.mark.parametrize(("breakage", "expected"), [
    ("missing", "checkpoint directory"),
    ("no_params", "Meta checkpoint without params.json"),
    ("wrong_dims", "does not match the architecture: dim 64 (arch has 128)"),
    ("empty", "neither a Meta checkpoint"),
])
def test_bad_checkpoints_are_one_line_config_errors(tmp_path: Path, breakage: str, expected: str) -> None:
    ckpt = tmp_path / "ckpt"
    if breakage != "missing":
        ckpt.mkdir()
    if breakage in ("no_params", "wrong_dims"):
        (ckpt / "consolidated.00.pth").write_bytes(b"")
    if breakage == "wrong_dims":
        (ckpt / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(ConfigError) as err:
        config.load(_config(tmp_path, str(ckpt)))
    # one line per problem (issue 15), each naming the key; the named breakage is the first
    lines = str(err.value).splitlines()
    assert all("models.tiny." in line for line in lines), lines
    assert "models.tiny.weights" in lines[0] and expected in lines[0]
