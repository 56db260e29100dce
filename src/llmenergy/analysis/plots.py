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

import logging
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from llmenergy.analysis.figdata import CONFIG_KEYS, FigureSkipped, figure_data, power_label
from llmenergy.analysis.figpareto import fig_pareto, pareto_front
from llmenergy.analysis.figures import BUILDERS, FAMILIES, fig_power_cap
from llmenergy.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

__all__ = ["BUILDERS", "CONFIG_KEYS", "FAMILIES", "FigureInfo", "FigureSkipped", "fig_pareto",
           "fig_power_cap", "figure_power_source", "load_manifest", "make_figures",
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
        fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")


def make_figures(summary: pd.DataFrame, outdir: Path) -> list[FigureInfo]:
    """Draw every figure of :data:`BUILDERS` into ``outdir`` (PNG + SVG) and write ``index.json``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    infos: list[FigureInfo] = []
    for name, build in BUILDERS.items():
        try:
            fig, caption = build(summary)
        except FigureSkipped as exc:
            log.info("figure %s skipped: %s", name, exc)
            infos.append(FigureInfo(name, caption="", skipped=True, reason=str(exc)))
            continue
        png, svg = outdir / f"{name}.png", outdir / f"{name}.svg"
        _save(fig, png, "png")
        _save(fig, svg, "svg")
        source = figure_power_source(fig)
        data = figure_data(fig)
        infos.append(FigureInfo(name, caption, png, svg, power_source=source, cells=data.cells,
                                flagged=data.flagged, table=data.table))
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
