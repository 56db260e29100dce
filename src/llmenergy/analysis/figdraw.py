"""Drawing: one metric against one axis, a line per hue value, a panel per facet.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state);
seaborn draws the lines, with the 95 % Student-t interval of
:func:`llmenergy.analysis.figdata.t_interval` as error bars. An axis over powers
of two is log 2 with its ticks at the measured values; a y axis whose points span
more than a decade is log 10.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
)

from llmenergy.analysis.figdata import (
    AXIS_NAMES,
    CI_TEXT,
    FigureSkipped,
    Held,
    fmt_number,
    fmt_value,
    hold_fixed,
    n_text,
    power_label,
    t_interval,
)

log = logging.getLogger(__name__)

PALETTE = "colorblind"
STYLE = "whitegrid"


@dataclass(frozen=True)
class LineSpec:
    """A figure of ``y`` against ``x``, one line per ``hue`` value, one panel per facet."""

    y: str
    ylabel: str
    x: str
    hue: str
    title: str
    what: str
    facets: tuple[str, ...] = ("model", "gpu")
    hue_label: str | None = None
    min_hues: int = 1


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def powers_of_two(values: Sequence[float]) -> bool:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return len(set(vals)) >= 2 and all(
        v > 0 and v.is_integer() and int(v) & (int(v) - 1) == 0 for v in vals)


def set_x_ticks(ax: Axes, values: Sequence[float]) -> None:
    """Ticks at the measured values; log 2 when they are powers of two."""
    vals = sorted({float(v) for v in values})
    if powers_of_two(vals):
        ax.set_xscale("log", base=2)
        pad = 2 ** 0.3
        ax.set_xlim(vals[0] / pad, vals[-1] * pad)
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_number(v)))
    ax.xaxis.set_minor_locator(NullLocator())


def set_y_scale(ax: Axes, values: Sequence[float]) -> None:
    """Log 10 when the positive values span more than a decade; plain numbers on ticks."""
    vals = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 10:
        ax.set_yscale("log")
        # labels at 1-2-5 steps unless the span is wide, so a short log axis shows more than one number
        subs = (1.0, 2.0, 5.0) if vals.max() / vals.min() < 1000 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif len(vals) and vals.min() >= 0 and ax.get_ylim()[0] < 0:
        # energy, rates and times cannot be negative: a wide interval (few repeats) is cut at 0
        ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_number(v)))


def new_figure(n_panels: int, *, ncols: int, width: float = 3.8, height: float = 3.0,
               sharey: bool = False) -> tuple[Figure, list[Axes]]:
    nrows = max(1, math.ceil(n_panels / ncols))
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(max(width * ncols + 1.6, 9.0), height * nrows + 0.9),
                     layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    return fig, axes[:n_panels]


def draw_lines(ax: Axes, data: pd.DataFrame, x: str, y: str, hue: str,
               colours: dict[str, tuple[float, float, float]],
               dashes: dict[str, tuple[float, ...]] | None = None, style: str | None = None) -> None:
    """One seaborn line per ``hue`` (and ``style``) value; the mean line carries the label."""
    keys = [hue] + ([style] if style else [])
    for key, grp in data.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        before = len(ax.get_lines())
        sns.lineplot(data=grp, x=x, y=y, color=colours[key[0]], estimator="mean",
                     errorbar=t_interval, err_style="bars", marker="o", ax=ax, legend=False,
                     err_kws={"capsize": 3, "elinewidth": 1},
                     dashes=False, linestyle=(dashes or {}).get(key[-1], "-") if style else "-")
        ax.get_lines()[before].set_label(" / ".join(str(k) for k in key))


def mean_lines(ax: Axes) -> list[Line2D]:
    """The plotted mean lines of an axes (not error-bar parts), labelled by hue value."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def hue_legend(fig: Figure, colours: dict[str, tuple[float, float, float]], title: str,
               extra: list[Line2D] | None = None) -> None:
    handles = [Line2D([], [], color=c, marker="o", label=k) for k, c in colours.items()]
    fig.legend(handles=handles + (extra or []), title=title, loc="outside right center",
               fontsize="small")


def facet_title(held: Held, key: tuple) -> str:
    note = held.panel_note(key)
    return " · ".join(map(str, key)) + (f"\n({note})" if note else "")


def line_figure(df: pd.DataFrame, spec: LineSpec) -> tuple[Figure, str]:
    """The figure of ``spec`` and its caption (axes held fixed, what the bars are)."""
    held = hold_fixed(df, spec.facets, spec.x, spec.hue)
    rows = held.rows
    hue_name = spec.hue_label or AXIS_NAMES.get(spec.hue, spec.hue)
    hue_values = sorted(rows[spec.hue].dropna().unique().tolist())
    if len(hue_values) < spec.min_hues:
        shown = ", ".join(fmt_value(spec.hue, v) for v in hue_values) or "none"
        raise FigureSkipped(f"only one {hue_name} in the data ({shown}): nothing to compare")
    facets = [f for f in spec.facets if f in rows.columns]
    groups = list(rows.groupby(facets, sort=True)) if facets else [((), rows)]
    groups = [((k if isinstance(k, tuple) else (k,)), g) for k, g in groups]
    groups = [(k, g) for k, g in groups if g[spec.x].nunique() >= 2]
    if not groups:
        raise FigureSkipped(f"no panel has two or more values of {AXIS_NAMES.get(spec.x, spec.x)} "
                            "once the other axes are held fixed")
    labels = {v: fmt_value(spec.hue, v) for v in hue_values}
    pal = sns.color_palette(PALETTE, len(hue_values))
    colours = {labels[v]: tuple(pal[i]) for i, v in enumerate(hue_values)}
    ncols = (rows[facets[-1]].nunique() if len(facets) == 2 else min(len(groups), 3))
    ncols = max(1, min(int(ncols), 4, len(groups)))
    fig, axes = new_figure(len(groups), ncols=ncols)
    counts: list[int] = []
    for ax, (key, grp) in zip(axes, groups, strict=True):
        data = grp.assign(_hue=grp[spec.hue].map(labels))
        draw_lines(ax, data, spec.x, spec.y, "_hue", colours)
        set_x_ticks(ax, data[spec.x].unique())
        means = data.groupby(["_hue", spec.x])[spec.y].mean()
        set_y_scale(ax, means.to_numpy())
        counts += data.groupby(["_hue", spec.x])[spec.y].count().tolist()
        ax.set_title(facet_title(held, key), fontsize="medium")
        ax.set_xlabel(upper_first(AXIS_NAMES.get(spec.x, spec.x)))
        ax.set_ylabel(spec.ylabel)
    hue_legend(fig, colours, upper_first(hue_name))
    fig.suptitle(f"{spec.title} ({power_label(rows)})")
    facet_text = " × ".join(AXIS_NAMES.get(f, f) for f in facets) or "all data"
    caption = (f"{spec.what} against {AXIS_NAMES.get(spec.x, spec.x)}, one line per "
               f"{hue_name}, one panel per {facet_text}. {held.caption()} Points: mean over the "
               f"ok repeats of one cell; bars: {CI_TEXT}, {n_text(counts)}.")
    return fig, caption
