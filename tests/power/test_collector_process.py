"""The per-node collector process: handshake, parts, final file, signals, crash recovery."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmenergy import entrypoints
from llmenergy.atomic import write_json, write_parquet
from llmenergy.power.backends.base import (
    POWER_SCHEMA,
    DeviceInfo,
    make_row,
    rows_to_table,
)
from llmenergy.power.collector import (
    PART_RE,
    main,
    merge_node_files,
    read_uuid_files,
    recovered_nodes,
)

NODE = "node-a.cluster"  # a dot in the name must not confuse part/final parsing


def dirs(tmp_path: Path) -> dict[str, Path]:
    d = {"out": tmp_path / "power", "uuids": tmp_path / "uuids", "ready": tmp_path / "ready"}
    for path in d.values():
        path.mkdir()
    return d


def start_collector(d: dict[str, Path], backend: str, *extra: str, expect: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", entrypoints.COLLECTOR, "--backend", backend,
           "--interval-ms", "20", "--flush-s", "0.2", "--out", str(d["out"]), "--node", NODE,
           "--uuid-dir", str(d["uuids"]), "--ready-dir", str(d["ready"]),
           "--expect-devices", str(expect), "--wait-s", "30", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"collector exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out; collector output:\n{proc.communicate()[0]}")


def parts(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if PART_RE.match(p.name))


def test_estimate_collector_handshake_and_sigusr1(tmp_path) -> None:
    d = dirs(tmp_path)
    proc = start_collector(d, "estimate", "--option", "tdp_w=80", expect=2)
    time.sleep(0.3)
    assert not (d["ready"] / f"{NODE}.json").exists()  # still waiting for the second rank
    write_json(d["uuids"] / f"{NODE}.0.json", {"node": NODE, "rank": 0, "uuid": "cpu"})
    write_json(d["uuids"] / f"{NODE}.1.json", {"node": NODE, "rank": 1, "uuid": "cpu"})
    write_json(d["uuids"] / "other-node.2.json", {"node": "other-node", "rank": 2, "uuid": "cpu"})
    ready = d["ready"] / f"{NODE}.json"
    wait_for(ready.exists, 30, proc)
    info = json.loads(ready.read_text())
    assert info["node"] == NODE and info["backend"] == "estimate" and info["error"] is None
    assert [dev["uuid"] for dev in info["devices"]] == ["cpu-estimate"]
    wait_for(lambda: len(parts(d["out"])) >= 2, 30, proc)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output

    final = d["out"] / f"{NODE}.parquet"
    table = pq.read_table(final)
    assert table.schema.remove_metadata() == POWER_SCHEMA
    assert table.num_rows >= 5
    stamps = table.column("timestamp_ns").to_pylist()
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    energy = table.column("energy_mj").to_pylist()
    assert all(b >= a for a, b in zip(energy, energy[1:]))
    assert set(table.column("source").to_pylist()) == {"estimate"}
    assert set(table.column("node").to_pylist()) == {NODE}
    assert parts(d["out"]) == []  # parts removed after the final file
    assert [p.name for p in d["out"].iterdir()] == [final.name]


def test_replay_collector_sigterm_keeps_recorded_values(tmp_path) -> None:
    d = dirs(tmp_path)
    dev = DeviceInfo(index=0, uuid="GPU-r", name="H100", domain="gpu")
    recorded = [make_row(node="rec", device=dev, timestamp_ns=t, source="nvml",
                         energy_mj=1000.0 + 7.0 * t, power_w=70.0 + t) for t in range(5)]
    recording = tmp_path / "rec.parquet"
    write_parquet(recording, rows_to_table(recorded))
    proc = start_collector(d, "replay", "--option", f"replay_path={recording}",
                           "--option", "replay_loop=false")
    write_json(d["uuids"] / f"{NODE}.0.json", {"node": NODE, "rank": 0, "uuid": "GPU-r"})
    wait_for((d["ready"] / f"{NODE}.json").exists, 30, proc)
    wait_for(lambda: bool(parts(d["out"])), 30, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    table = pq.read_table(d["out"] / f"{NODE}.parquet")
    assert table.column("power_w").to_pylist() == [70.0 + t for t in range(5)]
    assert table.column("energy_mj").to_pylist() == [1000.0 + 7.0 * t for t in range(5)]
    assert set(table.column("source").to_pylist()) == {"replay"}
    assert set(table.column("device").to_pylist()) == {"GPU-r"}


def test_kill_9_leaves_only_parts_and_merge_recovers(tmp_path) -> None:
    d = dirs(tmp_path)
    proc = start_collector(d, "estimate", "--option", "tdp_w=80")
    write_json(d["uuids"] / f"{NODE}.0.json", {"node": NODE, "rank": 0, "uuid": "cpu"})
    wait_for(lambda: len(parts(d["out"])) >= 2, 30, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (d["out"] / f"{NODE}.parquet").exists()
    left = parts(d["out"])
    assert len(left) >= 2
    rows_in_parts = sum(pq.read_table(p).num_rows for p in left)

    # a healthy second node alongside the crashed one
    other = rows_to_table([make_row(node="node-b", device=DeviceInfo(0, "GPU-b", "H100", "gpu"),
                                    timestamp_ns=5, source="nvml", energy_mj=1.0)])
    write_parquet(d["out"] / "node-b.parquet", other)

    merged = merge_node_files(d["out"])
    assert recovered_nodes(merged) == [NODE]
    assert merged.num_rows == rows_in_parts + 1
    assert set(merged.column("node").to_pylist()) == {NODE, "node-b"}
    assert merged.select(list(POWER_SCHEMA.names)).schema.remove_metadata() == POWER_SCHEMA


def test_merge_prefers_final_file_and_handles_empty_dir(tmp_path) -> None:
    dev = DeviceInfo(0, "GPU-a", "H100", "gpu")
    final_rows = [make_row(node="n1", device=dev, timestamp_ns=t, source="nvml") for t in (3, 1, 2)]
    write_parquet(tmp_path / "n1.parquet", rows_to_table(final_rows))
    stale = [make_row(node="n1", device=dev, timestamp_ns=99, source="nvml")]
    write_parquet(tmp_path / "n1.part-0000.parquet", rows_to_table(stale))
    merged = merge_node_files(tmp_path)
    assert merged.column("timestamp_ns").to_pylist() == [1, 2, 3]
    assert recovered_nodes(merged) == []
    empty = merge_node_files(tmp_path / "nothing")
    assert empty.num_rows == 0 and empty.schema.remove_metadata() == POWER_SCHEMA


def test_merge_takes_a_node_file_of_an_earlier_version_without_its_newer_columns(tmp_path) -> None:
    dev = DeviceInfo(0, "GPU-a", "H100", "gpu")
    new = rows_to_table([make_row(node="n1", device=dev, timestamp_ns=t, source="nvml", other_processes=1)
                         for t in (1, 2)])
    write_parquet(tmp_path / "n1.parquet", new)
    write_parquet(tmp_path / "n2.parquet", new.drop_columns(["other_processes"]).set_column(
        0, "node", pa.array(["n2", "n2"])))
    merged = merge_node_files(tmp_path)
    assert merged.column("node").to_pylist() == ["n1", "n1", "n2", "n2"]
    assert merged.column("other_processes").to_pylist() == [1, 1, None, None]


def test_merge_leaves_out_a_stray_parquet_file_that_is_no_collectors(tmp_path, caplog) -> None:
    dev = DeviceInfo(0, "GPU-a", "H100", "gpu")
    write_parquet(tmp_path / "n1.parquet", rows_to_table([make_row(node="n1", device=dev, timestamp_ns=1,
                                                                   source="nvml")]))
    write_parquet(tmp_path / "notes.parquet", pa.table({"x": [1, 2]}))
    merged = merge_node_files(tmp_path)
    assert merged.column("node").to_pylist() == ["n1"]
    assert "notes.parquet is not a collector's file (no column node" in caplog.text


def test_read_uuid_files_matches_only_this_node(tmp_path) -> None:
    write_json(tmp_path / "n1.1.json", {"uuid": "GPU-b"})
    write_json(tmp_path / "n1.0.json", {"uuid": "GPU-a"})
    write_json(tmp_path / "n10.0.json", {"uuid": "GPU-other"})
    write_json(tmp_path / "n1.x.json", {"uuid": "GPU-junk"})
    (tmp_path / "n1.2.json").write_text("{partial")
    assert [e["uuid"] for e in read_uuid_files(tmp_path, "n1")] == ["GPU-a", "GPU-b"]


def test_unavailable_backend_writes_ready_with_error(tmp_path) -> None:
    d = dirs(tmp_path)
    write_json(d["uuids"] / "n1.0.json", {"uuid": "cpu"})
    before = signal.getsignal(signal.SIGUSR1)
    rc = main(["--backend", "rapl", "--option", f"rapl_root={tmp_path / 'absent'}", "--out", str(d["out"]),
               "--node", "n1", "--uuid-dir", str(d["uuids"]), "--ready-dir", str(d["ready"]),
               "--wait-s", "5"])
    assert rc == 3
    info = json.loads((d["ready"] / "n1.json").read_text())
    assert info["backend"] is None and "rapl" in info["error"]
    assert pq.read_table(d["out"] / "n1.parquet").num_rows == 0
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored


def test_stop_while_waiting_for_devices_exits_cleanly(tmp_path) -> None:
    d = dirs(tmp_path)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    rc = main(["--backend", "none", "--out", str(d["out"]), "--node", "n1", "--uuid-dir", str(d["uuids"]),
               "--ready-dir", str(d["ready"]), "--wait-s", "30"])
    timer.join()
    assert rc == 0
    assert not (d["ready"] / "n1.json").exists()
    assert pq.read_table(d["out"] / "n1.parquet").num_rows == 0


def test_fast_power_rows_between_full_samples(tmp_path, make_nvml) -> None:
    """With a fast-power backend, light rows (energy + power only) fill the gaps at ~50 Hz."""
    from launch_helpers import load_fake

    make_nvml([load_fake("fake_nvml").make_gpu("GPU-f")])
    d = dirs(tmp_path)
    write_json(d["uuids"] / "n1.0.json", {"uuid": "GPU-f"})
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    rc = main(["--backend", "nvml", "--interval-ms", "200", "--power-interval-ms", "20", "--out", str(d["out"]),
               "--node", "n1", "--uuid-dir", str(d["uuids"]), "--ready-dir", str(d["ready"])])
    timer.join()
    assert rc == 0
    table = pq.read_table(d["out"] / "n1.parquet")
    full = [r for r in table.to_pylist() if r["temperature_c"] is not None]
    light = [r for r in table.to_pylist() if r["temperature_c"] is None]
    assert 3 <= len(full) <= 8            # ~5 full samples in ~1 s at 200 ms
    assert len(light) >= 4 * len(full)    # ~9 light rows between two full ones
    assert all(r["power_w"] == pytest.approx(72.0) and r["energy_mj"] is not None for r in light)


def test_dcgm_rows_keep_dcgm_sample_times(tmp_path, fake_dcgm) -> None:
    """Through the collector, a DCGM row's time is when DCGM sampled, each sample once."""
    from launch_helpers import load_fake

    fake_nvml = load_fake("fake_nvml")
    t0_us = 1_700_000_000_000_000
    samples = [[t0_us + 100_000 * k, {156: 5_000_000 + 20_000 * k, 157: 200.0 + k}] for k in range(4)]
    fake_dcgm.reset(fake_nvml.FakeNvml({"gpus": [fake_nvml.make_gpu("GPU-d", dcgm=samples)]}))
    d = dirs(tmp_path)
    write_json(d["uuids"] / "n1.0.json", {"uuid": "GPU-d"})
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    rc = main(["--backend", "dcgm", "--interval-ms", "100", "--out", str(d["out"]), "--node", "n1",
               "--uuid-dir", str(d["uuids"]), "--ready-dir", str(d["ready"])])
    timer.join()
    assert rc == 0
    rows = pq.read_table(d["out"] / "n1.parquet").to_pylist()
    assert [(r["timestamp_ns"], r["energy_mj"], r["power_w"]) for r in rows] == [
        ((t0_us + 100_000 * k) * 1000, 5_000_000 + 20_000 * k, 200.0 + k) for k in range(4)]
    assert {r["source"] for r in rows} == {"dcgm"}


def test_a_gpu_process_of_the_rank_is_its_own_and_one_of_another_job_is_counted(tmp_path, make_nvml) -> None:
    """The collector takes the ranks' PIDs from their device files: on GPU-p the rank and its
    child (a compile worker) hold contexts, on GPU-q the rank and a process outside the job."""
    from launch_helpers import load_fake

    rank = subprocess.Popen([sys.executable, "-c", ";".join([
        "import subprocess, sys, time",
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])",
        "print(c.pid, flush=True)", "time.sleep(30)"])], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(rank.stdout.readline())
        make_nvml([load_fake("fake_nvml").make_gpu("GPU-p", processes=[rank.pid, worker]),
                   load_fake("fake_nvml").make_gpu("GPU-q", processes=[rank.pid, os.getpid()])])
        d = dirs(tmp_path)
        write_json(d["uuids"] / "n1.0.json", {"uuid": "GPU-p", "pid": rank.pid})
        write_json(d["uuids"] / "n1.1.json", {"uuid": "GPU-q", "pid": rank.pid})
        timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        rc = main(["--backend", "nvml", "--interval-ms", "100", "--out", str(d["out"]), "--node", "n1",
                   "--uuid-dir", str(d["uuids"]), "--ready-dir", str(d["ready"]), "--expect-devices", "2"])
        timer.join()
    finally:
        rank.kill()
        rank.wait()
    assert rc == 0
    rows = pq.read_table(d["out"] / "n1.parquet").to_pandas()
    assert rows.groupby("device")["other_processes"].max().to_dict() == {"GPU-p": 0, "GPU-q": 1}
