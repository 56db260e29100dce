"""A collector failing on one node of a 2-node cell, on the real test cluster (issue 22, coverage).

The cluster's slurmd of each node runs in its own UTS namespace, so ``hostname``
inside a job differs per node; the fake NVML (``tests/fakes/fake_nvml.py``, what
``import pynvml`` finds with ``tests/fakes`` first on ``PYTHONPATH``) fails
``nvmlInit`` on ``node2`` only (``init_error_hosts``). The ranks compute on the CPU
and announce the fake GPU (``tests/fakes/rank/fake_rank_gpu.py``), so node1's
collector meters it through the fake NVML and node2's cannot build its backend.

Before issue 22 the error record counted as "ready": the cell went on with node2
unmetered and ended ``ok``. Now the cell fails at once, before the model load,
with node2's error; the rerun, without the fault, ends ``ok``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_helpers as h
from launch_helpers import load_fake

pytestmark = pytest.mark.slurm

FAKES = h.REPO / "tests" / "fakes"
FAKE_GPU_UUID = "GPU-fake-slurm-0"
NVML_DRIVER_NOT_LOADED = 9


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from h.private_workdir(request.node.name)


def _fake_gpu_env(monkeypatch: pytest.MonkeyPatch, failing_hosts: dict[str, int]) -> None:
    """What the Slurm jobs inherit (``h.env`` copies ``os.environ``): the fakes first on PYTHONPATH."""
    state = {"gpus": [load_fake("fake_nvml").make_gpu(FAKE_GPU_UUID)], "init_error_hosts": failing_hosts}
    paths = [str(h.RANK_FAKES), str(FAKES), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("FAKE_RANK_GPU_UUID", FAKE_GPU_UUID)
    monkeypatch.setenv("FAKE_NVML_STATE", json.dumps(state))


def test_collector_failing_on_node2_fails_the_cell_at_once_naming_node2(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = h.tiny_config({"V1": h.gpu_type("v100", 1)}, [h.group("V1", 2)])
    cfg["collector"] = {"backend": "nvml", "interval_ms": 100, "idle_baseline_s": 0.2}
    h.write_config(workdir, cfg)
    cell = h.cell_id(workdir, gpu="V1")
    _fake_gpu_env(monkeypatch, {"node2": NVML_DRIVER_NOT_LOADED})

    first = h.run_snakemake(workdir)

    assert first.returncode != 0, first.tail()
    failed = json.loads((workdir / "results" / "failed" / f"{cell}.json").read_text())
    assert failed["status"] == "failed", failed
    reason = failed["reason"]
    assert reason.startswith("collector on node node2 failed: "), reason
    assert "\n" not in reason
    assert sorted(failed["provenance"]["hosts"]) == ["node1", "node2"]
    # at once: the ranks never reached the model load, and the job was short
    rank0 = (h.cell_dir(workdir, cell) / "logs" / "rank0.log").read_text(errors="replace")
    assert "built llama-tiny" not in rank0, rank0[-2000:]
    assert failed["provenance"]["wall_s"] < 45.0, failed["provenance"]["wall_s"]

    _fake_gpu_env(monkeypatch, {})
    second = h.run_snakemake(workdir)
    assert second.returncode == 0, second.tail()
    assert second.executed_cells == [cell], second.tail()
    record = h.cell_json(workdir, cell)
    assert record["status"] == "ok", record
    assert sorted(c["node"] for c in record["provenance"]["collectors"]) == ["node1", "node2"]
