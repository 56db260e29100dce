"""`llmenergy plan`: the cells of a config with their Slurm request and cost."""
from __future__ import annotations

import csv
import io
import json
from typing import Any

from llmenergy.config import Config
from llmenergy.planning.matrix import estimate_runtime_s, expand, layout


def plan_rows(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    p = expand(cfg)
    rows = []
    for cell in p.cells:
        gpu = cfg.gpus[cell.gpu]
        nodes, per_node = layout(cfg, cell)
        runtime_s = estimate_runtime_s(cfg, cell)
        rows.append({
            "cell_id": cell.id, "nodes": nodes, "gpus": cell.shards, "gpus_per_node": per_node,
            "partition": gpu.partition, "constraint": gpu.constraint or "",
            "power_cap_w": cell.power_cap_w, "est_runtime_min": round(runtime_s / 60, 1),
            "gpu_hours": round(runtime_s / 3600 * cell.shards, 2),
        })
    left_out = [{"cell_id": i.cell.id, "reason": i.reason} for i in p.infeasible]
    return rows, left_out


def format_plan(cfg: Config, *, show_infeasible: bool = True, fmt: str = "table") -> str:
    rows, left_out = plan_rows(cfg)
    if fmt == "json":
        return json.dumps({"cells": rows, "left_out": left_out}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cols = ["cell_id", "nodes", "gpus", "gpus_per_node", "partition", "power_cap_w", "est_runtime_min", "gpu_hours"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    total_h = sum(r["gpu_hours"] for r in rows) * cfg.repeats / max(cfg.repeats, 1)
    lines.append(f"\n{len(rows)} cells × {cfg.repeats} repeats (run inside each cell's job); "
                 f"estimated {total_h:.1f} GPU-hours in all")
    if show_infeasible and left_out:
        lines.append(f"\n{len(left_out)} cells left out:")
        lines += [f"  {r['cell_id']}: {r['reason']}" for r in left_out]
    return "\n".join(lines) + "\n"
