"""The ranks' agreement after a cell (``inference.rank``), on files, without processes."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from llmenergy.cellfiles import CellFiles, RankOutcome, WorkerStatus
from llmenergy.inference import rank


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
