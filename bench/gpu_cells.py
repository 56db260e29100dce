"""Run cells through `llmenergy run-cell` on a GPU machine and summarise them.

    python bench/gpu_cells.py --config bench/configs/h100x1.yaml --out OUT.json
    python bench/gpu_cells.py --config ... --overhead CELL_ID --runs 3 --out OUT.json

The summary per cell: load time, tokens/s, J/token, energy per second (all GPUs),
idle power, and the decode-phase agreement of the energy counter with the
integral of instant power. `--overhead` runs one cell alternately with the
collector off (backend none) and on (the config's backend) and reports the
median tokens/s of each (rounds alternate the order: off-on, on-off, ...). Read-only on the GPU: it never changes a setting.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from llmenergy import entrypoints

log = logging.getLogger("bench.gpu_cells")


def run_cell(config: Path, cell_id: str) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", entrypoints.CLI, "run-cell", "--force", "--config", str(config),
                           "--cell", cell_id], check=False)
    if proc.returncode:
        raise SystemExit(f"{cell_id}: run-cell exited {proc.returncode}")
    return time.monotonic() - t0


def summarise(cell_dir: Path) -> dict[str, Any]:
    from llmenergy.analysis.energy import attribute_events

    m = pd.read_parquet(cell_dir / "metrics.parquet")
    cell = json.loads((cell_dir / "cell.json").read_text())
    events = pd.read_parquet(cell_dir / "events.parquet")
    power = pd.read_parquet(cell_dir / "power.parquet") if (cell_dir / "power.parquet").exists() else None
    att = attribute_events(events, power)
    decode = att[att.phase == "decode"]
    load = att[att.phase == "load"]
    row = m.iloc[0]
    return {
        "cell_id": cell["cell_id"], "status": cell["status"], "gpus": cell["provenance"].get("gpus"),
        "load_s": float(load.duration_s.iloc[0]) if len(load) else None,
        "tokens_per_s": float(m.tokens_per_s.median()), "words_per_s": float(m.words_per_s.median()),
        "j_per_token": float(m.j_per_token.median()), "j_per_word": float(m.j_per_word.median()),
        "energy_per_second_w": float(m.avg_power_w.median()), "idle_power_w": float(row.idle_power_w),
        "n_devices": int(row.n_devices), "power_source": row.power_source,
        "decode_windows": len(decode),
        "decode_window_s_median": float(decode.duration_s.median()) if len(decode) else None,
        "decode_discrepancy_pct_median": float(decode.energy_discrepancy_pct.abs().median()) if len(decode) else None,
        "decode_discrepancy_pct_max": float(decode.energy_discrepancy_pct.abs().max()) if len(decode) else None,
        "decode_j_per_token": float(decode.energy_j.sum() / max(1, decode.tokens_out.sum())) if len(decode) else None,
        "decode_s": float(decode.duration_s.sum()),
        "decode_energy_j": float(decode.energy_j.sum()),
        "decode_energy_instant_j": float(decode.energy_instant_j.sum()),
        "decode_phase_discrepancy_pct": (float(100 * (decode.energy_instant_j.sum() - decode.energy_j.sum())
                                               / decode.energy_j.sum()) if len(decode) else None),
        "power_samples": int(len(power)) if power is not None else 0,
    }


def overhead(config: Path, cell_id: str, runs: int, tmp: Path) -> dict[str, Any]:
    base = yaml.safe_load(config.read_text())
    out: dict[str, list[float]] = {"none": [], base.get("collector", {}).get("backend", "auto"): []}
    for i in range(runs):
        order = list(out) if i % 2 == 0 else list(reversed(out))  # ABBA: drift favours neither side
        for backend in order:
            cfg = {**base, "collector": {**base.get("collector", {}), "backend": backend}}
            path = tmp / f"overhead-{backend}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            run_cell(path, cell_id)
            m = pd.read_parquet(Path(cfg.get("output_dir", "results")) / "cells" / cell_id / "metrics.parquet")
            out[backend].append(float(m.tokens_per_s.median()))
            log.info("overhead run %d %s: %.1f tok/s", i, backend, out[backend][-1])
    med = {k: statistics.median(v) for k, v in out.items()}
    off, on = med["none"], [v for k, v in med.items() if k != "none"][0]
    return {"runs": out, "median_tokens_per_s": med, "overhead_pct": (off - on) / off * 100}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--cells", nargs="*", default=None)
    p.add_argument("--overhead", default=None, help="cell id to run with the collector off and on")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from llmenergy import config as cfgmod
    from llmenergy.planning.matrix import expand

    cfg = cfgmod.load(args.config)
    result: dict[str, Any] = {"config": args.config.name, "cells": []}
    if args.overhead:
        result["overhead"] = overhead(args.config, args.overhead, args.runs, args.out.parent)
    else:
        ids = args.cells or [c.id for c in expand(cfg).cells]
        for cid in ids:
            wall = run_cell(args.config, cid)
            summary = summarise(Path(cfg.output_dir) / "cells" / cid)
            summary["wall_s"] = wall
            result["cells"].append(summary)
            log.info("%s", json.dumps(summary))
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
