"""Shared set-up of the orchestrate tests: the demo config in a temporary folder, and the
failed record of a cell that ran out of its Slurm time."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from llmenergy.cellfiles import Cell, CellRecord

REPO = Path(__file__).resolve().parents[2]


def demo_config(tmp: Path, **over: object) -> dict:
    """``profiles/local/demo-config.yaml`` writing under ``tmp/results``, with ``over`` set."""
    data = yaml.safe_load((REPO / "profiles/local/demo-config.yaml").read_text())
    data["output_dir"] = str(tmp / "results")
    data.update(over)
    return data


def write_timed_out(output_dir: Path, cell: Cell, time_limit_min: int) -> Path:
    """``failed/{cell}.json`` of ``cell`` interrupted by Slurm at the end of a ``--time`` of
    ``time_limit_min`` (status ``incomplete``, as the launcher records a SIGTERM)."""
    path = output_dir / "failed" / f"{cell.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    CellRecord(cell=cell, status="incomplete", reason="interrupted by signal 15", repeats=1,
               launcher="srun").write(path)
    data = json.loads(path.read_text())
    data["provenance"]["slurm_time_limit_min"] = time_limit_min
    path.write_text(json.dumps(data))
    return path
