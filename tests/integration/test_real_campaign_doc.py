"""docs/real-campaign.md, run as written on the Slurm test cluster (issue 15, item 7).

Every ```bash block of the doc carries a ``<!-- step: NAME -->`` marker; this test runs
each block in order, for real, in a bash that first runs the doc's ``settings`` block
(so ``cd``, the venv and the variables hold, as in the user's shell), and checks what
each one did. It fails when a block stops working, and when the doc's blocks and the
steps below differ (a block added, removed, renamed or reordered).

What the test changes, and only that:

* the three placeholders of the ``settings`` block: the checkout (a copy of this one:
  Snakefile, workflow/, profiles/, envs/, config.yaml, with src/ and .venv linked), the
  weights (a tiny checkpoint in Meta's LLaMA-1 layout: ``LLaMA/tokenizer.model`` and
  ``LLaMA/7B/consolidated.00.pth`` + ``params.json``) and the data directory;
* the datasets come from a local HTTP mirror of raw.githubusercontent.com's paths
  (env ``LLMENERGY_DATA_MIRROR``), holding small files in the real formats, whose
  hashes replace the real pins (``tests/fakes/rank/fake_data_pins.py``);
* after the ``config`` block, :data:`SCALE_DOWN` (a tiny arch for the tiny checkpoint,
  CPU ranks for the fake GPUs, the estimate collector, 2 prompts × 4 tokens, 1 repeat);
* the copy's Slurm profile polls sooner and does not retry (:data:`PROFILE_TIMING`);
* the first ``run`` gets ``FAKE_CRASH_CELLS`` and ``tests/fakes/rank`` on PYTHONPATH,
  so one cell's ranks fail for real: the failure the doc's rerun steps are about.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import slurm_helpers as h
import torch
import yaml

from llmenergy import arch
from llmenergy.data import fetch, synthetic
from llmenergy.inference.checkpoint import params_json, save_meta_checkpoint
from llmenergy.inference.model import full_shapes
from llmenergy.inference.tokenizer import default_tokenizer_path

DOC = h.REPO / "docs" / "real-campaign.md"
STEP_RE = re.compile(r"<!-- step: ([a-z-]+) -->\n```bash\n(.*?)```", re.S)
PLACEHOLDERS = ("/path/to/llmenergy", "/path/to/LLaMA", "/path/to/data")

#: The steps of the doc, in order (a handler below for each).
STEPS = ["settings", "partitions", "fetch", "weights", "config", "plan", "dry-run", "run", "watch",
         "wait", "failures", "rerun-plan", "rerun", "summary", "report"]

#: Applied to the doc's campaign.yaml: the same cells, small enough for the 2-core test host.
SCALE_DOWN: dict[str, Any] = {
    "repeats": 1, "warmup_tokens": 2,
    "models.llama-7b.arch": "llama-tiny",
    "datasets.*.n_prompts": 2, "datasets.*.max_prompt_len": 32,
    "gpus.*.device": "cpu", "gpus.*.cpus_per_gpu": 1, "gpus.*.memory_gb": 8,
    "collector": {"backend": "estimate", "estimate_tdp_w": 65, "interval_ms": 100, "idle_baseline_s": 0.2,
                  "idle_settle_s": 0.2, "min_window_s": 0, "prefill_window_s": 0},
    "matrix.*.batch_size": [2], "matrix.*.max_gen_len": [4],
}
PROFILE_TIMING = {"slurm-init-seconds-before-status-checks": 2, "retries": 0, "latency-wait": 5}


def doc_steps(text: str) -> list[tuple[str, str]]:
    steps = STEP_RE.findall(text)
    blocks = text.count("```bash")
    assert len(steps) == blocks, f"{DOC.name}: {blocks} bash blocks, {len(steps)} with a step marker"
    return steps


def test_doc_steps_are_the_ones_this_test_runs() -> None:
    """Cheap (no cluster): the doc's blocks match STEPS, and each placeholder is in settings."""
    steps = doc_steps(DOC.read_text())
    assert [name for name, _ in steps] == STEPS
    settings = dict(steps)["settings"]
    assert all(p in settings for p in PLACEHOLDERS)


def test_doc_campaign_config_is_valid_as_written(tmp_path: Path) -> None:
    """The doc's campaign.yaml (its real 7B arch, 3 repeats, 64 prompts) plans 3 cells."""
    from llmenergy import config
    from llmenergy.planning.matrix import expand

    script = dict(doc_steps(DOC.read_text()))["config"]
    env = {**os.environ, "WEIGHTS": str(tmp_path / "LLaMA"), "DATA": str(tmp_path / "data")}
    subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path, env=env, check=True)
    cfg = config.load(tmp_path / "campaign.yaml", check_files=False)
    cells = expand(cfg).cells
    assert sorted((c.gpu, c.shards, c.dataset) for c in cells) == [
        ("A100", 4, "gsm8k"), ("V100", 1, "alpaca"), ("V100", 2, "alpaca")]
    assert cfg.models["llama-7b"].weights == str(tmp_path / "LLaMA" / "7B")


def scale_down(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys, ``*`` for every entry of a mapping or list (the path up to the
    last key must exist in the doc's config)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        targets = [data]
        for part in parts[:-1]:
            nxt = []
            for t in targets:
                nxt += (list(t.values()) if isinstance(t, dict) else list(t)) if part == "*" else [t[part]]
            targets = nxt
        assert targets, dotted
        for t in targets:
            t[parts[-1]] = value


class _Mirror(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        self.requested.append(self.path)


@pytest.fixture
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, list[str]]]:
    """A local mirror of raw.githubusercontent.com; yields (root, base URL, requested paths)."""
    root = tmp_path_factory.mktemp("mirror")
    requested: list[str] = []
    handler = functools.partial(type("Mirror", (_Mirror,), {"requested": requested}), directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def fill_mirror(root: Path, scratch: Path) -> tuple[dict[str, bytes], dict[str, dict[str, str]]]:
    """Small files in the real formats at the upstream paths; returns ({filename: bytes}, pins)."""
    made = {"alpaca_data.json": synthetic.write_alpaca(scratch / "a.json", 6, seed=0),
            "gsm8k_test.jsonl": synthetic.write_gsm8k(scratch / "t.jsonl", 6, seed=0),
            "gsm8k_train.jsonl": synthetic.write_gsm8k(scratch / "r.jsonl", 9, seed=1)}
    files, pins = {}, {}
    for sources in fetch.SOURCES.values():
        for s in sources:
            content = made[s.filename].read_bytes()
            target = root / s.url.removeprefix(fetch.UPSTREAM + "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            files[s.filename] = content
            if s.git_blob is not None:
                blob = subprocess.run(["git", "hash-object", str(target)], capture_output=True, text=True,
                                      check=True).stdout.strip()
                pins[s.filename] = {"git_blob": blob}
            else:
                pins[s.filename] = {"sha256": hashlib.sha256(content).hexdigest()}
    return files, pins


def meta_release(root: Path) -> Path:
    """Meta's LLaMA-1 layout with the tiny arch: root/tokenizer.model, root/7B/{consolidated.00.pth,
    params.json with vocab_size -1}."""
    args = arch.SIZES["llama-tiny"]
    g = torch.Generator().manual_seed(7)
    state = {n: torch.randn(s, generator=g) * 0.05 for n, s in full_shapes(args).items()}
    save_meta_checkpoint(state, params_json(args) | {"vocab_size": -1}, root / "7B", mp=1)
    shutil.copyfile(default_tokenizer_path(), root / "tokenizer.model")
    return root


def make_checkout(dest: Path) -> Path:
    """What the doc calls the checkout: the workflow files copied, src/ and .venv linked."""
    dest.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(h.REPO / name, dest / name)
    for name in ("workflow", "profiles", "envs"):
        shutil.copytree(h.REPO / name, dest / name)
    (dest / "src").symlink_to(h.REPO / "src")
    (dest / ".venv").symlink_to(h.VENV_BIN.parent)
    assert (dest / ".venv" / "bin" / "activate").is_file(), "the test venv has no activate script"
    profile = dest / "profiles" / "slurm" / "config.yaml"
    data = yaml.safe_load(profile.read_text())
    data.update(PROFILE_TIMING)
    profile.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


@dataclass
class Campaign:
    checkout: Path
    weights: Path
    data: Path
    settings: str = ""
    ran: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def run(self, name: str, block: str, *, extra_env: dict[str, str] | None = None,
            probe: str = "", timeout_s: float = 120, fail_cells: tuple[str, ...] = ()) -> str:
        """Run one doc block after the settings block, in bash with -e -o pipefail; return its output."""
        script = self.settings + "\n" + block + ("\n" + probe if probe else "")
        env = {**h.env(fail_cells), **(extra_env or {})}
        env.pop("VIRTUAL_ENV", None)
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=self.checkout.parent, env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"step {name} exited {proc.returncode}:\n{block}\n---\n{out[-4000:]}"
        self.ran.append(name)
        self.outputs[name] = out
        return out

    @property
    def log(self) -> str:
        return (self.checkout / "campaign.log").read_text(errors="replace")

    def snakemake_pid(self) -> int:
        return int((self.checkout / "campaign.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from h.private_workdir(request.node.name)


@pytest.mark.slurm
@pytest.mark.slow
def test_real_campaign_doc_runs_as_written(workdir: Path, mirror: tuple[Path, str, list[str]]) -> None:
    steps = doc_steps(DOC.read_text())
    assert [n for n, _ in steps] == STEPS
    blocks = dict(steps)
    mirror_root, mirror_url, requested = mirror
    files, pins = fill_mirror(mirror_root, workdir)
    pins_file = workdir / "pins.json"
    pins_file.write_text(json.dumps(pins))
    c = Campaign(checkout=make_checkout(workdir / "llmenergy"), weights=meta_release(workdir / "LLaMA"),
                 data=workdir / "data")
    settings = blocks["settings"]
    for placeholder, real in zip(PLACEHOLDERS, (c.checkout, c.weights, c.data), strict=True):
        settings = settings.replace(placeholder, str(real))
    assert "/path/to" not in settings
    handlers: dict[str, Callable[[str], None]] = {}

    def step(fn: Callable[[str], None]) -> Callable[[str], None]:
        handlers[fn.__name__.removeprefix("step_").replace("_", "-")] = fn
        return fn

    @step
    def step_settings(block: str) -> None:
        out = c.run("settings", block, probe='echo "venv=${VIRTUAL_ENV:-} pwd=$PWD W=$WEIGHTS D=$DATA"')
        assert f"pwd={c.checkout}" in out and f"W={c.weights} D={c.data}" in out
        # activated (VIRTUAL_ENV is unset in the test's environment): the checkout's .venv,
        # a link to the test venv, whose activate names its real path
        assert f"venv={h.VENV_BIN.parent} " in out, out
        c.settings = block

    @step
    def step_partitions(block: str) -> None:
        out = c.run("partitions", block)
        assert re.search(r"^v100\*? 2 gpu:", out, re.M) and re.search(r"^a100\*? 2 gpu:", out, re.M), out

    @step
    def step_fetch(block: str) -> None:
        out = c.run("fetch", block, extra_env={
            fetch.MIRROR_ENV: mirror_url, "FAKE_DATA_PINS": str(pins_file),
            "PYTHONPATH": os.pathsep.join(p for p in (str(h.RANK_FAKES), os.environ.get("PYTHONPATH")) if p)})
        for name, content in files.items():
            assert (c.data / name).read_bytes() == content, name
            assert f"sha256 {hashlib.sha256(content).hexdigest()}  {c.data / name}" in out
        upstream = ["/" + s.url.removeprefix(fetch.UPSTREAM + "/") for ss in fetch.SOURCES.values() for s in ss]
        assert sorted(requested) == sorted(upstream)  # every file came from the mirror, once
        assert out.count("Add to config.yaml") == 2

    @step
    def step_weights(block: str) -> None:
        out = c.run("weights", block)
        for item in ("tokenizer.model", "7B", "consolidated.00.pth", "params.json"):
            assert re.search(rf"^{re.escape(item)}$", out, re.M), (item, out)

    cells: dict[str, Any] = {}

    @step
    def step_config(block: str) -> None:
        c.run("config", block)
        path = c.checkout / "campaign.yaml"
        data = yaml.safe_load(path.read_text())
        assert data["models"]["llama-7b"]["weights"] == f"{c.weights}/7B"
        assert {d["path"] for d in data["datasets"].values()} == {
            f"{c.data}/alpaca_data.json", f"{c.data}/gsm8k_test.jsonl"}
        scale_down(data, SCALE_DOWN)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        from llmenergy import config
        from llmenergy.planning.matrix import expand

        cells.update({x.id: x for x in expand(config.load(path)).cells})
        assert len(cells) == 3

    bad = {}

    @step
    def step_plan(block: str) -> None:
        out = c.run("plan", block)
        for cid in cells:
            assert cid in out, (cid, out)
        assert "v100" in out and "a100" in out

    @step
    def step_dry_run(block: str) -> None:
        out = c.run("dry-run", block)
        assert sorted(h.executed_cells(out)) == sorted(cells), out[-3000:]
        assert not (c.checkout / "results" / "cells").exists()  # nothing ran
        bad["cell"] = next(cid for cid, x in cells.items() if x.gpu == "V100" and x.shards == 1)

    @step
    def step_run(block: str) -> None:
        c.run("run", block, fail_cells=(bad["cell"],))
        assert alive(c.snakemake_pid())

    @step
    def step_watch(block: str) -> None:
        h.wait_for(lambda: "SLURM jobid" in c.log, 120, "the first job submitted")
        out = c.run("watch", block)
        assert re.search(r"rule_run_cell_wildcards_\S+", out), out  # a cell's job in squeue
        assert "SLURM jobid" in out

    @step
    def step_wait(block: str) -> None:
        out = c.run("wait", block, timeout_s=420)
        assert not alive(c.snakemake_pid())
        run = h.Run(1, c.log, 0)
        assert sorted(run.executed_cells) == sorted(cells)
        assert "Error in rule run_cell" in c.log
        rows = {r.split()[0]: r.split() for r in out.splitlines() if re.match(r"^\d+ ", r)}
        for cid in cells:
            (job,) = run.job_ids(cid)
            state = rows[str(job)][2]
            assert state == ("FAILED" if cid == bad["cell"] else "COMPLETED"), (cid, rows[str(job)])

    @step
    def step_failures(block: str) -> None:
        out = c.run("failures", block)
        assert re.search(rf"^{re.escape(bad['cell'])} failed .*FAKE rank failure", out, re.M), out
        assert [p.stem for p in (c.checkout / "results" / "failed").glob("*.json")] == [bad["cell"]]
        c.outputs["kept"] = json.dumps(h.fingerprint(c.checkout, [x for x in cells if x != bad["cell"]]))

    @step
    def step_rerun_plan(block: str) -> None:
        out = c.run("rerun-plan", block)
        assert h.executed_cells(out) == [bad["cell"]], out[-3000:]

    @step
    def step_rerun(block: str) -> None:
        out = c.run("rerun", block, timeout_s=420)
        assert not alive(c.snakemake_pid())
        assert h.executed_cells(c.log) == [bad["cell"]]
        (job,) = h.Run(0, c.log, 0).job_ids(bad["cell"])
        assert re.search(rf"^{job} +\S+ +COMPLETED ", out, re.M), out
        assert "Error in rule" not in c.log and "steps (100%) done" in c.log, c.log[-3000:]
        others = [x for x in cells if x != bad["cell"]]
        assert json.dumps(h.fingerprint(c.checkout, others)) == c.outputs["kept"]  # untouched
        assert h.cell_json(c.checkout, bad["cell"])["status"] == "ok"
        # failed/ lists only cells not yet finished (the doc says so)
        assert not (c.checkout / "results" / "failed" / f"{bad['cell']}.json").exists()

    @step
    def step_summary(block: str) -> None:
        out = c.run("summary", block)
        summary = pd.read_parquet(c.checkout / "results" / "summary.parquet")
        assert sorted(summary.cell_id) == sorted(cells) and set(summary.status) == {"ok"}
        for cid in cells:
            assert re.search(rf"{re.escape(cid)}\s+\d+\s+ok\s+8\s", out), out  # 2 prompts × 4 tokens
        assert "estimate" in out

    @step
    def step_report(block: str) -> None:
        report = c.checkout / "results" / "report.html"
        before = report.stat().st_mtime_ns
        time.sleep(0.01)
        out = c.run("report", block)
        assert report.stat().st_mtime_ns > before and "report.html" in out
        html = report.read_text()
        assert all(cid in html for cid in cells)
        assert any(p.suffix == ".png" for p in (c.checkout / "results" / "figures").iterdir())

    assert list(handlers) == STEPS
    try:
        for name, block in steps:
            handlers[name](settings if name == "settings" else block)
    finally:
        pid_file = c.checkout / "campaign.pid"
        if pid_file.is_file() and alive(pid := c.snakemake_pid()):
            os.kill(pid, signal.SIGINT)  # the snakemake this test started: it cancels its jobs
            h.wait_for(lambda: not alive(pid), 90, "snakemake to stop")
    assert c.ran == STEPS  # every block of the doc ran, in order
