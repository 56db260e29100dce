"""Checkpoints as people have them, judged by ``llmenergy plan`` before anything is queued.

Meta's LLaMA-1 release keeps ``tokenizer.model`` one level above the size folders
(``LLaMA/tokenizer.model``, ``LLaMA/7B/consolidated.00.pth``, ``LLaMA/7B/params.json``
with ``vocab_size: -1``). The checkpoints here are written in the real formats by the
project's own writers (``torch.save`` zip archives, safetensors), small enough for a CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmenergy import arch, checkpoints, config, entrypoints
from llmenergy.errors import ConfigError
from llmenergy.inference.checkpoint import (
    params_json,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from llmenergy.inference.model import full_shapes
from llmenergy.inference.tokenizer import default_tokenizer_path

TINY = arch.SIZES["llama-tiny"]


def _state(args: arch.ModelArgs, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.05 for n, s in full_shapes(args).items()}


def meta_release(root: Path, *, vocab_size: int = TINY.vocab_size, mp: int = 2) -> Path:
    """Meta's LLaMA-1 layout: ``root/tokenizer.model`` and ``root/tiny/`` with
    ``params.json`` (``vocab_size: -1``) and ``consolidated.NN.pth``; returns the weights dir."""
    weights = root / "tiny"
    args = TINY.replace(vocab_size=vocab_size)
    save_meta_checkpoint(_state(args), params_json(args) | {"vocab_size": -1}, weights, mp=mp)
    shutil.copyfile(default_tokenizer_path(), root / "tokenizer.model")
    return weights


def cfg_data(weights: str, tokenizer: str | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {"arch": "llama-tiny", "weights": weights}
    if tokenizer is not None:
        model["tokenizer"] = tokenizer
    return {
        "output_dir": "results", "repeats": 1, "warmup_tokens": 2,
        "models": {"tiny": model},
        "datasets": {"gsm": {"format": "gsm8k", "path": "synthetic", "n_prompts": 2,
                             "max_prompt_len": 48}},
        "gpus": {"cpu": {"partition": "local", "gpus_per_node": 2, "memory_gb": 4,
                         "device": "cpu"}},
        "collector": {"backend": "none", "idle_baseline_s": 0.1, "min_window_s": 0, "prefill_window_s": 0},
        "matrix": [{"model": ["tiny"], "dataset": ["gsm"], "gpu": ["cpu"], "shards": [1],
                    "batch_size": [2], "max_gen_len": [4]}],
    }


def plan_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_meta_release_with_the_tokenizer_in_the_parent_plans(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    cfg = config.from_dict(cfg_data(str(weights)))
    assert cfg.models["tiny"].weights == str(weights)
    assert checkpoints.resolve_tokenizer(str(weights), None) == tmp_path / "LLaMA" / "tokenizer.model"
    info = checkpoints.inspect_checkpoint(weights, TINY)
    assert info.format == "meta" and len(info.files) == 2
    assert info.vocab_size == TINY.vocab_size  # params.json says -1: read from the embedding


def test_tensor_shapes_are_read_without_loading_and_agree_with_torch(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    shard = weights / "consolidated.01.pth"
    header_only = checkpoints.pth_tensor_shapes(shard)
    loaded = torch.load(shard, map_location="cpu", weights_only=True)
    assert header_only == {name: tuple(t.shape) for name, t in loaded.items()}


def test_missing_tokenizer_names_the_key_and_where_it_looked(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    (tmp_path / "LLaMA" / "tokenizer.model").unlink()
    message = plan_error(cfg_data(str(weights)))
    assert message.startswith("config.yaml: models.tiny.weights: no tokenizer.model or "
                              f"tokenizer.json in {weights} or in its parent {tmp_path / 'LLaMA'}")
    assert message.endswith("name the file with models.tiny.tokenizer")


def test_named_tokenizer_that_is_missing_or_broken(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    message = plan_error(cfg_data(str(weights), str(tmp_path / "nope.model")))
    assert message == f"config.yaml: models.tiny.tokenizer: {tmp_path / 'nope.model'}: tokenizer file not found"
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")
    message = plan_error(cfg_data(str(weights), str(broken)))
    assert message.startswith(f"config.yaml: models.tiny.tokenizer: {broken}: tokenizer does not load")


def test_named_tokenizer_wins_over_the_one_in_the_parent(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    elsewhere = tmp_path / "tok"
    elsewhere.mkdir()
    shutil.copyfile(default_tokenizer_path(), elsewhere / "tokenizer.model")
    config.from_dict(cfg_data(str(weights), str(elsewhere)))
    assert checkpoints.resolve_tokenizer(str(weights), str(elsewhere)) == elsewhere / "tokenizer.model"


def test_empty_shard_file_stops_the_plan(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    (weights / "consolidated.01.pth").write_bytes(b"")
    message = plan_error(cfg_data(str(weights)))
    assert message == (f"config.yaml: models.tiny.weights: {weights / 'consolidated.01.pth'}: "
                       "checkpoint shard is empty (0 bytes)")


def test_cut_off_shard_file_stops_the_plan(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    shard = weights / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = plan_error(cfg_data(str(weights)))
    assert message.startswith(f"config.yaml: models.tiny.weights: {shard}: not a torch checkpoint")


def test_wrong_params_json_stops_the_plan(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    params = json.loads((weights / "params.json").read_text())
    (weights / "params.json").write_text(json.dumps(params | {"n_layers": 3}))
    message = plan_error(cfg_data(str(weights)))
    assert message == (f"config.yaml: models.tiny.weights: {weights}: checkpoint does not match "
                       "the architecture: n_layers 3 (arch has 2)")


def test_params_vocab_that_contradicts_the_embedding(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA")
    params = json.loads((weights / "params.json").read_text())
    (weights / "params.json").write_text(json.dumps(params | {"vocab_size": 32000}))
    message = plan_error(cfg_data(str(weights)))
    assert "models.tiny.weights" in message
    assert "tok_embeddings.weight has shape (1536, 64), expected (32000, 64)" in message


def test_tokenizer_larger_than_the_vocabulary(tmp_path: Path) -> None:
    weights = meta_release(tmp_path / "LLaMA", vocab_size=1000)
    message = plan_error(cfg_data(str(weights)))
    assert message == (f"config.yaml: models.tiny.weights: {tmp_path / 'LLaMA' / 'tokenizer.model'}: "
                       "tokenizer has 1536 ids but the model's vocabulary has 1000 rows")


def hf_checkpoint(directory: Path) -> Path:
    save_hf_checkpoint(_state(TINY), TINY, directory)
    shutil.copyfile(default_tokenizer_path(), directory / "tokenizer.model")
    return directory


def test_hf_checkpoint_plans_and_its_header_is_checked(tmp_path: Path) -> None:
    weights = hf_checkpoint(tmp_path / "hf")
    config.from_dict(cfg_data(str(weights)))
    file = weights / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    message = plan_error(cfg_data(str(weights)))
    assert message.startswith(f"config.yaml: models.tiny.weights: {file}: truncated: ")


def test_hf_index_naming_a_missing_file(tmp_path: Path) -> None:
    weights = hf_checkpoint(tmp_path / "hf")
    header = checkpoints.safetensors_header(weights / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (weights / checkpoints.HF_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    message = plan_error(cfg_data(str(weights)))
    assert message == (f"config.yaml: models.tiny.weights: {weights / 'model-00002-of-00002.safetensors'}"
                       f": safetensors file named by {checkpoints.HF_INDEX} is missing")


def test_plan_reads_headers_only(tmp_path: Path) -> None:
    """A checkpoint check costs milliseconds: no weights are loaded."""
    weights = meta_release(tmp_path / "LLaMA")
    t0 = time.perf_counter()
    for _ in range(5):
        checkpoints.inspect_checkpoint(weights, TINY)
    assert (time.perf_counter() - t0) / 5 < 0.05


def test_run_cell_on_a_meta_release_with_the_tokenizer_in_the_parent(tmp_path: Path) -> None:
    """The whole path: plan, then the worker finds ``LLaMA/tokenizer.model`` too."""
    weights = meta_release(tmp_path / "LLaMA")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data(str(weights))))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cid = "tiny_gsm_cpu_s1_b2_g4_pnone_reference"
    out = subprocess.run([sys.executable, "-m", entrypoints.CLI, "run-cell", "--config",
                          str(cfg_path), "--cell", cid], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    cell = json.loads((tmp_path / "results" / "cells" / cid / "cell.json").read_text())
    assert cell["status"] == "ok"
