"""Figures of the summary: PNG + SVG per figure, never an empty plot, and their manifest.

The builders live in :mod:`llmenergy.analysis.figures` (data selection in
:mod:`~llmenergy.analysis.figdata`, drawing in :mod:`~llmenergy.analysis.figdraw`).
Each returns a matplotlib ``Figure`` (no pyplot, no global state) and a caption,
or raises :class:`FigureSkipped` with the reason. A point is the mean over the
``ok`` repeats of one cell, every axis not plotted held fixed (the caption says
at which values); error bars are the 95 % Student-t interval over those repeats,
as in the report's table. Every title names the power source of the plotted rows
(``power: nvml``, ``power: estimate (ESTIMATE)``...).
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from llmenergy.analysis.figdata import CONFIG_KEYS, FigureSkipped, figure_data, power_label
from llmenergy.analysis.figpareto import fig_pareto, pareto_front
from llmenergy.analysis.figures import BUILDERS, FAMILIES, fig_power_cap
from llmenergy.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

__all__ = ["BUILDERS", "CONFIG_KEYS", "FAMILIES", "FigureInfo", "FigureSkipped", "fig_pareto",
           "default_workers", "fig_power_cap", "figure_power_source", "load_manifest", "make_figures",
           "pareto_front", "power_label"]
MANIFEST = "index.json"


@dataclass
class FigureInfo:
    name: str
    caption: str
    png: Path | None = None
    svg: Path | None = None
    skipped: bool = False
    reason: str | None = None
    power_source: str | None = None
    #: the cells whose rows the figure draws, those drawn hollow (flagged), and a key table
    cells: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    #: the SHA-256 of the summary file drawn (None: drawn from a frame, or an older manifest)
    summary_sha256: str | None = None


def figure_power_source(fig: Figure) -> str | None:
    """The ``power: ...`` text of a figure's titles, e.g. ``nvml`` or ``estimate (ESTIMATE)``."""
    titles = [ax.get_title() for ax in fig.axes]
    suptitle = getattr(fig, "_suptitle", None)  # Figure.get_suptitle() needs matplotlib >= 3.8
    if suptitle is not None:
        titles.append(suptitle.get_text())
    for title in titles:
        if "power: " in title:
            return title.split("power: ", 1)[1].rstrip(")").replace(" (ESTIMATE", " (ESTIMATE)")
    return None


def _save(fig: Figure, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)


def _draw(summary: pd.DataFrame, outdir: Path, name: str) -> FigureInfo:
    """One figure of :data:`BUILDERS` into ``outdir`` (PNG + SVG), or why it is skipped."""
    try:
        fig, caption = BUILDERS[name](summary)
    except FigureSkipped as exc:
        log.info("figure %s skipped: %s", name, exc)
        return FigureInfo(name, caption="", skipped=True, reason=str(exc))
    png, svg = outdir / f"{name}.png", outdir / f"{name}.svg"
    _save(fig, png, "png")
    _save(fig, svg, "svg")
    data = figure_data(fig)
    return FigureInfo(name, caption, png, svg, power_source=figure_power_source(fig),
                      cells=data.cells, flagged=data.flagged, table=data.table)


def default_workers() -> int:
    """The CPUs this process may use (Slurm's or taskset's allocation, not the node's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def make_figures(summary: pd.DataFrame, outdir: Path, *, workers: int = 1,
                 summary_sha256: str | None = None) -> list[FigureInfo]:
    """Draw every figure of :data:`BUILDERS` into ``outdir`` (PNG + SVG) and write ``index.json``,
    each entry naming the summary file drawn (``summary_sha256``: the report redraws otherwise).

    With ``workers`` > 1 the figures are drawn by that many forked processes (matplotlib
    renders under the GIL, so threads would not help); the manifest keeps
    :data:`BUILDERS`' order either way."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = list(BUILDERS)
    draw = functools.partial(_draw, summary, outdir)
    workers = min(workers, len(names))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the children start with matplotlib, seaborn and the summary already loaded
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            infos = list(pool.map(draw, names))
    else:
        infos = [draw(name) for name in names]
    for info in infos:
        info.summary_sha256 = summary_sha256
    write_json(outdir / MANIFEST, [asdict(i) for i in infos])
    return infos


def load_manifest(outdir: Path) -> list[FigureInfo] | None:
    import json

    path = Path(outdir) / MANIFEST
    if not path.exists():
        return None
    try:
        items = json.loads(path.read_text())
        return [FigureInfo(**{**i, "png": Path(i["png"]) if i.get("png") else None,
                              "svg": Path(i["svg"]) if i.get("svg") else None}) for i in items]
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable figure manifest (%s): figures will be redrawn", path, exc)
        return None
