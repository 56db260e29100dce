"""The launcher's power timestamps: every node's samples on rank 0's clock (issue 22, item 5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from llmenergy import atomic
from llmenergy.analysis.energy import attribute_events
from llmenergy.cellfiles import POWER_SCHEMA
from llmenergy.handshake import ClockOffsets
from llmenergy.layout import CellFiles
from llmenergy.orchestrate import finalize
from llmenergy.orchestrate.provenance import collect_provenance

T0_NS = 1_750_000_000 * 10**9
STEP_S = 5.0  # every GPU goes from 100 W to 400 W at this instant (true time = rank 0's clock)
OFFSET_NS = {"node0": 0, "node1": 80_000_000}  # node1's clock runs 80 ms ahead of rank 0's


def _samples(node: str) -> pa.Table:
    """A GPU of ``node`` polled every 20 ms for 10 s, stamped on the node's own clock; its
    counter is exact at each poll (changes at every one: no sensor restamping)."""
    t_s = np.arange(0.0, 10.0, 0.02)
    energy_j = np.where(t_s < STEP_S, 100.0 * t_s, 100.0 * STEP_S + 400.0 * (t_s - STEP_S))
    df = pd.DataFrame({
        "node": node, "device": f"GPU-{node}", "device_index": np.int32(0), "domain": "gpu",
        "timestamp_ns": T0_NS + np.round(t_s * 1e9).astype(np.int64) + OFFSET_NS[node],
        "energy_mj": 1000.0 * energy_j, "power_w": np.where(t_s < STEP_S, 100.0, 400.0), "source": "nvml",
    })
    return pa.Table.from_pandas(df.reindex(columns=POWER_SCHEMA.names), schema=POWER_SCHEMA, preserve_index=False)


def _events() -> pd.DataFrame:
    start_s, end_s = [4.0, 5.0], [5.0, 6.0]  # one second each side of the step, on rank 0's clock
    return pd.DataFrame({
        "cell_id": "c", "repeat": np.int32(0), "phase": ["prefill", "decode"], "batch_index": np.int32(0),
        "start_ns": [T0_NS + int(s * 1e9) for s in start_s], "end_ns": [T0_NS + int(e * 1e9) for e in end_s],
        "n_seqs": np.int32(1), "tokens_in": 0, "tokens_out": 0,
    })


def _job(tmp_path: Path, offsets: dict[str, int] | None) -> CellFiles:
    job = CellFiles(tmp_path / "cells" / "c")
    job.power_parts.mkdir(parents=True)
    for node in OFFSET_NS:
        atomic.write_parquet(job.power_parts / f"{node}.parquet", _samples(node))
    if offsets is not None:
        ClockOffsets(offsets_ns=offsets, rtt_ns=dict.fromkeys(offsets, 200_000), measured_ns=T0_NS).write(job.clocks)
    return job


def test_a_nodes_power_stamps_are_moved_by_its_offset_and_its_energy_attributed_right(tmp_path: Path) -> None:
    job = _job(tmp_path, OFFSET_NS)
    power = finalize.read_power(job, quiet=True).to_pandas()
    node1 = power[power["node"] == "node1"]["timestamp_ns"]
    assert node1.min() == T0_NS and power[power["node"] == "node0"]["timestamp_ns"].min() == T0_NS
    att = attribute_events(_events(), power)
    # two GPUs: 100 W each for the second before the step, 400 W each for the second after
    assert att["energy_j"].tolist() == pytest.approx([200.0, 800.0], rel=1e-6)
    assert att["n_devices"].tolist() == [2, 2]


def test_without_the_offsets_the_step_lands_on_the_wrong_side(tmp_path: Path) -> None:
    # the same samples read without .run/clocks.json: node1's step seems 80 ms late, and
    # 0.08 s × 300 W of its energy leaves the window after the step
    power = finalize.read_power(_job(tmp_path, None), quiet=True).to_pandas()
    att = attribute_events(_events(), power)
    assert att["energy_j"].tolist() == pytest.approx([200.0, 800.0 - 24.0], rel=1e-6)


def test_an_unreadable_clocks_file_leaves_the_stamps_and_says_so(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    job = _job(tmp_path, None)
    job.clocks.write_text("{not json")
    power = finalize.read_power(job, quiet=True)
    assert power["timestamp_ns"].to_pylist() == pa.concat_tables(
        [_samples("node0"), _samples("node1")])["timestamp_ns"].to_pylist()
    assert "clocks.json" in caplog.text


def test_the_offsets_are_in_the_cells_provenance(tmp_path: Path) -> None:
    job = _job(tmp_path, OFFSET_NS)
    prov = collect_provenance(job, started=T0_NS / 1e9)
    assert prov.clock_offsets_ns == OFFSET_NS
    assert prov.clock_offset_rtt_ns == {"node0": 200_000, "node1": 200_000}
    assert collect_provenance(CellFiles(tmp_path / "other"), started=T0_NS / 1e9).clock_offsets_ns is None


def test_a_group_job_logs_its_progress_with_the_time_left_at_its_own_pace(tmp_path: Path) -> None:
    from llmenergy import config
    from llmenergy.orchestrate.finalize import job_progress_text
    from llmenergy.planning.jobs import runtime_s
    from llmenergy.planning.matrix import expand
    from orchestrate_helpers import demo_config

    cfg = config.from_dict(demo_config(tmp_path))
    cells = expand(cfg).cells
    done, left = cells[:1], cells[1:4]
    plan_left_s = runtime_s(cfg, left)
    at_plan_pace = job_progress_text(cfg, done, left, runtime_s(cfg, done))
    assert at_plan_pace.startswith(f"1 of 4 cell(s) done, 3 left: about {max(1, round(plan_left_s / 60))} min more")
    # three times slower than planned so far: three times the plan's estimate left, in hours past 90 min
    slow = job_progress_text(cfg, done, left, runtime_s(cfg, done) * 5400 / plan_left_s * 3)
    assert slow.startswith("1 of 4 cell(s) done, 3 left: about 4.5 h more (estimate")
