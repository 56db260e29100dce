"""Time ``llmenergy.analysis.aggregate.aggregate`` over many synthetic cells.

Usage: python bench/aggregate_scale.py [--cells 10000] [--repeats 3] [--runs 3]
Creates the cell directories (each with a metrics.parquet of ``repeats`` rows)
in a temporary directory, then times ``aggregate`` ``runs`` times and prints
the median. Target: < 20 s for 10,000 cells on a 2-core machine.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from llmenergy.analysis.aggregate import aggregate
from llmenergy.analysis.metrics import to_table

log = logging.getLogger("aggregate_scale")


def make_cells(root: Path, n_cells: int, repeats: int) -> None:
    models = ["llama-7b", "llama-13b", "llama-30b", "llama-65b"]
    for i in range(n_cells):
        cid = f"cell-{i:05d}"
        rows = []
        for r in range(repeats):
            energy_j = 1000.0 + 10.0 * ((i * 7 + r * 3) % 50)
            tokens = 4096
            rows.append(dict(cell_id=cid, model=models[i % 4], dataset="alpaca", gpu="H100",
                             shards=1 + i % 8, nodes=1, batch_size=2 ** (i % 7), max_gen_len=256,
                             engine="reference", repeat=r, status="ok", tokens_out=tokens,
                             duration_s=10.0 + r, energy_j=energy_j, j_per_token=energy_j / tokens,
                             tokens_per_s=tokens / (10.0 + r), power_source="nvml",
                             schema_version=1))
        cdir = root / "cells" / cid
        cdir.mkdir(parents=True)
        pq.write_table(to_table(rows), cdir / "metrics.parquet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("llmenergy").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_cells(root, args.cells, args.repeats)
        log.info("created %d cells in %.1f s", args.cells, time.perf_counter() - t0)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            res = aggregate(root)
            times.append(time.perf_counter() - t0)
            log.info("aggregate: %.2f s (%d rows, %d cells, %d problems)", times[-1], res.n_rows,
                     res.n_cells, len(res.problems))
        log.info("median of %d runs: %.2f s over %d cells", args.runs, statistics.median(times),
                 args.cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
