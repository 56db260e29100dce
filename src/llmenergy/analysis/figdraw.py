"""Drawing: one metric against one axis, a line per hue value, a panel per facet.

Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state);
seaborn draws the lines, with the 95 % Student-t interval of
:func:`llmenergy.analysis.figdata.t_interval` as error bars; a point with a
flagged repeat behind it is drawn hollow. An axis over powers
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
    AXES,
    AXIS_NAMES,
    CI_TEXT,
    FigureSkipped,
    sorted_values,
    attach,
    fmt_number,
    fmt_value,
    layout,
    matched,
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
    #: draw panels with one x value too (the figure that shows every cell of its family)
    keep_single: bool = False


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
    elif len(vals) == 1 and vals[0] > 0:  # the same margin as a log 2 axis, for dodged points
        ax.set_xlim(vals[0] / 2 ** 0.3, vals[0] * 2 ** 0.3)
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


HOLLOW_TEXT = "hollow marker: a flagged repeat (reason in the report's Flagged repeats table)"


#: How far apart along x (in octaves) :func:`draw_lines` sets neighbouring lines' points.
DODGE_OCTAVES = 0.06
DODGE_TEXT = ("Each line's points are set a little apart along the x axis, so that their bars can "
              "be told apart; the ticks mark the measured values.")


def draw_lines(ax: Axes, data: pd.DataFrame, x: str, y: str, hue: str,
               colours: dict[str, tuple[float, float, float]],
               dashes: dict[str, tuple[float, ...] | str] | None = None,
               style: str | None = None, dodge: bool = False) -> int:
    """One seaborn line per ``hue`` (and ``style``) value; the mean line carries the label.

    A point with a flagged repeat behind it (``_flagged``) is redrawn hollow; returns
    how many points are hollow. ``dodge``: each line's points a little apart along x
    (:data:`DODGE_OCTAVES` between neighbours, a factor, so a log 2 axis spaces them
    evenly; in the order of ``colours``), for figures that set lines side by side at the
    same x values.
    """
    keys = [hue] + ([style] if style else [])
    n_hollow = 0
    order = list(colours)  # the legend's: dodged left to right in it, the same in every panel
    for key, grp in data.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        if dodge:
            shift = order.index(key[0]) - (len(order) - 1) / 2
            grp = grp.assign(**{x: grp[x] * 2 ** (DODGE_OCTAVES * shift)})
        before = len(ax.get_lines())
        colour = colours[key[0]]
        sns.lineplot(data=grp, x=x, y=y, color=colour, estimator="mean",
                     errorbar=t_interval, err_style="bars", marker="o", ax=ax, legend=False,
                     err_kws={"capsize": 3, "elinewidth": 1},
                     dashes=False, linestyle=(dashes or {}).get(key[-1], "-") if style else "-")
        ax.get_lines()[before].set_label(" / ".join(str(k) for k in key))
        if "_flagged" in grp.columns and grp["_flagged"].any():
            pts = grp.groupby(x).agg(_m=(y, "mean"), _f=("_flagged", "any"))
            pts = pts[pts["_f"]]
            n_hollow += len(pts)
            ax.plot(pts.index.to_numpy(float), pts["_m"].to_numpy(float), linestyle="",
                    marker="o", markersize=7, markerfacecolor="white", markeredgecolor=colour,
                    markeredgewidth=1.6, zorder=5, label="_flagged")
    return n_hollow


def hue_legend(fig: Figure, colours: dict[str, tuple[float, float, float]], title: str,
               extra: list[Line2D] | None = None) -> None:
    handles = [Line2D([], [], color=c, marker="o", label=k) for k, c in colours.items()]
    handles += extra or []
    if handles:
        fig.legend(handles=handles, title=title or None, loc="outside right center",
                   fontsize="small")


def hollow_handle() -> Line2D:
    return Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="",
                  label="flagged repeat")


def line_figure(df: pd.DataFrame, spec: LineSpec) -> tuple[Figure, str]:
    """The figure of ``spec`` and its caption (what varies, what is constant, the bars)."""
    left_out = ""
    comparison = spec.min_hues >= 2 and spec.hue in AXES  # lines set side by side
    if comparison:  # only the settings measured at two or more of the hue's values
        hue_values = sorted_values(df[spec.hue])
        if len(hue_values) >= spec.min_hues:
            df, left_out = matched(df, spec.hue)
    # a hue that is no matrix axis (phase, energy kind) is always the figure's own
    lay = layout(df, spec.x, spec.hue, spec.facets,
                 hue_fixed=spec.min_hues >= 2 or spec.hue not in AXES)
    rows = lay.rows
    hue = lay.hue
    hue_name = spec.hue_label or (AXIS_NAMES.get(hue, hue) if hue else "")
    hue_values = sorted_values(rows[hue]) if hue else []
    if hue and len(hue_values) < spec.min_hues:
        shown = ", ".join(fmt_value(str(hue), v) for v in hue_values) or "none"
        raise FigureSkipped(f"only one {hue_name} in the data ({shown}): nothing to compare")
    if rows[spec.x].nunique() < 2 and not spec.keep_single:
        raise FigureSkipped(f"one {AXIS_NAMES.get(spec.x, spec.x)} measured "
                            f"({fmt_value(spec.x, rows[spec.x].iloc[0]) if len(rows) else 'none'})")
    panels = lay.panels()
    if not spec.keep_single:
        panels = [(k, g) for k, g in panels if g[spec.x].nunique() >= 2]
    if not panels:
        raise FigureSkipped(f"no panel has two or more values of {AXIS_NAMES.get(spec.x, spec.x)}"
                            " (every other axis that varies gets its own panel)")
    labels = {fmt_value(str(hue), v): v for v in hue_values} if hue else {"all": None}
    pal = sns.color_palette(PALETTE, len(labels))
    colours = {lab: tuple(pal[i]) for i, lab in enumerate(labels)}
    fig, axes = new_figure(len(panels), ncols=lay.ncols(len(panels)))
    counts: list[int] = []
    n_hollow = 0
    drawn = []
    for ax, (key, grp) in zip(axes, panels, strict=True):
        data = grp.assign(_hue=grp[hue].map(lambda v: fmt_value(str(hue), v)) if hue else "all")
        n_hollow += draw_lines(ax, data, spec.x, spec.y, "_hue", colours, dodge=comparison)
        drawn.append(data)
        set_x_ticks(ax, data[spec.x].unique())
        means = data.groupby(["_hue", spec.x])[spec.y].mean()
        set_y_scale(ax, means.to_numpy())
        if data[spec.x].nunique() == 1 and ax.get_yscale() == "linear" and means.min() >= 0:
            ax.set_ylim(bottom=0)  # one x value: no slope to read, show the magnitude
        counts += data.groupby(["_hue", spec.x])[spec.y].count().tolist()
        ax.set_title(lay.panel_title(key), fontsize="medium")
        ax.set_xlabel(upper_first(AXIS_NAMES.get(spec.x, spec.x)))
        ax.set_ylabel(spec.ylabel)
    extra = [hollow_handle()] if n_hollow else []
    hue_legend(fig, colours if hue else {}, upper_first(hue_name), extra)
    fig.suptitle(f"{spec.title} ({power_label(rows)})")
    attach(fig, pd.concat(drawn))
    per = f", one line per {hue_name}" if hue else ""
    panel_text = " × ".join(AXIS_NAMES.get(a, a) for a in lay.panel_axes)
    panel_text = f", one panel per {panel_text}" if panel_text else ""
    hollow = f" Hollow markers: {n_hollow} point(s) with a flagged repeat." if n_hollow else ""
    caption = (f"{spec.what} against {AXIS_NAMES.get(spec.x, spec.x)}{per}{panel_text}. "
               f"{lay.caption()} Points: mean over the ok repeats of one cell; bars: {CI_TEXT}, "
               f"{n_text(counts)}.{hollow}{' ' + DODGE_TEXT if comparison else ''}"
               f"{' ' + left_out if left_out else ''}")
    return fig, caption
