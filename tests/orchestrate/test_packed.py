"""Packing (``llmenergy run-group``), end to end on the local launcher with the tiny model.

A packed group's cells must come out exactly as if each had run alone
(``run-cell``): same files, same columns, same token counts and texts, same
fingerprint. A cell that fails inside a group leaves the others finished; the
rerun runs only it; a rerun after success runs nothing.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from launch_helpers import make_env

from llmenergy import config, entrypoints
from llmenergy.cellfiles import Cell
from llmenergy.planning.groups import group_id, make_groups
from llmenergy.planning.matrix import expand

GROUP = "tiny_cpu_s1_pnone_reference"


def _config(root: Path, matrix: list[dict[str, list[Any]]]) -> Path:
    data = {
        "output_dir": "results", "repeats": 1, "seed": 0, "warmup_tokens": 2,
        "models": {"tiny": {"arch": "llama-tiny", "weights": "synthetic"}},
        "datasets": {"a": {"format": "alpaca", "path": "synthetic", "n_prompts": 4, "seed": 0, "max_prompt_len": 32},
                     "b": {"format": "alpaca", "path": "synthetic", "n_prompts": 3, "seed": 1, "max_prompt_len": 16}},
        "gpus": {"cpu": {"partition": "debug", "gpus_per_node": 1, "memory_gb": 16, "device": "cpu"}},
        "collector": {"backend": "estimate", "estimate_tdp_w": 100, "idle_baseline_s": 0.2, "interval_ms": 100,
                      "power_interval_ms": 100, "idle_settle_s": SETTLE_S, "min_window_s": 0,
                      "prefill_window_s": 0},
        "matrix": matrix,
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cell(dataset: str, batch: int, gen: int) -> dict[str, list[Any]]:
    return {"model": ["tiny"], "dataset": [dataset], "gpu": ["cpu"], "shards": [1], "batch_size": [batch],
            "max_gen_len": [gen]}


#: Four cells of one group: two datasets, two batch sizes, two generation lengths (four KV caches).
FOUR = [_cell("a", 2, 4), _cell("a", 3, 6), _cell("b", 2, 6), _cell("b", 3, 4)]


def _cli(root: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 240) -> int:
    proc = subprocess.run([sys.executable, "-m", entrypoints.CLI, *args, "--config", "config.yaml",
                           "--launcher", "local"], cwd=root, env=env or make_env(None), timeout=timeout_s,
                          capture_output=True, text=True, check=False)
    (root / f"cli.{args[0]}.log").open("a").write(proc.stdout + proc.stderr)
    return proc.returncode


def _ids(root: Path) -> list[str]:
    return [c.id for c in expand(config.load(root / "config.yaml", check_files=False)).cells]


def _cell_dir(root: Path, cid: str) -> Path:
    return root / "results" / "cells" / cid


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loads(root: Path) -> int:
    log = root / "results" / "groups" / GROUP / "logs" / "rank0.log"
    return log.read_text().count("built llama-tiny")


SETTLE_S = 0.3


def test_packed_cells_match_the_same_cells_run_alone(tmp_path: Path) -> None:
    packed, alone = tmp_path / "packed", tmp_path / "alone"
    _config(packed, FOUR)
    _config(alone, FOUR)
    ids = _ids(packed)
    assert _cli(packed, "run-group", "--group", GROUP) == 0, (packed / "cli.run-group.log").read_text()[-3000:]
    for cid in ids:
        assert _cli(alone, "run-cell", "--cell", cid) == 0
    assert _loads(packed) == 1  # one model load for four cells
    assert json.loads((packed / "results" / "groups" / GROUP / "done.json").read_text())["cells"] == {
        cid: "ok" for cid in ids}
    for cid in ids:
        p, a = _cell_dir(packed, cid), _cell_dir(alone, cid)
        assert sorted(f.name for f in p.iterdir() if f.is_file()) == sorted(f.name for f in a.iterdir() if f.is_file())
        for name in ("events", "responses", "power", "metrics"):
            assert pq.read_schema(p / f"{name}.parquet").names == pq.read_schema(a / f"{name}.parquet").names, name
        rp, ra = (pq.read_table(d / "responses.parquet").to_pandas() for d in (p, a))
        cols = ["prompt_id", "tokens_in", "tokens_out", "words_out", "text"]
        assert rp[cols].equals(ra[cols]), cid
        mp, ma = (pq.read_table(d / "metrics.parquet").to_pylist()[0] for d in (p, a))
        for key in ("status", "n_prompts", "responses", "tokens_in", "tokens_out", "words_out", "fingerprint"):
            assert mp[key] == ma[key], (cid, key)
        ep, ea = (pq.read_table(d / "events.parquet").to_pandas() for d in (p, a))
        keys = ["phase", "repeat", "batch_index", "n_seqs", "tokens_in", "tokens_out"]
        assert ep[keys].equals(ea[keys]), cid  # its own load, settle, idle, warm-up, prefill/decode
        for ev in (ep, ea):  # one idle definition: after the load and a settle interval, packed or alone
            assert ev["phase"].tolist()[:3] == ["load", "settle", "idle"], cid
            load, idle = ev.iloc[0], ev.iloc[2]
            assert idle["start_ns"] - load["end_ns"] >= SETTLE_S * 1e9, cid
        jp, ja = (json.loads((d / "cell.json").read_text()) for d in (p, a))
        assert jp.keys() == ja.keys() and jp["provenance"].keys() == ja["provenance"].keys()
        assert (jp["status"], jp["fingerprint"], jp["definition"]) == (ja["status"], ja["fingerprint"],
                                                                      ja["definition"])
        assert jp["provenance"]["group"]["group_id"] == GROUP and ja["provenance"]["group"] is None
        assert jp["provenance"]["power_samples"] > 0
        for doc in (jp, ja):  # measured at the job's start: one host, rank 0's node is 0
            assert doc["provenance"]["clock_offsets_ns"] == {doc["provenance"]["hosts"][0]: 0}
    loaded = [json.loads((_cell_dir(packed, c) / "cell.json").read_text())["provenance"]["group"]["model_loaded_here"]
              for c in ids]
    assert loaded == [True, False, False, False]


def test_a_failed_cell_leaves_the_group_going_and_only_it_reruns(tmp_path: Path) -> None:
    root = tmp_path / "g"
    _config(root, FOUR[:3])
    ids = _ids(root)
    victim = ids[1]
    env = make_env(None)
    env.update(FAKE_CRASH_CELLS=victim, FAKE_CRASH_ONCE_DIR=str(tmp_path / "once"))
    assert _cli(root, "run-group", "--group", GROUP, env=env) == 1
    status = {c: json.loads((_cell_dir(root, c) / "cell.json").read_text())["status"] for c in ids}
    assert status == {ids[0]: "ok", victim: "failed", ids[2]: "ok"}
    assert "FAKE rank failure" in json.loads((root / "results" / "failed" / f"{victim}.json").read_text())["reason"]
    assert not (root / "results" / "groups" / GROUP / "done.json").exists()
    assert _loads(root) == 1
    kept = {c: _digest(_cell_dir(root, c) / "metrics.parquet") for c in (ids[0], ids[2])}

    assert _cli(root, "run-group", "--group", GROUP, env=env) == 0  # the fake fails once: now it passes
    group_json = json.loads((root / "results" / "groups" / GROUP / "group.json").read_text())
    assert group_json["cells"] == [victim]  # the rerun ran only the failed cell
    assert json.loads((_cell_dir(root, victim) / "cell.json").read_text())["status"] == "ok"
    assert kept == {c: _digest(_cell_dir(root, c) / "metrics.parquet") for c in kept}
    assert (root / "results" / "groups" / GROUP / "done.json").exists()

    logs = _loads(root)
    assert _cli(root, "run-group", "--group", GROUP, env=env) == 0  # after success: nothing runs
    assert _loads(root) == logs
    assert "nothing to run" in (root / "cli.run-group.log").read_text()


def test_resize_cache_gives_the_logits_of_a_model_built_for_that_cache() -> None:
    import torch

    from llmenergy.inference import model as M
    from llmenergy.inference import weights

    prompts = [[1, 5, 9, 3], [1, 7, 2]]
    built, _ = weights.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, max_batch_size=3,
                             max_seq_len=24)
    resized, _ = weights.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, max_batch_size=1,
                               max_seq_len=64)
    M.resize_cache(resized, 3, 24)
    assert resized.layers[0].attention.cache_k.shape == built.layers[0].attention.cache_k.shape
    assert resized.freqs_cis.shape == built.freqs_cis.shape
    from llmenergy.inference.engines import make_engine

    for a, b in zip(make_engine("reference", built).first_logits(prompts),
                    make_engine("reference", resized).first_logits(prompts), strict=True):
        assert torch.equal(a, b)


def test_groups_share_model_gpu_shards_engine_and_cap(tmp_path: Path) -> None:
    cells = [Cell("m", "d", "g", 1, b, 8, cap) for b in (1, 2) for cap in (None, 200.0)]
    cells.append(Cell("m", "d", "g", 2, 1, 8, None))
    groups = make_groups(cells)
    assert [len(g.cells) for g in groups] == [2, 2, 1]
    assert groups[0].id == group_id(cells[0]) == "m_g_s1_pnone_reference"
    assert groups[1].id == "m_g_s1_p200W_reference"


def test_a_rank_failing_alone_ends_the_group_without_hanging_and_the_rerun_runs_the_rest(tmp_path: Path) -> None:
    """Rank 1 of 2 raises in cell 2 of 4 while rank 0 waits for it in a collective: the
    group leaves within a minute, cell 2 is recorded failed with rank 1's reason, cells
    3 and 4 stay unfinished, and the rerun runs exactly cells 2-4 (issue 21)."""
    import time

    root = tmp_path / "g"
    _config(root, [{**c, "shards": [2]} for c in FOUR])
    ids = _ids(root)
    gid = "tiny_cpu_s2_pnone_reference"
    env = make_env(None)
    env.update(FAKE_CRASH_CELLS=ids[1], FAKE_CRASH_RANKS="1", FAKE_CRASH_ONCE_DIR=str(tmp_path / "once"))
    assert _cli(root, "run-group", "--group", gid, env=env, timeout_s=300) == 1
    ended_ns = time.time_ns()
    records = {c: _cell_dir(root, c) / "cell.json" for c in ids}
    assert json.loads(records[ids[0]].read_text())["status"] == "ok"
    victim = json.loads(records[ids[1]].read_text())
    assert victim["status"] == "failed" and "rank 1" in victim["reason"] and "FAKE rank failure" in victim["reason"]
    assert not records[ids[2]].exists() and not records[ids[3]].exists()  # left for the rerun
    assert not (_cell_dir(root, ids[2]) / "events.parquet").exists()
    failed_ns = json.loads((_cell_dir(root, ids[1]) / ".run" / "ranks" / "1.json").read_text())["at_ns"]
    assert (ended_ns - failed_ns) / 1e9 < 60  # from rank 1's failure to the launcher's exit

    assert _cli(root, "run-group", "--group", gid, env=env, timeout_s=300) == 0
    group_json = json.loads((root / "results" / "groups" / gid / "group.json").read_text())
    assert group_json["cells"] == ids[1:]
    assert {c: json.loads(records[c].read_text())["status"] for c in ids} == {c: "ok" for c in ids}


def test_cells_of_one_kv_cache_share_the_compiled_engine_and_match_it_alone(tmp_path: Path) -> None:
    """Two cells of the compiled engine with the same batch size and KV cache (two datasets of
    one prompt length): the second keeps the first's engine, so it compiles nothing new, and
    its tokens are those of the cell run alone. A third cell with another cache gets its own."""
    packed, alone = tmp_path / "packed", tmp_path / "alone"
    same = [{**_cell(d, 2, 4), "engine": ["compiled"]} for d in ("a", "c")]
    cells = [*same, {**_cell("a", 3, 4), "engine": ["compiled"]}]
    for root in (packed, alone):
        _config(root, cells)
        data = yaml.safe_load((root / "config.yaml").read_text())
        data["datasets"]["c"] = {**data["datasets"]["a"], "seed": 2}  # another dataset, same prompt length
        (root / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    ids = _ids(packed)
    gid = "tiny_cpu_s1_pnone_compiled"
    assert _cli(packed, "run-group", "--group", gid) == 0, (packed / "cli.run-group.log").read_text()[-3000:]
    loads = [json.loads((_cell_dir(packed, c) / "cell.json").read_text())["provenance"]["load"] for c in ids]
    assert [load["shared_engine"] for load in loads] == [False, True, False]
    assert [load["engine_index"] for load in loads] == [0, 0, 1]  # the third: the job's second engine
    assert [load["engine_after_reset"] for load in loads] == [False] * 3  # room left: nothing reset
    for c in ids:  # on CPU nothing compiles: the prefill is eager, and the cell says so
        assert json.loads((_cell_dir(packed, c) / "cell.json").read_text())["provenance"]["load"]["prefill"] == "eager"
    rank_log = (packed / "results" / "groups" / gid / "logs" / "rank0.log").read_text()
    assert rank_log.count("engine kept (same precision and KV cache)") == 1
    for cid in ids:
        assert _cli(alone, "run-cell", "--cell", cid) == 0
        doc = json.loads((_cell_dir(alone, cid) / "cell.json").read_text())
        assert doc["provenance"]["load"]["shared_engine"] is False
        assert doc["provenance"]["load"]["engine_index"] == 0
        rp, ra = (pq.read_table(_cell_dir(r, cid) / "responses.parquet").to_pandas() for r in (packed, alone))
        cols = ["prompt_id", "tokens_in", "tokens_out", "text"]
        assert rp[cols].equals(ra[cols]), cid


def test_an_int8_group_compares_each_cells_logits_with_the_same_loads_fp16_weights(tmp_path: Path) -> None:
    """int8 quantises at the group's first cell and releases the 16-bit weights; every cell,
    of either dataset, still gets its prompts' logits compared with fp16's (taken in the
    load), in cell.json and in metrics.parquet. A bf16 group loads the weights as fp16's
    for its references first, then its own (on a CPU device both float32: no difference;
    bf16 against fp32 on CPU: tests/inference/test_fidelity.py)."""
    root = tmp_path / "q"
    int8 = [{**_cell(d, b, 4), "engine": ["compiled"], "precision": ["int8"]} for d, b in (("a", 2), ("b", 3))]
    _config(root, [*int8, {**_cell("a", 2, 4), "engine": ["reference"], "precision": ["bf16"]}])
    ids = _ids(root)
    for gid in ("tiny_cpu_s1_pnone_compiled_int8", "tiny_cpu_s1_pnone_reference_bf16"):
        assert _cli(root, "run-group", "--group", gid) == 0, (root / "cli.run-group.log").read_text()[-3000:]
    docs = {c: json.loads((_cell_dir(root, c) / "cell.json").read_text()) for c in ids}
    rows = {c: pq.read_table(_cell_dir(root, c) / "metrics.parquet").to_pylist()[0] for c in ids}
    narrow = [c for c in ids if c.endswith("_int8")]
    assert len(narrow) == 2
    for cid in narrow:
        fid, row = docs[cid]["fidelity"], rows[cid]
        assert docs[cid]["status"] == "ok" and fid["reason"] is None, fid
        # the datasets' first prompts (3 and 4 of them), the last positions of each
        assert fid["prompts"] == (4 if "_a_" in cid else 3) and fid["positions"] > fid["prompts"]
        # int8 per-channel weights on a float32 tiny model: a small, non-zero difference
        assert 0 < fid["logit_rel_diff"] <= fid["logit_rel_diff_max"] < 0.05, fid
        assert fid["top1_agree"] > 0.5 and fid["token_kl_nats"] >= 0
        assert row["precision"] == "int8" and row["logit_rel_diff"] == fid["logit_rel_diff"]
        assert row["fidelity_positions"] == fid["positions"] and row["weights_synthetic"] is True
    bf16 = next(c for c in ids if c.endswith("_bf16"))
    fid = docs[bf16]["fidelity"]
    assert docs[bf16]["status"] == "ok" and fid["reason"] is None and fid["against"] == "float32", fid
    assert fid["logit_rel_diff"] == 0.0 and fid["top1_agree"] == 1.0 and fid["prompts"] == 4, fid
    assert rows[bf16]["precision"] == "bf16" and rows[bf16]["logit_rel_diff"] == 0.0
    bf16_log = (root / "results" / "groups" / "tiny_cpu_s1_pnone_reference_bf16" / "logs" / "rank0.log").read_text()
    assert "weights loaded as float32 for the comparison" in bf16_log
    rank_log = (root / "results" / "groups" / "tiny_cpu_s1_pnone_compiled_int8" / "logs" / "rank0.log").read_text()
    assert rank_log.count("fp16 reference logits of 2 prompt set(s)") == 1  # once, in the first cell's load
