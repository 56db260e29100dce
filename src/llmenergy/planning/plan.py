"""`llmenergy plan`: the cells of a config with their Slurm request and cost.

The table fits a screen (at most :data:`MAX_LINES` lines of :data:`WIDTH`
columns): totals, including the GPU energy estimate of
:mod:`llmenergy.planning.energy`, then one line per Slurm job group (or, when
they do not fit, per model × GPU × engine), then the left-out cells, one line per
reason. ``cells=True`` (``--cells``) adds one line per cell and an example cell
per reason; ``all_left_out`` lists each left-out cell. JSON and CSV carry every identity field
of a cell (model, dataset, gpu, shards, batch_size, max_gen_len, power_cap_w,
engine) with its request and estimate, including ``mem_mb_per_node`` (the host
memory the job asks for, :func:`~llmenergy.planning.matrix.host_mem_mb`) and its
source.  Under the totals, a note per model whose checkpoint is resharded at load
(``models.llama-65b: Meta checkpoint of MP 8, resharded to 4 at load``); JSON has
them as ``notes``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from llmenergy.arch import engine_switches
from llmenergy.cellfiles import AXES
from llmenergy.config import Config
from llmenergy.planning import jobs
from llmenergy.planning.energy import estimate_energy
from llmenergy.planning.groups import DEFAULT_PACKING, group_id
from llmenergy.planning.matrix import (
    Cell,
    estimate_runtime_s,
    expand,
    host_mem_mb,
    layout,
)

IDENTITY = list(AXES)  # every matrix axis, in cell-id order
REQUEST = ["nodes", "gpus_per_node", "partition", "constraint", "mem_mb_per_node", "mem_mb_source",
           "est_runtime_min", "gpu_hours", "group_id"]
GROUP_TABLE = [  # (header, key, right-aligned)
    ("group (one Slurm job, one model load)", "group_id", False), ("cells", "n_cells", True),
    ("nodes×GPUs", "layout", True), ("partition", "partition", False), ("est. min", "est_runtime_min", True),
    ("--time min", "time_limit_min", True), ("GPU-h", "gpu_hours", True),
]
TABLE = [  # (header, key, right-aligned)
    ("cell", "cell_id", False), ("nodes×GPUs", "layout", True), ("partition", "partition", False),
    ("cap", "cap", True), ("est. min", "est_runtime_min", True), ("GPU-h", "gpu_hours", True),
    ("host mem", "host_mem", True),
]
SUMMARY_TABLE = [  # (header, key, right-aligned): per model × GPU × engine when the groups do not fit
    ("model", "model", False), ("GPU", "gpu", False), ("engine", "engine", False), ("cells", "n_cells", True),
    ("Slurm jobs", "n_jobs", True), ("nodes×GPUs", "layout", True), ("longest job min", "longest_min", True),
    ("GPU-h", "gpu_hours", True),
]
EXAMPLES = 2
WIDTH = 120
MAX_LINES = 60
_NEEDS = re.compile(r"needs (\d+) GB")


def _identity(cell: Cell) -> dict[str, Any]:
    ident = asdict(cell)
    return {"cell_id": cell.id, **{k: ident[k] for k in IDENTITY}}


def cap_text(cap: float | None) -> str:
    return "—" if cap is None else f"{cap:g} W"


def plan_rows(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(planned cells, left-out cells): identity fields plus request/estimate or reason."""
    p = expand(cfg)
    rows = []
    for cell in p.cells:
        gpu = cfg.gpus[cell.gpu]
        nodes, per_node = layout(cfg, cell)
        runtime_s = estimate_runtime_s(cfg, cell)
        mem_mb, mem_source = host_mem_mb(cfg, cell)
        rows.append({
            **_identity(cell), "nodes": nodes, "gpus_per_node": per_node,
            "partition": gpu.partition, "constraint": gpu.constraint or "",
            "mem_mb_per_node": mem_mb, "mem_mb_source": mem_source,
            "est_runtime_min": round(runtime_s / 60, 1),
            "gpu_hours": round(runtime_s / 3600 * cell.shards, 2), "group_id": group_id(cell),
        })
    left_out = [{**_identity(i.cell), "reason": i.reason} for i in p.infeasible]
    return rows, left_out


def checkpoint_notes(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """One line per model whose checkpoint is resharded at load for the planned cells:
    a Meta checkpoint of MP *m* run on *n* != *m* shards, an HF one (unsharded) on *n* > 1.
    The headers are read again (milliseconds); a checkpoint that does not pass
    :func:`llmenergy.checkpoints.inspect_checkpoint` gets no note (the config check
    reports it)."""
    from llmenergy.checkpoints import inspect_checkpoint
    from llmenergy.errors import CheckpointError

    notes = []
    for name, spec in cfg.models.items():
        shards = sorted({r["shards"] for r in rows if r["model"] == name})
        if spec.weights == "synthetic" or not shards:
            continue
        try:
            info = inspect_checkpoint(spec.weights, spec.args)
        except CheckpointError:
            continue
        other = [n for n in shards if n != info.mp]
        if not other:
            continue
        to = ", ".join(map(str, other))
        if info.format == "meta":
            notes.append(f"models.{name}: Meta checkpoint of MP {info.mp}, resharded to {to} at load")
        else:
            files = f"{len(info.files)} safetensors file{'s' if len(info.files) > 1 else ''}"
            notes.append(f"models.{name}: HF checkpoint ({files}, unsharded), split into {to} "
                         f"shards at load")
    return notes


def _mem_text(mb: int) -> str:
    return f"{mb / 1024:.1f}G"


def group_rows(cfg: Config, cells: list[Cell] | None = None,
               limits: jobs.PartitionLimits | None = None) -> list[dict[str, Any]]:
    """One row per group job: a group, or a part of one too long for its partition (``part``
    ``k/n``, id ``{group}.cells{first}-{last}``), with its cells, layout, estimate and ``--time``
    as the next run asks it (:func:`llmenergy.planning.jobs.job_request`: the unfinished cells,
    learned from finished ones). ``limits``: the partitions' (default: asked from Slurm)."""
    cells = expand(cfg).cells if cells is None else cells
    limits = jobs.partition_limits() if limits is None else limits
    history = jobs.read_history(cfg, cells)
    out = []
    for job in jobs.group_jobs(cfg, cells, limits):
        nodes, per_node = layout(cfg, job.first)
        runtime_s = jobs.runtime_s(cfg, job.cells)
        req = jobs.job_request(cfg, job.cells, history=history, max_time_min=job.max_time_min)
        out.append({"group_id": job.id, "n_cells": len(job.cells), "cells": [c.id for c in job.cells],
                    "nodes": nodes, "gpus_per_node": per_node, "partition": cfg.gpus[job.first.gpu].partition,
                    "est_runtime_min": round(runtime_s / 60, 1),
                    "time_limit_min": req.resources.time_limit_min,
                    "gpu_hours": round(runtime_s / 3600 * job.first.shards, 2),
                    "part": f"{job.part}/{job.parts}" if job.parts > 1 else "",
                    "max_time_min": job.max_time_min, "fits": job.fits(cfg)})
    return out


def progress(cfg: Config, rows: list[dict[str, Any]], changed: Iterable[str] = (),
             history: jobs.History | None = None) -> dict[str, Any]:
    """Where the planned cells stand in ``output_dir``: ``finished`` (accepted under the
    config's policies, ``finished_status`` counting each status), ``changed`` (finished under
    another definition: ``changed`` holds their ids, from the caller's fingerprint check,
    and they rerun), ``failed`` (by status: a last record not accepted), ``not_run``, and the
    estimated GPU-hours of the cells left to run. ``history``: the cells' records, if
    the caller has read them (else read here)."""
    history = jobs.read_history(cfg, expand(cfg).cells) if history is None else history
    stale = set(changed)
    done = Counter(h.status for cid, h in history.cells.items() if h.finished and cid not in stale)
    failed = Counter(h.status for h in history.cells.values() if not h.finished)
    left = [r for r in rows if not (history.finished_id(r["cell_id"]) and r["cell_id"] not in stale)]
    return {"output_dir": cfg.output_dir, "cells": len(rows), "finished": sum(done.values()),
            "finished_status": dict(done), "changed": len(stale & set(history.cells)),
            "failed": dict(failed), "not_run": len(rows) - len(history.cells),
            "to_run": len(left), "to_run_gpu_hours": round(sum(r["gpu_hours"] for r in left), 2)}


def progress_text(p: dict[str, Any]) -> list[str]:
    """The totals' ``results:`` line(s) of :func:`progress`."""
    out = p["output_dir"].rstrip("/") + "/"
    if p["to_run"] == p["cells"] and not p["failed"] and not p["changed"]:
        return [f"  results:    none yet in {out}"]
    recorded = [f"{n} {s}" for s, n in sorted(p["finished_status"].items()) if s != "ok"]
    text = (f"  results:    {p['finished']} of {p['cells']} finished in {out}"
            + (f" ({', '.join(recorded)}, as policies say)" if recorded else ""))
    if not p["to_run"]:
        return [text]
    parts = [f"{sum(p['failed'].values())} failed: "
             + ", ".join(f"{n} {s}" for s, n in sorted(p["failed"].items()))] if p["failed"] else []
    parts += [f"{p['changed']} changed since measured"] if p["changed"] else []
    parts += [f"{p['not_run']} not run"] if p["not_run"] else []
    rest = f"to run {p['to_run']} ({'; '.join(parts)}), {p['to_run_gpu_hours']:,.1f} GPU-h (estimate)"
    if len(text) + 2 + len(rest) <= WIDTH:
        return [f"{text}; {rest}"]
    return [text + ";", _fit(" " * 14 + rest)]


def _span(values: list[Any], spec: str) -> str:
    """``"1–12"``, or one number where all are the same (``"3.2"``, not ``"3.2–3.2"``)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def _totals(cfg: Config, rows: list[dict[str, Any]], left_out: list[dict[str, Any]],
            groups: list[dict[str, Any]] | None = None, done: dict[str, Any] | None = None) -> list[str]:
    gpu_h = sum(r["gpu_hours"] for r in rows)
    minutes = [r["est_runtime_min"] for r in rows]
    by_gpu = Counter(r["gpu"] for r in rows)
    reasons = len(group_reasons(left_out))
    lines = [
        f"Plan of {cfg.source}",
        f"  cells:      {len(rows)} planned ({', '.join(f'{g} {n}' for g, n in sorted(by_gpu.items()))}), "
        f"{cfg.repeats} repeat{'' if cfg.repeats == 1 else 's'} each, with the model loaded once per job",
        (f"  Slurm jobs: {len(rows)} (one per cell, packing: cell), "
         f"{_span(minutes, '.1f')} min each (estimate)") if groups is None else
        (f"  Slurm jobs: {len(groups)} (packing: group; {len(rows)} with packing: cell), one per group "
         f"of cells sharing\n              model, GPU, shards, engine, precision and cap, the model loaded once:"
         f"\n              {_span([g['n_cells'] for g in groups], 'd')} "
         f"cell{'' if max(g['n_cells'] for g in groups) == 1 else 's'}, "
         f"{_span([g['est_runtime_min'] for g in groups], '.1f')} min each (estimate)"),
        *_split_lines(groups or []),
        f"  GPU-hours:  {gpu_h:,.1f} in all (estimate)",
        _fit(f"  GPU energy: {estimate_energy(cfg, rows).text()}"),
        *(progress_text(done) if done is not None else []),
        f"  left out:   {len(left_out)} cells"
        + (f" for {reasons} reasons (listed at the end)" if left_out else ""),
    ]
    note = switches_note(r.get("engine") for r in rows)
    if note:
        lines.append(_fit(f"  switches:   {note}"))
    return lines


def switches_note(engines: Iterable[Any]) -> str | None:
    """The compiled engine's switches set in this environment (``arch.ENGINE_SWITCHES``),
    when a planned cell runs that engine: they are part of its definition, so a stray one
    in a shell changes what is measured (and reruns finished cells)."""
    switches = engine_switches()
    if not switches or "compiled" not in set(engines):
        return None
    return (" ".join(f"{k}={v}" for k, v in sorted(switches.items()))
            + " (set here: part of the compiled cells' definitions)")


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "…"


def _split_lines(groups: list[dict[str, Any]]) -> list[str]:
    """The totals' line on groups cut into parts (and cells longer than their partition)."""
    parts = [g for g in groups if g["part"]]
    long = [g["group_id"] for g in groups if not g["fits"]]
    out = []
    if parts:
        split = {g["group_id"].rsplit(".cells", 1)[0] for g in parts}
        out.append(f"  split:      {len(split)} group(s) too long for the partition run as {len(parts)} jobs "
                   f"group.cellsA-B (2× + 10 min fit)")
    if long:
        out.append(f"  too long:   {len(long)} one-cell job(s) over the partition's limit ask for all of it: {long[0]}"
                   + (" …" if len(long) > 1 else ""))
    return out


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, bool]] = TABLE) -> list[str]:
    shown = [{**r, "layout": r.get("layout") or f"{r['nodes']}×{r['gpus_per_node']}",
              "host_mem": _mem_text(r["mem_mb_per_node"]) if "mem_mb_per_node" in r else "",
              "cap": cap_text(r.get("power_cap_w")),
              "est_runtime_min": f"{r['est_runtime_min']:.1f}" if "est_runtime_min" in r else "",
              "gpu_hours": f"{r['gpu_hours']:.2f}"} for r in rows]
    widths = {key: max(len(head), *(len(str(r[key])) for r in shown)) for head, key, _ in columns}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[k].rjust(widths[k]) if right else values[k].ljust(widths[k])
                         for _, k, right in columns).rstrip()

    out = [line({k: head for head, k, _ in columns})]
    out += [line({k: str(r[k]) for _, k, _ in columns}) for r in shown]
    return out


def group_reasons(left_out: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(reason, cell ids) per distinct reason, most cells first; memory reasons that differ
    only in the GB needed (batch size, generation length) share a line with the range."""
    groups: dict[str, tuple[list[int], list[str]]] = {}
    for r in left_out:
        key = _NEEDS.sub("needs {} GB", r["reason"])
        needs, ids = groups.setdefault(key, ([], []))
        needs += [int(m) for m in _NEEDS.findall(r["reason"])]
        ids.append(r["cell_id"])
    out = []
    for key, (needs, ids) in groups.items():
        span = "" if not needs else (f"{min(needs)}" if min(needs) == max(needs)
                                     else f"{min(needs)}–{max(needs)}")
        out.append((key.replace("{}", span), ids))
    return sorted(out, key=lambda kv: (-len(kv[1]), kv[0]))


def _summary_rows(rows: list[dict[str, Any]], groups: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per model × GPU × engine: cells, jobs, layouts, the longest job and GPU-hours."""
    jobs: dict[tuple[str, str, str], list[float]] = {}
    if groups is not None:
        by_id = {r["cell_id"]: r for r in rows}
        for g in groups:
            first = by_id[g["cells"][0]]
            jobs.setdefault((first["model"], first["gpu"], first["engine"]), []).append(g["est_runtime_min"])
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["gpu"], r["engine"])
        o = out.setdefault(key, {"model": key[0], "gpu": key[1], "engine": key[2], "n_cells": 0,
                                 "layouts": set(), "gpu_hours": 0.0, "cell_min": []})
        o["n_cells"] += 1
        o["layouts"].add((r["nodes"], r["gpus_per_node"]))
        o["gpu_hours"] += r["gpu_hours"]
        o["cell_min"].append(r["est_runtime_min"])
    table = []
    for key, o in out.items():
        minutes = jobs.get(key, o["cell_min"])
        small, large = min(o["layouts"]), max(o["layouts"])
        table.append({**o, "n_jobs": len(minutes), "longest_min": f"{max(minutes):.1f}",
                      "nodes": small[0], "gpus_per_node": small[1],
                      "layout_text": (f"{small[0]}×{small[1]}" if small == large else
                                      f"{small[0]}×{small[1]}–{large[0]}×{large[1]}")})
    return table


def _left_out(left_out: list[dict[str, Any]], every: bool, examples: bool = True,
              max_lines: int | None = None) -> list[str]:
    if every:
        return [f"{len(left_out)} cells left out:"] + [
            f"  {r['cell_id']}: {r['reason']}" for r in left_out]
    groups = group_reasons(left_out)
    hint = "--all lists every cell" + ("" if examples else ", --cells an example of each reason")
    out = [f"{len(left_out)} cells left out, {len(groups)} reasons ({hint}):"]
    width = len(str(max(len(ids) for _, ids in groups)))
    if max_lines is not None and len(groups) + 1 > max_lines:
        shown = max(max_lines - 2, 0)
        rest = groups[shown:]
        groups = groups[:shown]
    else:
        rest = []
    for reason, ids in groups:
        out.append(_fit(f"  {len(ids):>{width}} × {reason}"))
        if not examples:
            continue
        for k in range(min(EXAMPLES, len(ids)), 0, -1):
            more = f" (+{len(ids) - k} more)" if len(ids) > k else ""
            line = f"  {'':>{width}}   e.g. {', '.join(ids[:k])}{more}"
            if len(line) <= WIDTH or k == 1:
                out.append(line)
                break
    if rest:
        out.append(f"  … {len(rest)} more reasons ({sum(len(ids) for _, ids in rest)} cells): --all")
    return out


def format_plan(cfg: Config, *, show_infeasible: bool = True, fmt: str = "table",
                all_left_out: bool = False, packing: str = DEFAULT_PACKING, cells: bool = False,
                changed: Iterable[str] | None = None) -> str:
    """The plan as ``table`` (totals, groups when packed, left-out reasons; with ``cells``
    one line per cell too), ``json`` or ``csv`` (every cell, whatever ``cells``).
    ``changed``: the finished cells whose definition changed (the caller's fingerprint
    check); given, the totals say where the results stand (:func:`progress`)."""
    rows, left_out = plan_rows(cfg)
    done = progress(cfg, rows, changed) if changed is not None else None
    notes = checkpoint_notes(cfg, rows)
    groups = group_rows(cfg) if packing == "group" else None
    if fmt == "json":
        doc: dict[str, Any] = {"packing": packing, "cells": rows, "notes": notes}
        if done is not None:
            doc["progress"] = done
        if groups is not None:
            doc["groups"] = groups
        if show_infeasible:
            doc["left_out"] = left_out
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        fields = ["cell_id", *IDENTITY, *REQUEST, "planned", "reason"]
        w = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows({**r, "planned": "yes"} for r in rows)
        if show_infeasible:
            w.writerows({**r, "planned": "no"} for r in left_out)
        return buf.getvalue()
    lines = _totals(cfg, rows, left_out, groups, done)
    if notes:
        lines += ["  checkpoints:"] + [_fit(f"    {n}") for n in notes]
    lines += [""]
    if cells:
        if groups is not None:
            lines += _table(groups, GROUP_TABLE) + [""]
        lines += _table(rows)
        if show_infeasible and left_out:
            lines += [""] + _left_out(left_out, all_left_out)
        return "\n".join(lines) + "\n"
    footer = ["", "--cells: one line per cell (and an example of each left-out reason); "
                  "--format json|csv: every cell's fields"]
    reasons = len(group_reasons(left_out)) + 2 if show_infeasible and left_out else 0
    room = MAX_LINES - len(lines) - len(footer) - min(reasons, 12)
    if groups is not None and len(groups) + 1 <= room:
        lines += _table(groups, GROUP_TABLE)
    else:
        summary = _summary_rows(rows, groups)
        shown = summary if len(summary) + 1 <= room else summary[:max(room - 2, 0)]
        lines += _table([{**r, "layout": r["layout_text"]} for r in shown], SUMMARY_TABLE)
        if len(shown) < len(summary):
            lines.append(f"… {len(summary) - len(shown)} more model × GPU × engine rows: --cells")
    if show_infeasible and left_out:
        left = MAX_LINES - len(lines) - len(footer) - 1
        lines += [""] + _left_out(left_out, all_left_out, examples=False,
                                  max_lines=None if all_left_out else left)
    return "\n".join(lines + footer) + "\n"
