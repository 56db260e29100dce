"""One line per bench run and per cell: tokens/s, the prefill and the decode of a batch, J/token.

    python bench/decode_table.py --bench plain=$OUT/h200_plain.json barrier=$OUT/h200_barrier.json \
        --cells bench-results/reset_alone bench-results/reset_plain

A bench run is the first row of ``bench/engines.py``'s JSON (``prefill_s``, ``decode_s``:
medians of a batch). A cell is every ``cells/<id>/`` of a results directory with
``events.parquet`` and ``metrics.parquet``: the medians of its measured ``prefill`` and
``decode`` events, and its metrics' median tokens/s and J/token. The decode of a batch is
the figure to set side by side: tokens/s also counts the prefill, which is bound by the
host (docs/precision.md, session 20). Used by ``bench/gpu_session.sh`` (nccl, ncclenv, reset).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

log = logging.getLogger("decode_table")


def _ms(value: float | None) -> str:
    return "      -" if value is None else f"{value * 1e3:7.2f}"


def bench_line(name: str, path: Path) -> str:
    try:
        r = json.loads(path.read_text())["runs"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return f"bench {name}: no result ({type(exc).__name__}: {exc})"
    energy = "-" if r.get("j_per_token") is None else f"{r['j_per_token']:.4f}"
    return (f"bench {name:10s} {r['tokens_per_s']:8.1f} tok/s  prefill {_ms(r.get('prefill_s'))} ms  "
            f"decode {_ms(r.get('decode_s'))} ms a batch  {energy} J/token")


def phase_medians_s(events: Path) -> dict[str, float | None]:
    """The median measured ``prefill`` and ``decode`` of a batch of a cell's ``events.parquet``,
    in seconds, under those keys (None for a phase without events or without the file)."""
    if not events.exists():
        return {"prefill": None, "decode": None}
    ev = pd.read_parquet(events, columns=["phase", "start_ns", "end_ns"])
    took = (ev["end_ns"] - ev["start_ns"]) / 1e9
    return {p: (float(took[ev["phase"] == p].median()) if (ev["phase"] == p).any() else None)
            for p in ("prefill", "decode")}


def cell_lines(results: Path) -> list[str]:
    lines = []
    for events in sorted(results.glob("cells/*/events.parquet")):
        med = phase_medians_s(events)
        metrics = events.with_name("metrics.parquet")
        m = pd.read_parquet(metrics) if metrics.exists() else pd.DataFrame()
        tps = f"{float(m['tokens_per_s'].median()):8.1f}" if "tokens_per_s" in m else "       -"
        jpt = f"{float(m['j_per_token'].median()):.4f}" if "j_per_token" in m else "-"
        lines.append(f"{results.name} {events.parent.name}: {tps} tok/s  prefill {_ms(med['prefill'])} ms  "
                     f"decode {_ms(med['decode'])} ms a batch  {jpt} J/token")
    return lines or [f"{results}: no cells with events"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", nargs="*", default=[], metavar="NAME=JSON", help="bench/engines.py outputs")
    p.add_argument("--cells", nargs="*", default=[], type=Path, metavar="DIR", help="run-group output dirs")
    args = p.parse_args()
    for item in args.bench:
        name, _, path = item.partition("=")
        log.info("%s", bench_line(name, Path(path)))
    for results in args.cells:
        for line in cell_lines(results):
            log.info("%s", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
