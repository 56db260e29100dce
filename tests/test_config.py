"""Bad input fails fast with one line naming the file and the key (issue 9's table)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmenergy import config, entrypoints
from llmenergy.errors import ConfigError
from llmenergy.planning.matrix import expand


def base() -> dict[str, Any]:
    return {
        "repeats": 1,
        "models": {"tiny": {"arch": "llama-tiny"}, "m13": {"arch": "llama-13b"}},
        "datasets": {"alp": {"format": "alpaca", "path": "synthetic", "n_prompts": 4, "max_prompt_len": 64}},
        "gpus": {"A100": {"partition": "a100", "gpus_per_node": 4, "memory_gb": 80,
                          "min_power_w": 100, "max_power_w": 400}},
        "matrix": [{"model": ["tiny"], "dataset": ["alp"], "gpu": ["A100"], "shards": [1, 2],
                    "batch_size": [2], "max_gen_len": [16]}],
    }


def with_(path: str, value: Any) -> dict[str, Any]:
    """A copy of base() with one key (dotted, [i] for lists) set; value None deletes."""
    data = base()
    parts = path.replace("[", ".").replace("]", "").split(".")
    node = data
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    last = parts[-1]
    key: Any = int(last) if last.isdigit() else last
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return data


_DELETE = object()


def _default_gen_long_prompts() -> dict[str, Any]:
    """No max_gen_len (the default, 256) with prompts of up to 400 tokens: over llama-tiny's 512."""
    data = with_("datasets.alp.max_prompt_len", 400)
    del data["matrix"][0]["max_gen_len"]
    return data

M0 = "matrix.0"

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown model", with_(f"{M0}.model", ["nope"]), "matrix[0].model: unknown model 'nope'"),
    ("unknown dataset", with_(f"{M0}.dataset", ["nope"]), "matrix[0].dataset: unknown dataset"),
    ("unknown gpu type", with_(f"{M0}.gpu", ["H800"]), "matrix[0].gpu: unknown gpu 'H800'"),
    ("batch size 0", with_(f"{M0}.batch_size", [0]), "matrix[0].batch_size"),
    ("batch size negative", with_(f"{M0}.batch_size", [-4]), "matrix[0].batch_size: -4 must be a positive integer"),
    ("string for a number", with_(f"{M0}.batch_size", ["four"]), "matrix[0].batch_size"),
    ("shards not an integer", with_(f"{M0}.shards", [1.5]), "matrix[0].shards"),
    ("generation over context", with_(f"{M0}.max_gen_len", [4000]), "matrix[0].max_gen_len: 4000"),
    ("default generation over context", _default_gen_long_prompts(),
     "matrix[0].max_gen_len: 256 (the default) + datasets.alp.max_prompt_len 400 exceeds tiny's context of 512"),
    ("power cap above range", with_(f"{M0}.power_cap_w", [900]), "matrix[0].power_cap_w: 900 W is outside"),
    ("power cap below range", with_(f"{M0}.power_cap_w", [50]), "matrix[0].power_cap_w: 50 W is outside"),
    ("power cap negative", with_(f"{M0}.power_cap_w", [-5]), "matrix[0].power_cap_w"),
    ("duplicate value on an axis", with_(f"{M0}.shards", [1, 1]), "matrix[0].shards: duplicate value"),
    ("duplicate cell across groups", {**base(), "matrix": base()["matrix"] * 2}, "matrix[1]: cell"),
    ("empty matrix", with_("matrix", []), "matrix: is empty"),
    ("empty axis", with_(f"{M0}.batch_size", []), "matrix[0].batch_size: is empty"),
    ("every cell infeasible", with_(f"{M0}", {"model": ["m13"], "dataset": ["alp"], "gpu": ["A100"],
                                               "shards": [16, 32]}), "matrix: no feasible cells"),
    ("missing checkpoint", with_("models.tiny.weights", "/nonexistent/ckpt"), "models.tiny.weights"),
    ("missing dataset file", with_("datasets.alp.path", "/nonexistent/alpaca.json"), "datasets.alp.path"),
    ("partition missing", with_("gpus.A100.partition", _DELETE), "gpus.A100: 'partition' is a required"),
    ("shell metacharacters in a model name", {**base(), "models": {"tiny;rm -rf": {"arch": "llama-tiny"}}},
     "models.tiny;rm -rf: name"),
    ("shell metacharacters in a partition", with_("gpus.A100.partition", "a100$(id)"), "gpus.A100.partition"),
    ("unknown top-level key", {**base(), "repeat": 3}, "unknown key 'repeat'"),
    ("typo in a matrix axis", with_(f"{M0}.batchsize", [2]), "matrix[0]: unknown key 'batchsize'"),
    ("typo in a model key", with_("models.tiny.wieghts", "synthetic"), "models.tiny: unknown key 'wieghts'"),
    ("unknown architecture", with_("models.tiny.arch", "llama-3b"), "models.tiny.arch: unknown architecture"),
    ("bad dataset format", with_("datasets.alp.format", "csv"), "datasets.alp.format"),
    ("n_prompts zero", with_("datasets.alp.n_prompts", 0), "datasets.alp.n_prompts"),
    ("repeats zero", with_("repeats", 0), "repeats"),
    ("unknown collector backend", with_("collector", {"backend": "ipmi"}), "collector.backend"),
    ("unknown precision", with_(f"{M0}.precision", ["fp4"]), "matrix[0].precision: unknown precision 'fp4'"),
    ("precision not a list", with_(f"{M0}.precision", "int8"), "matrix[0].precision"),
    ("precision contradicting the model's dtype",
     with_(f"{M0}.precision", ["bf16"]) | {"models": {"tiny": {"arch": "llama-tiny", "dtype": "float16"}}},
     "matrix[0].precision: bf16 contradicts models.tiny.dtype float16"),
    ("compute capability not a number", with_("gpus.A100.compute_capability", "sm90"),
     "gpus.A100.compute_capability"),
    ("estimate without a TDP", with_("collector", {"backend": "estimate"}), "collector.estimate_tdp_w"),
    ("interval too short", with_("collector", {"interval_ms": 1}), "collector.interval_ms"),
    ("negative minimum window", with_("collector", {"min_window_s": -1}), "collector.min_window_s"),
    ("prefill window not a number", with_("collector", {"prefill_window_s": "5s"}), "collector.prefill_window_s"),
    ("output_dir escapes", with_("output_dir", "../elsewhere"), "output_dir"),
    ("kshot without train file", with_("datasets.alp.kshot", 4), "datasets.alp.kshot"),
    ("missing models", with_("models", _DELETE), "'models' is a required"),
    ("bad oom policy", with_("policies", {"on_oom": "retry"}), "policies.on_oom"),
    ("power range inverted", with_("gpus.A100.min_power_w", 500), "gpus.A100.min_power_w"),
    ("gpus_per_node zero", with_("gpus.A100.gpus_per_node", 0), "gpus.A100.gpus_per_node"),
    ("max_time_min not a number", with_("gpus.A100.max_time_min", "1-00:00:00"), "gpus.A100.max_time_min"),
    ("max_time_min within the stop warning", with_("gpus.A100.max_time_min", 2),
     "gpus.A100.max_time_min: 2 must be more than 2 minutes (every job gets its stop signal 120 s before"),
]


def _malformed_dataset() -> dict[str, Any]:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "gsm8k.jsonl"
    path.write_text('{"question": "q1", "answer": "a #### 3"}\n{"question": "q2"}\n')
    data = base()
    data["datasets"]["alp"] = {"format": "gsm8k", "path": str(path), "n_prompts": 1}
    return data


BAD.append(("malformed dataset file", _malformed_dataset(), "line 2: missing field 'answer'"))


@pytest.mark.parametrize(("case", "data", "expected"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_one_line_naming_file_and_key(case: str, data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        expand(config.from_dict(copy.deepcopy(data), source="config.yaml"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("config.yaml: ")
    assert expected in msg, msg


def test_table_has_at_least_25_distinct_cases() -> None:
    assert len({c for c, _, _ in BAD}) >= 25


def test_good_config_expands_and_keeps_infeasible_with_reasons() -> None:
    data = base()
    data["matrix"][0]["model"] = ["tiny", "m13"]
    data["matrix"][0]["shards"] = [1, 8, 16]
    plan = expand(config.from_dict(data))
    ids = {c.id for c in plan.cells}
    assert "tiny_alp_A100_s1_b2_g16_pnone_reference" in ids
    reasons = {i.cell.id: i.reason for i in plan.infeasible}
    assert reasons["m13_alp_A100_s16_b2_g16_pnone_reference"] == \
        "m13 × 16 shards: 16 does not divide 40 attention heads"
    # 13B (26 GB fp16) does not fit on one 80 GB A100? It does; on 1 GPU it fits, so it is planned.
    assert "m13_alp_A100_s1_b2_g16_pnone_reference" in ids


def test_65b_needs_8_v100s() -> None:
    data = base()
    data["models"] = {"m65": {"arch": "llama-65b"}}
    data["gpus"] = {"V100": {"partition": "v100", "gpus_per_node": 2, "memory_gb": 32}}
    data["matrix"] = [{"model": ["m65"], "dataset": ["alp"], "gpu": ["V100"], "shards": [2, 4, 8],
                       "batch_size": [1], "max_gen_len": [16]}]
    plan = expand(config.from_dict(data))
    assert [c.shards for c in plan.cells] == [8]
    assert all("needs" in i.reason for i in plan.infeasible)


def test_cell_ids_are_stable_unique_slugs() -> None:
    cfg = config.load(Path(__file__).parents[1] / "config.yaml")
    ids = [c.id for c in expand(cfg).cells]
    assert len(ids) == len(set(ids))
    assert all(config.NAME_RE.match(i) for i in ids)
    assert ids == [c.id for c in expand(config.load(Path(__file__).parents[1] / "config.yaml")).cells]


def test_cli_prints_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump(with_(f"{M0}.batch_size", [-4])))
    out = subprocess.run([sys.executable, "-m", entrypoints.CLI, "plan", "--config", str(bad)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "matrix[0].batch_size: -4 must be a positive integer" in lines[0]


def test_not_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("models: [\n  oops: {\n")
    with pytest.raises(ConfigError, match=r"config.yaml: line \d+: not valid YAML"):
        config.load(bad)


def test_max_time_min_is_read() -> None:
    assert config.from_dict(with_("gpus.A100.max_time_min", 3)).gpus["A100"].max_time_min == 3
    assert config.from_dict(base()).gpus["A100"].max_time_min is None
