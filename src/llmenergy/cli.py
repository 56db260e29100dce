"""The ``llmenergy`` command.

User errors print one line and exit 2 (no traceback); see :mod:`llmenergy.errors`
for the other exit codes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llmenergy import __version__, entrypoints
from llmenergy.errors import LLMEnergyError, UserError

log = logging.getLogger("llmenergy")


def _load(args: argparse.Namespace, check_files: bool = True):  # noqa: ANN202
    from llmenergy import config

    return config.load(args.config, check_files=check_files)


def cmd_plan(args: argparse.Namespace) -> int:
    from llmenergy.orchestrate.smk import changed_cell_ids
    from llmenergy.planning.groups import resolve_packing
    from llmenergy.planning.plan import format_plan

    cfg = _load(args)
    packing = args.packing or resolve_packing(cfg)
    sys.stdout.write(format_plan(cfg, show_infeasible=not args.hide_infeasible, fmt=args.format,
                                 all_left_out=args.all, packing=packing, cells=args.cells,
                                 changed=changed_cell_ids(cfg, packing)))
    return 0


def cmd_run_cell(args: argparse.Namespace) -> int:
    from llmenergy.orchestrate.launch import run_cell
    from llmenergy.planning.matrix import expand

    cfg = _load(args)
    cell = expand(cfg).get(args.cell)
    return run_cell(cfg, cell, launcher=args.launcher, force=args.force)


def cmd_run_group(args: argparse.Namespace) -> int:
    from llmenergy.orchestrate.launch import run_group
    from llmenergy.planning.groups import find_group
    from llmenergy.planning.matrix import expand

    cfg = _load(args)
    return run_group(cfg, find_group(cfg, expand(cfg).cells, args.group), launcher=args.launcher,
                     force=args.force)


def _results_dir(args: argparse.Namespace) -> Path:
    """``--results``; unset: the ``--config``'s ``output_dir``, else ``results``."""
    if args.results:
        return Path(args.results)
    if args.config:
        return Path(_load(args, check_files=False).output_dir)
    return Path("results")


def cmd_aggregate(args: argparse.Namespace) -> int:
    from llmenergy.analysis.aggregate import aggregate

    expected = None
    grid = None
    if args.config:
        from llmenergy.planning.matrix import expand

        cfg = _load(args, check_files=False)
        expected = [c.identity() for c in expand(cfg).cells]
        grid = cfg.grid_gco2_per_kwh
    res = aggregate(_results_dir(args), grid_gco2_per_kwh=grid, expected_cells=expected)
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(res.status_counts.items()))
    log.info("aggregated %d cells (%d rows; statuses: %s) into %s and %s; %d unreadable "
             "metrics file(s)%s", res.n_cells, res.n_rows, statuses or "none", res.summary_path,
             res.stats_path, len(res.problems),
             f", listed in {res.problems_path}" if res.problems else "")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from llmenergy.analysis.aggregate import read_summary
    from llmenergy.analysis.plots import default_workers, make_figures
    from llmenergy.layout import RunLayout

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: draw at least one figure at a time")
    layout = RunLayout(_results_dir(args))
    path = Path(args.summary) if args.summary else layout.summary
    if not path.is_file():
        raise UserError(f"{path}: no summary; run `llmenergy aggregate` first")
    try:
        summary, digest = read_summary(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable summary parquet ({exc})") from exc
    out = Path(args.out) if args.out else layout.figures
    figs = make_figures(summary, out, workers=args.jobs or default_workers(), summary_sha256=digest)
    for f in figs:
        if f.skipped:
            log.info("figure %s skipped: %s", f.name, f.reason)
        else:
            log.info("figure %s: %s", f.name, f.png)
    log.info("%d figure(s) drawn, %d skipped, in %s", sum(not f.skipped for f in figs),
             sum(f.skipped for f in figs), out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmenergy.analysis.report import render_report

    extra = _planned_notes(args) if args.config else None
    out = render_report(_results_dir(args), out_path=Path(args.out) if args.out else None,
                        extra=extra)
    log.info("report: %s", out)
    return 0


def _planned_notes(args: argparse.Namespace) -> dict[str, str]:
    """Notes for the report: the config's planned cells that the summary does not hold."""
    import pandas as pd

    from llmenergy.analysis.aggregate import SUMMARY_NAME
    from llmenergy.planning.matrix import expand

    cfg = _load(args, check_files=False)
    planned = [c.id for c in expand(cfg).cells]
    path = _results_dir(args) / SUMMARY_NAME
    have: set[str] = set()
    if path.is_file():
        have = set(pd.read_parquet(path, columns=["cell_id"])["cell_id"].astype(str))
    absent = [c for c in planned if c not in have]
    shown = ", ".join(absent[:20]) + (f" … (+{len(absent) - 20} more)" if len(absent) > 20 else "")
    return {"config": str(args.config), "planned cells": str(len(planned)),
            "planned cells not in the summary": (f"{len(absent)}: {shown} (run `llmenergy "
                                                 "aggregate --config` to list them as missing)"
                                                 if absent else "none")}


# Subcommands whose own module parses the arguments (argparse cannot pass options through).
DELEGATES = {
    "collect": (entrypoints.COLLECTOR, "per-node power collector (started by run-cell)"),
    "powercap-guard": (entrypoints.POWERCAP_GUARD, "per-node power-cap guard (started by run-cell)"),
    "submit": (entrypoints.SUBMIT, "submit cells through submitit, without Snakemake"),
    "data": (entrypoints.DATA_FETCH, "datasets: `data fetch alpaca|gsm8k --dest data/`"),
}


DATA_USAGE = ("usage: llmenergy data fetch alpaca|gsm8k [--dest DIR] [--force] [--mirror URL]\n\n"
              "Download a real dataset and print its config entry "
              "(`llmenergy data fetch --help` for the options).\n")
GLOBAL_FLAGS = ("-v", "--verbose")


def _delegate(name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(DELEGATES[name][0])
    if name == "data":
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(DATA_USAGE)
            return 0
        if not argv or argv[0] != "fetch":
            sys.stderr.write(DATA_USAGE)
            return 2
        argv = argv[1:]
    return int(module.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmenergy", description="Measure the energy cost of LLM inference.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plan", help="the plan on one screen: totals, GPU energy, jobs, left-out reasons (--cells: every cell)")
    s.add_argument("--config", default="config.yaml", help="experiment config (default: config.yaml)")
    s.add_argument("--hide-infeasible", action="store_true",
                   help="leave out the cells that cannot run (and their reasons)")
    s.add_argument("--all", action="store_true",
                   help="list every left-out cell with its reason, not one line per reason")
    s.add_argument("--cells", action="store_true",
                   help="add one line per cell (nodes×GPUs, partition, cap, estimate, GPU-hours, host "
                        "memory) to the table; without it the plan fits a screen")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table (default) for reading; csv/json with every cell's axes")
    s.add_argument("--packing", choices=["group", "cell"], default=None,
                   help="show one Slurm job per group of cells sharing a model load, or per cell "
                        "(default: the config's `packing`, else group, as every route runs it)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run-cell", help="run one cell (what each Slurm job runs)")
    s.add_argument("--config", default="config.yaml", help="experiment config (default: config.yaml)")
    s.add_argument("--cell", required=True, help="cell id, as shown by `llmenergy plan`")
    s.add_argument("--launcher", choices=["auto", "local", "srun"], default="auto",
                   help="how to start the ranks: srun inside a Slurm job, local processes, "
                        "or auto (default)")
    s.add_argument("--force", action="store_true", help="rerun even if the cell already finished")
    s.set_defaults(func=cmd_run_cell)

    s = sub.add_parser("run-group", help="run a packed group of cells, the model loaded once (one Slurm job)")
    s.add_argument("--config", default="config.yaml", help="experiment config (default: config.yaml)")
    s.add_argument("--group", required=True, help="group or part id, as shown by `llmenergy plan`")
    s.add_argument("--launcher", choices=["auto", "local", "srun"], default="auto",
                   help="how to start the ranks: srun inside a Slurm job, local processes, or auto (default)")
    s.add_argument("--force", action="store_true", help="rerun the group's cells even if finished")
    s.set_defaults(func=cmd_run_group)

    s = sub.add_parser("aggregate", help="cells' metrics -> summary.parquet + summary_stats.parquet")
    s.add_argument("--results", default=None,
                   help="output directory (default: the --config's output_dir, else results)")
    s.add_argument("--config", default=None,
                   help="config whose planned cells without results become `missing` rows, "
                        "and whose grid carbon intensity fills gco2e")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("plot", help="figures from summary.parquet")
    s.add_argument("--results", default=None,
                   help="output directory holding summary.parquet (default: the --config's output_dir, "
                        "else results)")
    s.add_argument("--config", default=None, help="config whose output_dir is the output directory")
    s.add_argument("--summary", default=None,
                   help="summary written by `llmenergy aggregate` (default: RESULTS/summary.parquet)")
    s.add_argument("--out", default=None,
                   help="directory for the PNG/SVG figures and index.json (default: RESULTS/figures)")
    s.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="figures drawn at once, each in its own process (default: the CPUs this "
                        "process may use)")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("report", help="self-contained HTML report")
    s.add_argument("--results", default=None,
                   help="output directory holding summary.parquet (default: the --config's output_dir, "
                        "else results)")
    s.add_argument("--config", default=None,
                   help="config whose planned cells missing from the summary the report notes")
    s.add_argument("--out", default=None, help="HTML file (default: RESULTS/report.html)")
    s.set_defaults(func=cmd_report)

    for name, (_, text) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    n_global = 0
    while n_global < len(argv) and argv[n_global] in GLOBAL_FLAGS:
        n_global += 1
    delegated = argv[n_global] if n_global < len(argv) and argv[n_global] in DELEGATES else None
    if delegated is None:
        args = parser.parse_args(argv)
    else:
        args = argparse.Namespace(verbose=n_global > 0)
        argv = argv[n_global:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _delegate(delegated, argv[1:]) if delegated else args.func(args)
    except UserError as exc:
        sys.stderr.write("".join(f"llmenergy: error: {line}\n" for line in str(exc).splitlines()))
        return exc.exit_code
    except LLMEnergyError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
