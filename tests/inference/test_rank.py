"""The ranks' agreement after a cell (``inference.rank``), on files, without processes."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from llmenergy.handshake import RankOutcome, WorkerStatus
from llmenergy.inference import rank
from llmenergy.layout import CellFiles


def test_a_rank_waits_for_the_others_and_finds_them_in_step(tmp_path: Path) -> None:
    files = CellFiles(tmp_path)
    late = threading.Timer(0.3, lambda: RankOutcome(1, "ok", at_ns=2).write(files.outcome(1)))
    late.start()
    outcomes = rank.agree(files, RankOutcome(0, "ok", at_ns=1), world_size=2, timeout_s=10)
    late.join()
    assert [o.rank for o in outcomes] == [0, 1] and rank.in_step(outcomes, 2)


def test_a_missing_rank_ends_the_wait_at_the_deadline_out_of_step(tmp_path: Path) -> None:
    files = CellFiles(tmp_path)
    started = time.monotonic()
    outcomes = rank.agree(files, RankOutcome(1, "failed", "rank 1: boom", at_ns=1), world_size=2, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert [o.rank for o in outcomes] == [1] and not rank.in_step(outcomes, 2)


def test_a_rank_that_left_puts_the_others_out_of_step(tmp_path: Path) -> None:
    outcomes = [RankOutcome(0, "failed", "rank 0: connection closed", at_ns=9),
                RankOutcome(1, "failed", "rank 1: boom", at_ns=1, left=True)]
    assert not rank.in_step(outcomes, 2)


def test_a_rank_other_than_0_also_waits_for_rank_0s_status(tmp_path: Path) -> None:
    files = CellFiles(tmp_path)
    RankOutcome(0, "ok", at_ns=1).write(files.outcome(0))
    status = threading.Timer(0.4, lambda: WorkerStatus("ok").write(files.worker_status))
    status.start()
    started = time.monotonic()
    rank.agree(files, RankOutcome(1, "ok", at_ns=2), world_size=2, timeout_s=10)
    status.join()
    assert time.monotonic() - started >= 0.35


def test_the_cell_is_recorded_with_the_first_failing_ranks_reason() -> None:
    own = WorkerStatus("failed", "rank 0: RuntimeError: connection closed by peer")
    outcomes = [RankOutcome(0, own.status, own.reason, at_ns=50),
                RankOutcome(1, "failed", "rank 1: RuntimeError: boom", at_ns=10)]
    assert rank.cell_status(own, outcomes, 2) == WorkerStatus("failed", "rank 1: RuntimeError: boom")
    ok = WorkerStatus("ok", load={"built": True})
    assert rank.cell_status(ok, [RankOutcome(0, "ok", at_ns=1), RankOutcome(1, "ok", at_ns=2)], 2) == ok
    missing = rank.cell_status(ok, [RankOutcome(0, "ok", at_ns=1)], 2)
    assert missing.status == "failed" and "[1]" in missing.reason


# --------------------------------------------------------------------------- clock offsets

def test_offset_estimate_is_within_half_the_shortest_round_trip_whatever_the_delays() -> None:
    true_offset = 7_300_000  # the peer's clock runs 7.3 ms ahead of rank 0's
    # (rank 0 sends at t0, out delay, peer reads, back delay) with asymmetric delays
    trips = [(1_000_000_000, 900_000, 100_000), (2_000_000_000, 50_000, 2_000_000),
             (3_000_000_000, 120_000, 80_000), (4_000_000_000, 3_000_000, 3_000_000)]
    samples = [(t0, t0 + out + true_offset, t0 + out + back) for t0, out, back in trips]
    offset, rtt = rank.estimate_offset(samples)
    assert rtt == 200_000  # the third trip, the shortest
    assert offset == true_offset + (120_000 - 80_000) // 2  # its half-asymmetry: the error left
    assert abs(offset - true_offset) <= rtt // 2
    # the first trip alone (900 µs out, 100 µs back) would be 400 µs off
    assert abs(rank.estimate_offset(samples[:1])[0] - true_offset) == 400_000


def test_node_offsets_keep_each_nodes_shortest_trip_and_rank_0s_node_is_zero() -> None:
    per_rank = {1: ("a", 4_000, 90_000), 2: ("b", 2_000_000, 300_000), 3: ("b", 1_950_000, 100_000)}
    clocks = rank.node_offsets(per_rank, "a")
    assert clocks.offsets_ns == {"a": 0, "b": 1_950_000}
    assert clocks.rtt_ns == {"a": 0, "b": 100_000}


def clock_worker(r: int, skew_ns: dict[int, int], nodes: dict[int, str]) -> dict[int, tuple[str, int, int]]:
    """Rank ``r`` of a job whose rank 2 runs a clock ``skew_ns`` ahead (its time.time_ns patched)."""
    import time as time_mod

    import torch

    real = time_mod.time_ns
    if skew_ns.get(r):
        time_mod.time_ns = lambda: real() + skew_ns[r]
    return rank.measure_clock_offsets(torch.device("cpu"), nodes[r])


def test_clock_offsets_measured_over_gloo_on_one_host_and_with_a_skewed_clock() -> None:
    from dist_helpers import run_ranks

    skew = 25_000_000
    results = run_ranks(clock_worker, 3, {2: skew}, {0: "hostA", 1: "hostA", 2: "hostB"}, timeout_s=180.0)
    assert results[1] == results[2] == {}  # only rank 0 learns the offsets
    same_host, skewed = results[0][1], results[0][2]
    assert same_host[0] == "hostA" and skewed[0] == "hostB"
    assert 0 < same_host[2] < 50_000_000 and abs(same_host[1]) <= same_host[2] // 2 + 1_000
    assert abs(skewed[1] - skew) <= skewed[2] // 2 + 1_000
    assert abs(skewed[1] - skew) < 2_000_000


def test_only_ranks_sharing_a_model_on_gpus_use_nccl() -> None:
    """A one-GPU cell's control collectives (barriers, stop flag, clock handshake) run over gloo:
    a live NCCL communicator cost ~170 µs a decode step on an H200 (session 19). Checked there:
    gloo at world size 1 all-reduces, broadcasts and all-gathers CUDA tensors."""
    assert rank.process_group_backend("cuda", 1) == "gloo"
    assert rank.process_group_backend("cuda", 2) == "nccl"
    assert rank.process_group_backend("cpu", 4) == "gloo"
