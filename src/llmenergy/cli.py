"""The ``llmenergy`` command.

User errors print one line and exit 2 (no traceback); see :mod:`llmenergy.errors`
for the other exit codes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llmenergy import entrypoints
from llmenergy.errors import LLMEnergyError, UserError

log = logging.getLogger("llmenergy")


def _load(args: argparse.Namespace, check_files: bool = True):  # noqa: ANN202
    from llmenergy import config

    return config.load(args.config, check_files=check_files)


def cmd_plan(args: argparse.Namespace) -> int:
    from llmenergy.planning.plan import format_plan

    cfg = _load(args)
    sys.stdout.write(format_plan(cfg, show_infeasible=not args.hide_infeasible, fmt=args.format))
    return 0


def cmd_run_cell(args: argparse.Namespace) -> int:
    from llmenergy.orchestrate.launch import run_cell
    from llmenergy.planning.matrix import expand

    cfg = _load(args)
    cell = expand(cfg).get(args.cell)
    return run_cell(cfg, cell, launcher=args.launcher, force=args.force)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from llmenergy.analysis.aggregate import aggregate

    expected = None
    grid = None
    if args.config:
        from llmenergy.planning.matrix import expand

        cfg = _load(args, check_files=False)
        expected = [c.identity() for c in expand(cfg).cells]
        grid = cfg.grid_gco2_per_kwh
    result = aggregate(Path(args.results), grid_gco2_per_kwh=grid, expected_cells=expected)
    log.info("summary: %s", result)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import pandas as pd

    from llmenergy.analysis.plots import make_figures

    figs = make_figures(pd.read_parquet(args.summary), Path(args.out))
    for f in figs:
        log.info("figure %s%s", f.name, " (skipped: %s)" % f.reason if getattr(f, "skipped", False) else "")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmenergy.analysis.report import render_report

    out = render_report(Path(args.results), out_path=Path(args.out) if args.out else None)
    log.info("report: %s", out)
    return 0


# Subcommands whose own module parses the arguments (argparse cannot pass options through).
DELEGATES = {
    "collect": (entrypoints.COLLECTOR, "per-node power collector (started by run-cell)"),
    "powercap-guard": (entrypoints.POWERCAP_GUARD, "per-node power-cap guard (started by run-cell)"),
    "submit": (entrypoints.SUBMIT, "submit cells through submitit, without Snakemake"),
    "data": (entrypoints.DATA_FETCH, "datasets: `data fetch alpaca|gsm8k --dest data/`"),
}


def _delegate(name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(DELEGATES[name][0])
    if name == "data":
        if not argv or argv[0] != "fetch":
            sys.stderr.write("usage: llmenergy data fetch alpaca|gsm8k [--dest DIR]\n")
            return 2
        argv = argv[1:]
    return int(module.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmenergy", description="Measure the energy cost of LLM inference.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plan", help="table of cells: nodes, GPUs, partition, runtime, GPU-hours")
    s.add_argument("--config", default="config.yaml")
    s.add_argument("--hide-infeasible", action="store_true")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run-cell", help="run one cell (what each Slurm job runs)")
    s.add_argument("--config", default="config.yaml")
    s.add_argument("--cell", required=True, help="cell id, as shown by `llmenergy plan`")
    s.add_argument("--launcher", choices=["auto", "local", "srun"], default="auto")
    s.add_argument("--force", action="store_true", help="rerun even if the cell already finished")
    s.set_defaults(func=cmd_run_cell)

    s = sub.add_parser("aggregate", help="cells' metrics -> summary.parquet + summary_stats.parquet")
    s.add_argument("--results", default="results")
    s.add_argument("--config", default=None, help="to list planned cells that have no results")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("plot", help="figures from summary.parquet")
    s.add_argument("--summary", default="results/summary.parquet")
    s.add_argument("--out", default="results/figures")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("report", help="self-contained HTML report")
    s.add_argument("--results", default="results")
    s.add_argument("--config", default=None)
    s.add_argument("--out", default=None)
    s.set_defaults(func=cmd_report)

    for name, (_, text) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    delegated = argv[0] if argv and argv[0] in DELEGATES else None
    args = parser.parse_args(argv) if delegated is None else argparse.Namespace(verbose=False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _delegate(delegated, argv[1:]) if delegated else args.func(args)
    except UserError as exc:
        sys.stderr.write(f"llmenergy: error: {exc}\n")
        return exc.exit_code
    except LLMEnergyError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
